"""Test-session setup.

Without a GPU, Triton kernels can still run in Triton's interpreter (numpy on the CPU), which
test_attention_triton.py uses to test hf_fp8's FP8 attention kernels in CI. Triton decides between
compiled and interpreted `@triton.jit` functions, its own library functions included, when they are
defined, i.e. at import: so the switch is set here, before anything imports Triton. hf_fp8 itself
only runs its Triton kernels on CUDA devices; nothing changes for the other tests.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
