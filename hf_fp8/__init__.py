"""hf_fp8: FP8 training of Hugging Face Transformer models with delayed per-tensor scaling."""

from . import _torchao  # noqa: F401  (first: silences torchao's CPU-only import noise)
from .convert import FP8Report, convert_model, revert_model
from .linear import FP8Linear
from .recipe import FP8Recipe
from .scaling import attach, update_scales
from .stats import fp8_stats

__version__ = "0.1.0"

__all__ = [
    "FP8Linear",
    "FP8Recipe",
    "FP8Report",
    "attach",
    "convert_model",
    "fp8_stats",
    "revert_model",
    "update_scales",
]
