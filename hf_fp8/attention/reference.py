"""FP8 attention in pure PyTorch: the numerical specification every fused kernel must match.

Forward (per batch and head; Q (q, d), K and V (k, d)):
    S = (Q_e4m3 @ K_e4m3^T) * softmax_scale + mask          FP8 GEMM 1
    P = softmax(S) in FP32                                    (fully masked rows give P = 0)
    O = P_e4m3 @ V_e4m3                                       FP8 GEMM 2
Backward:
    dV = P_e4m3^T @ dO_e5m2                                   FP8 GEMM 3
    dP = dO_e5m2 @ V_e4m3^T                                   FP8 GEMM 4
    dS = P * (dP - rowsum(dO * O))                            FP32, as FlashAttention does
    dQ = dS_e5m2 @ K_e4m3 * softmax_scale                     FP8 GEMM 5
    dK = dS_e5m2^T @ Q_e4m3 * softmax_scale                   FP8 GEMM 6
(E5M2 is the recipe's gradient format: E4M3 with `fp8_format: e4m3`.)

Q, K, V, dO and dS are cast with delayed per-tensor scales held per attention module (roles of a
`DelayedScale`, updated with every other scale by `update_scales`). P lies in [0, 1], so it takes
the fixed scale P_SCALE = 448 (E4M3's max): P = 1 maps to 448, and probabilities below about 4e-6
(E4M3's smallest subnormal, 2**-9, over 448) flush to zero.

How the GEMMs are computed: `torch._scaled_mm` is 2-D only, so each GEMM here multiplies the
FP8-rounded operands (upcast to FP32, divided by their scales) in FP32. The product of two FP8
values is exact in FP32; only the accumulation order differs from FP8 tensor cores, which also
accumulate in FP32. So this is the FP8 numerics of the fused kernels, up to summation order.
"""

from __future__ import annotations

import torch

from .._torchao import to_fp8_saturated
from ..scaling import DelayedScale, amax_of, cast_scale, record_amax

ATTENTION_ROLES = ("query", "key", "value", "grad_output", "grad_scores")
_Q, _K, _V, _DO, _DS = range(5)
P_SCALE = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def _to_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Saturating cast (torchao's, as FP8Linear's casts): beyond the format's range clips to +-max.
    return to_fp8_saturated(x.float() * scale, dtype)


def _cast(x: torch.Tensor, state: DelayedScale, i: int, record: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP8 data, scale) of x with role i's delayed scale; records x's amax when `record`."""
    amax = amax_of(x)
    if record:
        record_amax(state, i, amax)
    scale = cast_scale(state, i, amax)
    return _to_fp8(x, scale, state.dtypes[i]), scale


def _dequant(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.float() / scale


def _softmax_fully_masked_to_zero(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim in FP32; rows where every key is masked (-inf) give all zeros
    (plain softmax gives NaN there; such rows are padding queries whose output is never used)."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    return e / e.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


class _FP8Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, softmax_scale: float, state: DelayedScale, record: bool):
        # q: (B, H, Q, D); k, v: (B, H, K, D) with K/V heads already repeated for GQA;
        # mask: None or additive float (B or 1, 1 or H, Q, K) with 0 (attend) / -inf (masked).
        q8, sq = _cast(q, state, _Q, record)
        k8, sk = _cast(k, state, _K, record)
        v8, sv = _cast(v, state, _V, record)
        scores = _dequant(q8, sq) @ _dequant(k8, sk).transpose(-1, -2) * softmax_scale
        if mask is not None:
            scores = scores + mask
        p = _softmax_fully_masked_to_zero(scores)
        p8 = _to_fp8(p, P_SCALE, torch.float8_e4m3fn)
        out = (p8.float() / P_SCALE) @ _dequant(v8, sv)
        ctx.save_for_backward(q8, k8, v8, sq, sk, sv, p8, mask if mask is not None else torch.empty(0), out)
        ctx.has_mask = mask is not None
        ctx.softmax_scale = softmax_scale
        ctx.state = state
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q8, k8, v8, sq, sk, sv, p8, mask, out = ctx.saved_tensors
        state, softmax_scale = ctx.state, ctx.softmax_scale
        q, k, v = _dequant(q8, sq), _dequant(k8, sk), _dequant(v8, sv)
        # P in FP32 for the elementwise dS, recomputed from the FP8 GEMM 1 (as flash kernels do).
        scores = q @ k.transpose(-1, -2) * softmax_scale
        if ctx.has_mask:
            scores = scores + mask
        p = _softmax_fully_masked_to_zero(scores)

        do8, sdo = _cast(grad_out, state, _DO, True)
        do = _dequant(do8, sdo)
        grad_v = (p8.float() / P_SCALE).transpose(-1, -2) @ do
        grad_p = do @ v.transpose(-1, -2)
        delta = (p * grad_p).sum(dim=-1, keepdim=True)  # = rowsum(dO * O) in exact arithmetic
        grad_scores = p * (grad_p - delta)
        ds8, sds = _cast(grad_scores, state, _DS, True)
        ds = _dequant(ds8, sds)
        grad_q = ds @ k * softmax_scale
        grad_k = ds.transpose(-1, -2) @ q * softmax_scale
        dtype = grad_out.dtype
        return grad_q.to(dtype), grad_k.to(dtype), grad_v.to(dtype), None, None, None, None


def fp8_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
    state: DelayedScale,
    record: bool,
) -> torch.Tensor:
    """softmax(Q K^T * softmax_scale + mask) V with all four forward/backward GEMM pairs in FP8.

    query (B, H, Q, D); key/value (B, H, K, D) (GQA heads already repeated); mask None or an additive
    float mask broadcastable to (B, H, Q, K). Returns (B, H, Q, D) in query's dtype."""
    return _FP8Attention.apply(query, key, value, mask, softmax_scale, state, record)
