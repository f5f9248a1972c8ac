"""hf_fp8: FP8 training of Hugging Face Transformer models with delayed per-tensor scaling."""

from . import _torchao  # noqa: F401  (first: silences torchao's CPU-only import noise)
from .attention import register_hf_fp8_attention as _register_hf_fp8_attention
from .convert import FP8Report, convert_model, revert_model
from .hub import load_fp8_state, model_card
from .integrations.trainer import FP8TrainerCallback
from .linear import FP8Linear
from .models.fog import FOGConfig, FOGForCausalLM, FOGModel
from .models.fog import register as _register_fog
from .recipe import FP8Recipe
from .scaling import attach, update_scales
from .stability import apply_attention_stability
from .stats import collect_fp8_stats, fp8_stats

__version__ = "0.1.0"

# As soon as hf_fp8 is imported, transformers knows attn_implementation="hf_fp8" and model_type "fog".
_register_hf_fp8_attention()
_register_fog()

# With Accelerate installed, `import hf_fp8` makes hf_fp8 Accelerate's FP8 backend for
# mixed_precision="fp8" (HF_FP8_ACCELERATE=0 opts out); see hf_fp8/integrations/accelerate.py.
from .integrations.accelerate import _auto_enable as _enable_accelerate_integration  # noqa: E402

_enable_accelerate_integration()

__all__ = [
    "FOGConfig",
    "FOGForCausalLM",
    "FOGModel",
    "FP8Linear",
    "FP8Recipe",
    "FP8Report",
    "FP8TrainerCallback",
    "apply_attention_stability",
    "attach",
    "collect_fp8_stats",
    "convert_model",
    "fp8_stats",
    "load_fp8_state",
    "model_card",
    "revert_model",
    "update_scales",
]
