"""The `hf_fp8` attention implementation for transformers: `attn_implementation="hf_fp8"`.

Registered twice, because transformers looks the two up separately:
- AttentionInterface["hf_fp8"]: the attention function below;
- AttentionMaskInterface["hf_fp8"]: SDPA's mask builder (a 4-D bool mask, or None for a plain causal
  mask). Without it transformers hands the function `attention_mask=None` and padding is lost.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import cudnn_sdpa, kernels
from .reference import fp8_attention_reference
from .triton_flash import fp8_attention_triton

ATTN_IMPLEMENTATION = "hf_fp8"
# The attribute convert_model gives each converted attention module: its DelayedScale.
STATE_ATTR = "fp8_attention_scale"
# Set to a reason string on an attention module to run it in high precision (SDPA) while the rest
# of the model keeps FP8 attention, e.g. by apply_attention_stability(model, "preserve").
FALLBACK_ATTR = "fp8_attention_fallback"


def _additive_mask(attention_mask, is_causal: bool, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """The mask as an FP32 additive tensor (0 attend, -inf masked), broadcastable to (B, H, Q, K)."""
    if attention_mask is None:
        if not (is_causal and q_len > 1):
            return None
        # Same alignment as SDPA's is_causal (top-left): query i sees keys 0..i.
        allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        return torch.zeros(q_len, kv_len, device=device).masked_fill(~allowed, float("-inf"))
    if attention_mask.dtype == torch.bool:
        return torch.zeros(attention_mask.shape, device=device).masked_fill(~attention_mask, float("-inf"))
    return attention_mask.float()


def hf_fp8_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query (B, Hq, Q, D), key/value (B, Hkv, K, D) ->
    (output (B, Q, Hq, D), None). QK^T and P.V run in FP8 with the module's delayed scales."""
    if getattr(module, FALLBACK_ATTR, None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    name = type(module).__name__
    if dropout:
        raise ValueError(f"{name}: hf_fp8 attention supports attention dropout 0 only, got {dropout} (set attention_dropout=0)")
    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"{name}: hf_fp8 attention does not support {unsupported!r}; keep this model's attention in BF16")
    if kwargs.get("output_attentions"):
        raise ValueError(f"{name}: hf_fp8 attention cannot return attention weights (output_attentions=True)")
    state = getattr(module, STATE_ATTR, None)
    if state is None:
        raise RuntimeError(
            f"{name} runs attn_implementation='hf_fp8' but has no FP8 attention scales; convert the model "
            "with hf_fp8.convert_model(model, hf_fp8.FP8Recipe(attention=True))"
        )
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    softmax_scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # As SDPA under autocast: the output in the autocast dtype (RoPE makes q/k float32 there).
    out_dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else query.dtype
    kernel, why = kernels.kernel_for(query, key, attention_mask, is_causal)
    # Without a mask tensor, causality is a flag of the fused kernels (a single query is never masked).
    causal = attention_mask is None and is_causal and query.shape[2] > 1
    if kernel == "cudnn":
        out = cudnn_sdpa.fp8_attention_cudnn(query, key, value, softmax_scale, causal, state, module.training, out_dtype)
        return out.transpose(1, 2), None  # (B, Q, H, D), contiguous: the kernel writes BSHD memory
    if kernel == "triton":
        out = fp8_attention_triton(query, key, value, attention_mask, softmax_scale, causal, state, module.training, out_dtype)
        return out.transpose(1, 2), None  # (B, Q, H, D), contiguous: the kernel writes BSHD memory
    if query.is_cuda:
        cudnn_sdpa.warn_reference_fallback(name, why)
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = _additive_mask(attention_mask, is_causal, q_len, kv_len, query.device)
    out = fp8_attention_reference(query, key, value, mask, softmax_scale, state, module.training, out_dtype, fp8_outputs=False)
    return out.transpose(1, 2).contiguous(), None


def register_hf_fp8_attention() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_fp8_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
