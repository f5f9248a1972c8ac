"""Integrations of hf_fp8 with training frameworks.

- `hf_fp8.integrations.accelerate`: hf_fp8 as the FP8 backend of `accelerate.Accelerator`
  (`mixed_precision="fp8"`); see that module's docstring.

Submodules are imported on demand, so `import hf_fp8.integrations` needs none of the frameworks.
"""
