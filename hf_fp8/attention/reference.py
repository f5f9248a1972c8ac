"""FP8 attention in pure PyTorch: the numerical specification every fused kernel must match.

Two kernels run it on the GPU, and the reference has a mode for each (`fp8_outputs`):
- cuDNN's FP8 SDPA on Hopper (`cudnn_sdpa.py`, fp8_outputs=True): its inputs *and outputs* are
  FP8, so besides the GEMM operands the output O and the gradients dQ/dK/dV are stored in FP8 with
  their own delayed scales and handed to the model dequantized;
- hf_fp8's Triton flash attention (`triton_flash.py`, fp8_outputs=False): the same six FP8 GEMMs,
  with O/dQ/dK/dV handed back in the model's dtype straight from the FP32 accumulators.

Forward (per batch and query head; Q (q, d), K and V (k, d) of the head's KV group):
    S = (Q_e4m3 @ K_e4m3^T) * softmax_scale + mask          FP8 GEMM 1
    E = exp(S - rowmax(S)), l = rowsum(E) in FP32             (fully masked rows give E = 0)
    O = (E_e4m3 @ V_e4m3) / l, stored as O_e4m3 (fp8_outputs) FP8 GEMM 2
    (flash kernels normalize O, not P: the FP8 operand is E in [0, 1], whose row max is 1, so
    small probabilities keep their relative precision instead of sinking into subnormals. A flash
    kernel rounds E relative to the running row max of the key blocks seen so far, not the final one:
    the same values rounded at a different scale, a difference of the size of the FP8 rounding
    itself, which the kernel tests bound against this reference and the exact attention.)
Backward:
    P = E / l (FP32, recomputed)
    dV = P_e4m3^T @ dO_e5m2                                   FP8 GEMM 3
    dP = dO_e5m2 @ V_e4m3^T                                   FP8 GEMM 4
    dS = P * (dP - rowsum(dO * O)) * softmax_scale            FP32 (dO as FP8 values, O as returned)
    dQ = dS_e5m2 @ K_e4m3                                     FP8 GEMM 5
    dK = dS_e5m2^T @ Q_e4m3                                   FP8 GEMM 6
    (dS here is the gradient of Q K^T before softmax_scale: cuDNN's "dP", whose amax it returns)
    dQ, dK, dV (dK/dV summed over the query heads of a KV group) stored as E4M3 (fp8_outputs).
(E5M2 is the recipe's gradient format: E4M3 with `fp8_format: e4m3`.)

Delayed scales: one `DelayedScale` per attention module with the nine ATTENTION_ROLES (without FP8
outputs O/dQ/dK/dV still record their amaxes, for the FP8 health statistics). E and P lie
in [0, 1] and take the fixed scale P_SCALE = 448 (E4M3's max). Before its first scale update every
tensor is scaled from its own amax, like every other hf_fp8 cast. O, dS, dQ, dK and dV are produced
inside the fused kernel, which needs their scale before it computes them: on the first training
step (no `update_scales` yet, a host-side fact: `DelayedScale.updated_on_host` is False) the kernel
runs twice, once to measure their amaxes; otherwise (evaluation, or a tensor whose amaxes so far
were all zero) an uninitialized one is scaled from an upper bound of its magnitude known in advance
(`first_step_bounds`), which cannot overflow. Their amaxes (computed by the kernel before rounding) go into the histories like any other.

How the GEMMs are computed: `torch._scaled_mm` is 2-D only, so each GEMM here multiplies the
FP8-rounded operands (upcast to FP32, divided by their scales) in FP32. The product of two FP8
values is exact in FP32; only the accumulation order differs from FP8 tensor cores, which also
accumulate in FP32. So this is the FP8 numerics of the fused kernels, up to summation order.
"""

from __future__ import annotations

import torch

from ..cast import cast_fp8_fused_any_layout, fused_cast_applies_any_layout, to_fp8
from ..recipe import FP8Recipe
from ..scaling import DelayedScale, amax_of, cast_scale, record_amax

ATTENTION_ROLES = (
    "query", "key", "value", "output",
    "grad_output", "grad_scores", "grad_query", "grad_key", "grad_value",
)  # fmt: skip
_Q, _K, _V, _O, _DO, _DS, _DQ, _DK, _DV = range(len(ATTENTION_ROLES))
P_SCALE = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def attention_dtypes(recipe: FP8Recipe) -> tuple[torch.dtype, ...]:
    """FP8 format of each ATTENTION_ROLES entry: the recipe's forward format for Q/K/V/O, its
    gradient format for dO and dS (the GEMM operands of the backward), E4M3 for the stored dQ/dK/dV
    (they are re-cast by the projections' backward; 3 mantissa bits keep that second rounding small)."""
    fwd, bwd, e4m3 = recipe.forward_dtype, recipe.backward_dtype, torch.float8_e4m3fn
    return (fwd, fwd, fwd, fwd, bwd, bwd, e4m3, e4m3, e4m3)


def new_attention_scales(recipe: FP8Recipe, device=None) -> DelayedScale:
    """The DelayedScale of one attention module."""
    return DelayedScale(ATTENTION_ROLES, attention_dtypes(recipe), recipe, device=device)


def cast_input(x: torch.Tensor, state: DelayedScale, i: int, record: bool):
    """(FP8 data with x's strides, scale, amax) of x with role i's delayed scale; the amax is recorded
    when `record`. Eager BF16/FP16 CUDA tensors, once the delayed scale is known on the host: one
    Triton pass (hf_fp8.cast); else amax_of and the reference cast (what torch.compile fuses)."""
    if state.updated_on_host and fused_cast_applies_any_layout(x):
        scale = state.scale[i]
        x8, amax = cast_fp8_fused_any_layout(x, scale, state.dtypes[i])
    else:
        amax = amax_of(x)
        scale = cast_scale(state, i, amax)
        x8 = to_fp8(x, scale, state.dtypes[i])
    if record:
        record_amax(state, i, amax)
    return x8, scale, amax


def _dequant(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return data.float() / scale


def forward_output_bound(amax_v: torch.Tensor) -> torch.Tensor:
    """|O| <= max|V| * sum_j E_e4m3_ij / l_i, and rounding E moves that sum by at most 2**-4: 2 max|V|."""
    return 2 * amax_v


def first_step_bounds(amax_q, amax_k, amax_v, amax_do, head_dim: int, q_len: int, groups: int, softmax_scale: float):
    """Upper bounds of |dS|, |dQ|, |dK|, |dV| from quantities known before the backward kernel runs:
    |dP_ij| <= head_dim * max|dO| * max|V|; sum_j |dS_ij| <= softmax_scale * sum_j P_ij (|dP_ij| +
    |rowsum(dO*O)_i|) <= softmax_scale * 2 max|dP| =: B (also bounds |dS|); |dQ| <= B * max|K|; dK
    and dV sum over the `groups * q_len` queries of a KV head: |dK| <= B * groups * q_len * max|Q|,
    |dV| <= groups * q_len * max|dO|. Loose (dK's by orders of magnitude), hence used only where
    no amax was ever seen (see module doc), and for the fused kernel's measuring pass."""
    bound_ds = softmax_scale * 2 * head_dim * amax_do * amax_v
    queries = groups * q_len
    return bound_ds, bound_ds * amax_k, bound_ds * queries * amax_q, queries * amax_do


def _exp_and_rowsum(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E = exp(S - rowmax(S)) and l = rowsum(E) (clamped > 0), FP32. Rows where every key is masked
    (-inf) give E = 0 (plain softmax gives NaN there; such rows are padding queries whose output is
    never used)."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    return e, e.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)


def _sum_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv * groups, K, D) -> (B, Hkv, K, D): a KV head's gradient is the sum over its query heads."""
    b, h, k, d = x.shape
    return x.view(b, h // groups, groups, k, d).sum(dim=2)


def measures_first(state: DelayedScale, record: bool) -> bool:
    """Whether the fused kernel runs a measuring pass first: on the first training step (no
    `update_scales` yet). Not in evaluation (`record` False): an evaluated checkpoint has its scales,
    and a never-trained model is scaled from the bounds rather than run twice on every call."""
    return record and not state.updated_on_host


def kernel_output_scale(state: DelayedScale, i: int, amax_now: torch.Tensor, bound: torch.Tensor, record: bool) -> torch.Tensor:
    """Scale of a tensor the fused kernel produces (O, dS, dQ, dK, dV): its delayed scale once
    initialized; before that its own amax `amax_now` when the kernel measures first, else the bound
    (module doc)."""
    return cast_scale(state, i, amax_now if measures_first(state, record) else bound)


def store_fp8(x: torch.Tensor, bound: torch.Tensor, state: DelayedScale, i: int, record: bool, fp8: bool = True) -> torch.Tensor:
    """x rounded to role i's FP8 format with its kernel-output scale, returned dequantized: what a
    kernel with an FP8 output hands back. fp8=False: x itself (an output the kernel writes in high
    precision); the amax is recorded either way."""
    amax = amax_of(x)
    if record:
        record_amax(state, i, amax)
    if not fp8:
        return x
    scale = kernel_output_scale(state, i, amax, bound, record)
    return _dequant(to_fp8(x, scale, state.dtypes[i]), scale)


class _FP8Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, softmax_scale: float, state: DelayedScale, record: bool, out_dtype: torch.dtype,
                fp8_outputs: bool):  # fmt: skip
        # q: (B, Hq, Q, D); k, v: (B, Hkv, K, D), Hq a multiple of Hkv (GQA);
        # mask: None or additive float (B or 1, 1 or Hq, Q, K) with 0 (attend) / -inf (masked).
        groups = q.shape[1] // k.shape[1]
        (q8, sq, amax_q), (k8, sk, amax_k), (v8, sv, amax_v) = (
            cast_input(t, state, i, record) for t, i in ((q, _Q), (k, _K), (v, _V))
        )
        kf = _dequant(k8, sk).repeat_interleave(groups, dim=1)
        vf = _dequant(v8, sv).repeat_interleave(groups, dim=1)
        scores = _dequant(q8, sq) @ kf.transpose(-1, -2) * softmax_scale
        if mask is not None:
            scores = scores + mask
        e, rowsum = _exp_and_rowsum(scores)
        e8 = to_fp8(e, P_SCALE, torch.float8_e4m3fn)
        out = store_fp8((e8.float() / P_SCALE) @ vf / rowsum, forward_output_bound(amax_v), state, _O, record, fp8_outputs)
        if not fp8_outputs:  # the backward's rowsum(dO * O) reads O as the model got it
            out = out.to(out_dtype).float()
        ctx.save_for_backward(q8, k8, v8, sq, sk, sv, mask if mask is not None else torch.empty(0), out,
                              torch.stack([amax_q, amax_k, amax_v]))  # fmt: skip
        ctx.has_mask = mask is not None
        ctx.softmax_scale = softmax_scale
        ctx.state = state
        ctx.fp8_outputs = fp8_outputs
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q8, k8, v8, sq, sk, sv, mask, out, amaxes = ctx.saved_tensors
        state, softmax_scale = ctx.state, ctx.softmax_scale
        groups = q8.shape[1] // k8.shape[1]
        q = _dequant(q8, sq)
        k = _dequant(k8, sk).repeat_interleave(groups, dim=1)
        v = _dequant(v8, sv).repeat_interleave(groups, dim=1)
        # P recomputed from the FP8 GEMM 1 (as flash kernels do).
        scores = q @ k.transpose(-1, -2) * softmax_scale
        if ctx.has_mask:
            scores = scores + mask
        e, rowsum = _exp_and_rowsum(scores)
        p = e / rowsum
        p8 = to_fp8(p, P_SCALE, torch.float8_e4m3fn)

        do8, sdo, amax_do = cast_input(grad_out, state, _DO, True)
        do = _dequant(do8, sdo)
        bound_ds, bound_dq, bound_dk, bound_dv = first_step_bounds(
            *amaxes.unbind(), amax_do, q.shape[-1], q.shape[2], groups, softmax_scale
        )
        grad_v = (p8.float() / P_SCALE).transpose(-1, -2) @ do
        grad_p = do @ v.transpose(-1, -2)
        delta = (do * out).sum(dim=-1, keepdim=True)
        ds = store_fp8(p * (grad_p - delta) * softmax_scale, bound_ds, state, _DS, True)
        fp8 = ctx.fp8_outputs
        grad_q = store_fp8(ds @ k, bound_dq, state, _DQ, True, fp8)
        grad_k = store_fp8(_sum_groups(ds.transpose(-1, -2) @ q, groups), bound_dk, state, _DK, True, fp8)
        grad_v = store_fp8(_sum_groups(grad_v, groups), bound_dv, state, _DV, True, fp8)
        dq_dtype, dk_dtype, dv_dtype = ctx.in_dtypes
        return grad_q.to(dq_dtype), grad_k.to(dk_dtype), grad_v.to(dv_dtype), None, None, None, None, None, None


def fp8_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    softmax_scale: float,
    state: DelayedScale,
    record: bool,
    out_dtype: torch.dtype | None = None,
    fp8_outputs: bool = True,
) -> torch.Tensor:
    """softmax(Q K^T * softmax_scale + mask) V with all six forward/backward GEMMs in FP8.

    query (B, Hq, Q, D); key/value (B, Hkv, K, D) with Hq a multiple of Hkv (not repeated); mask None
    or an additive float mask broadcastable to (B, Hq, Q, K). Returns (B, Hq, Q, D) in `out_dtype`
    (default: query's). fp8_outputs: O and dQ/dK/dV rounded to FP8 as cuDNN's Hopper kernel stores
    them (True), or kept in high precision as the Triton kernel does (False); see the module doc."""
    return _FP8Attention.apply(query, key, value, mask, softmax_scale, state, record, out_dtype or query.dtype, fp8_outputs)
