"""FP8 attention: QK^T and P.V as FP8 GEMMs with delayed scales, as a transformers attention backend."""

from __future__ import annotations

import torch
from torch import nn

from ..recipe import FP8Recipe
from ..scaling import DelayedScale
from . import kernels
from .reference import ATTENTION_ROLES, attention_dtypes, fp8_attention_reference, new_attention_scales
from .register import ATTN_IMPLEMENTATION, STATE_ATTR, hf_fp8_attention_forward, register_hf_fp8_attention

__all__ = [
    "ATTENTION_ROLES",
    "ATTN_IMPLEMENTATION",
    "attention_dtypes",
    "attention_kernel",
    "attention_modules",
    "convert_attention",
    "fp8_attention_reference",
    "hf_fp8_attention_forward",
    "new_attention_scales",
    "register_hf_fp8_attention",
    "revert_attention",
]

# Remembers the implementation a model had before conversion, so revert can restore it.
_PREVIOUS_IMPLEMENTATION = "_hf_fp8_previous_attn_implementation"


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that call transformers' attention interface: HF attention classes keep their
    config and head_dim and are named *Attention."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if type(m).__name__.endswith("Attention") and hasattr(m, "config") and hasattr(m, "head_dim")
    ]


def why_attention_stays_high_precision(model: nn.Module) -> str | None:
    """Why this model's attention cannot run as `hf_fp8` attention, or None if it can."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        return "not a transformers PreTrainedModel (no attn_implementation to switch)"
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not route attention through transformers' AttentionInterface"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping (attn_logit_softcapping) is not supported by hf_fp8 attention"
    for field in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
        if getattr(config, field, 0.0):
            return f"{field}={getattr(config, field)}: hf_fp8 attention supports attention dropout 0 only"
    if any(hasattr(m, "sinks") for _, m in attention_modules(model)):
        return "attention sinks are not supported by hf_fp8 attention"
    if not attention_modules(model):
        return "no attention module found (*Attention with config and head_dim)"
    return None


def convert_attention(model: nn.Module, recipe: FP8Recipe) -> list[str]:
    """Give every attention module its FP8 scales and switch the model to `hf_fp8` attention.
    Call only when `why_attention_stays_high_precision(model)` is None. Returns module names."""
    register_hf_fp8_attention()
    names = []
    for name, module in attention_modules(model):
        if not isinstance(getattr(module, STATE_ATTR, None), DelayedScale):
            device = next(module.parameters()).device
            setattr(module, STATE_ATTR, new_attention_scales(recipe, device=device))
        names.append(name)
    current = model.config._attn_implementation
    if current != ATTN_IMPLEMENTATION:
        setattr(model, _PREVIOUS_IMPLEMENTATION, current)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return names


def attention_kernel(device: torch.device) -> str:
    """Which FP8 attention kernels run on `device`: one line for reports. Also checks the fused
    kernels' availability once, outside any torch.compile region."""
    return kernels.description(device)


def revert_attention(model: nn.Module) -> list[str]:
    """Drop the FP8 attention scales and restore the attention implementation used before."""
    names = []
    for name, module in attention_modules(model):
        if hasattr(module, STATE_ATTR):
            delattr(module, STATE_ATTR)
            names.append(name)
    previous = getattr(model, _PREVIOUS_IMPLEMENTATION, None)
    if previous is not None:
        model.set_attn_implementation(previous)
        delattr(model, _PREVIOUS_IMPLEMENTATION)
    elif getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_IMPLEMENTATION:
        # Built with attn_implementation="hf_fp8" from the start: SDPA is transformers' default.
        model.set_attn_implementation("sdpa")
    return names
