"""Model architectures shipped with hf_fp8, as Hugging Face models (see `fog`)."""

from .fog import FOGConfig, FOGForCausalLM, FOGModel, FOGPreTrainedModel
from .fog import register as register_fog

__all__ = ["FOGConfig", "FOGForCausalLM", "FOGModel", "FOGPreTrainedModel", "register"]


def register() -> None:
    """Register every hf_fp8 architecture with transformers' Auto classes (idempotent)."""
    register_fog()
