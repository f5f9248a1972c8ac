"""FOG ("fast and outlier-guarded") architectures as Hugging Face models.

`register()` makes transformers' Auto classes know model_type "fog" (AutoConfig, AutoModel,
AutoModelForCausalLM), so `AutoModelForCausalLM.from_config(FOGConfig(...))` and
`from_pretrained(dir)` work in this process. Independently of it, FOGConfig / FOGModel /
FOGForCausalLM are registered for auto classes at import: `save_pretrained` then copies
configuration_fog.py and modeling_fog.py next to the weights and writes `auto_map` into
config.json, so a stock transformers (without hf_fp8) loads the directory with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_fog import FOG_VARIANTS, FOGConfig, default_softmax_scale
from .modeling_fog import FOGForCausalLM, FOGModel, FOGPreTrainedModel

__all__ = [
    "FOG_VARIANTS",
    "FOGConfig",
    "FOGForCausalLM",
    "FOGModel",
    "FOGPreTrainedModel",
    "default_softmax_scale",
    "register",
]

# Class attributes only (no global registry is touched): which files save_pretrained ships.
FOGConfig.register_for_auto_class()
FOGModel.register_for_auto_class("AutoModel")
FOGForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def register() -> None:
    """Register model_type "fog" with AutoConfig, AutoModel and AutoModelForCausalLM.
    Idempotent: calling it again (or after another import registered the same classes) is a no-op."""
    AutoConfig.register(FOGConfig.model_type, FOGConfig, exist_ok=True)
    AutoModel.register(FOGConfig, FOGModel, exist_ok=True)
    AutoModelForCausalLM.register(FOGConfig, FOGForCausalLM, exist_ok=True)
