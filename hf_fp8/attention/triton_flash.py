"""FP8 attention on hf_fp8's own Triton flash-attention kernels (`_flash_triton.py`).

It covers what cuDNN's FP8 SDPA on Hopper declines: head dims 32 and 64 (cuDNN 9.19's FP8
backward takes 128 only), boolean padding/sliding-window masks, and GPUs other than sm_90 that
have FP8 tensor cores (compute capability 8.9+). Numerics: `reference.py` with `fp8_outputs=False`
(all six GEMMs in FP8 with the same delayed scales; O, dQ, dK, dV handed back in the model's dtype
without an FP8 rounding, since no Triton kernel needs FP8 outputs).

What runs where:
- `_TritonFP8Attention` (autograd): casts Q/K/V (and dO in backward) with their delayed scales in
  PyTorch, so under torch.compile the casts fuse into the ops that produce the tensors, calls the
  two ops below and records the amaxes.
- `torch.ops.hf_fp8.triton_fp8_attention_fwd` / `_bwd`: custom ops with fake implementations, so
  torch.compile keeps the kernels opaque.
The dS scale is delayed like every other: on the first training step (no scale update yet) the
backward runs twice, the first time only to measure amax(dS), as the reference does.
"""

from __future__ import annotations

import functools

import torch

from ..cast import _cdiv, transpose_bytes, triton_fp8_unavailable
from ..scaling import DelayedScale, cast_scale, record_amaxes
from .cudnn_sdpa import _bshd_like
from .reference import _DK, _DO, _DQ, _DS, _DV, _K, _O, _Q, _V, cast_input, first_step_bounds, measures_first

# The head dims tested on the GPU (tl.arange needs a power of two; FP8 tl.dot needs K >= 32). 256 is
# left out until it is: its FP32 accumulators and K/V tiles may not fit a Hopper SM at these tiles.
HEAD_DIMS = (32, 64, 128)


@functools.cache
def _kernels():
    from . import _flash_triton

    return _flash_triton


_STATUS: dict[tuple[str, int], str | None] = {}  # (device type, index) -> why the kernels cannot run there


def triton_ok(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can. Checked once per device
    (first outside torch.compile: conversion does)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    if (device.type, index) not in _STATUS:
        _STATUS[device.type, index] = _check(device.type, index)
    return _STATUS[device.type, index]


def _check(device_type: str, index: int) -> str | None:
    if device_type != "cuda":
        return f"device {device_type} (the Triton kernels need a GPU)"
    return triton_fp8_unavailable(index)


def declines(query: torch.Tensor, key: torch.Tensor, attention_mask, is_causal: bool) -> str | None:
    """Why the Triton kernels do not cover this call (shapes, mask), or None."""
    head_dim = query.shape[-1]
    if head_dim not in HEAD_DIMS or key.shape[-1] != head_dim:
        return f"head dim {head_dim} (the Triton kernel takes {', '.join(map(str, HEAD_DIMS))})"
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return "a float attention mask (the Triton kernel takes boolean masks)"
    if attention_mask is None and is_causal and query.shape[2] != key.shape[2]:
        return f"causal attention of {query.shape[2]} queries over {key.shape[2]} keys (needs equal lengths)"
    return None


# ---- launch configuration -------------------------------------------------------------------------


def _blocks(head_dim: int) -> dict:
    """Tile sizes and warps per kernel. FP8 GEMMs need K >= 32 per tl.dot, so every block that is a
    GEMM's inner dimension (BLOCK_N forward and dQ, BLOCK_M of dK/dV) is >= 32; causal dK/dV needs
    its BLOCK_N a multiple of its BLOCK_M."""
    warps = 4 if head_dim <= 64 else 8
    return {
        "fwd": dict(BLOCK_M=128, BLOCK_N=64 if head_dim <= 64 else 128, num_warps=8, num_stages=3),
        "dkdv": dict(BLOCK_M=64, BLOCK_N=128, num_warps=warps, num_stages=2),
        "dq": dict(BLOCK_M=128, BLOCK_N=64, num_warps=warps, num_stages=2),
        "delta": dict(BLOCK_M=128, num_warps=4),
    }


def _mask_args(mask: torch.Tensor | None, like: torch.Tensor) -> tuple:
    """(tensor, strides (B, H, Q, K)) of a boolean mask broadcastable to (B, H, Q, K); zero strides
    for broadcast dims. Without a mask: a dummy tensor (never read)."""
    if mask is None:
        return like, (0, 0, 0, 0)
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    strides = tuple(0 if size == 1 else stride for size, stride in zip(m.shape, m.stride()))
    return m, strides


def _seq_contiguous(x8: torch.Tensor) -> torch.Tensor:
    """x8 (B, H, S, D), FP8, as a view of (B, H, D, S) memory: the K-major operand of the GEMMs that
    reduce over the sequence (P.V, and in backward the dK, dV, dQ GEMMs). On CUDA, from BSHD memory
    (how HF projections hand Q/K/V over): per batch one byte transpose (hf_fp8.cast.transpose_bytes)
    of the (S, H*D) matrix. Else aten's copy."""
    b, h, s, d = x8.shape
    out = torch.empty(b, h, d, s, dtype=x8.dtype, device=x8.device)
    if x8.is_cuda and x8.stride() == (s * h * d, d, h * d, 1) and x8.numel():
        for i in range(b):  # x8[i]: (S, H*D) row-major; out[i]: (H*D, S) row-major
            transpose_bytes(x8[i].transpose(0, 1).reshape(s, h * d), out[i].view(h * d, s))
    else:
        out.copy_(x8.transpose(-1, -2))
    return out.transpose(-1, -2)


def _strides(x: torch.Tensor) -> tuple:
    """(batch, head, sequence) strides of a (B, H, S, D) tensor whose last dim is contiguous."""
    assert x.stride(-1) == 1, "the Triton FP8 attention kernels read rows of contiguous head dims"
    return x.stride(0), x.stride(1), x.stride(2)


# ---- custom ops -----------------------------------------------------------------------------------


@torch.library.custom_op("hf_fp8::triton_fp8_attention_fwd", mutates_args=())
def triton_fp8_attention_fwd(
    q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, mask: torch.Tensor | None, scales: torch.Tensor,
    softmax_scale: float, causal: bool, out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """q8 (B, Hq, Q, D), k8/v8 (B, Hkv, K, D) FP8 (last dim contiguous), scales [sq, sk, sv] fp32,
    mask None or bool broadcastable to (B, Hq, Q, K) -> O (B, Hq, Q, D) in out_dtype (BSHD memory),
    lse2 (B, Hq, Q) fp32 (base-2 log-sum-exp of the scaled scores), amax of O (fp32 scalar)."""
    fl = _kernels()
    b, hq, q_len, d = q8.shape
    hkv, kv_len = k8.shape[1], k8.shape[2]
    o = _bshd_like(q8, out_dtype)
    lse = torch.empty(b, hq, q_len, dtype=torch.float32, device=q8.device)
    amax_bits = torch.zeros(5, dtype=torch.int32, device=q8.device)
    if o.numel():
        m, m_strides = _mask_args(mask, q8)
        cfg = _blocks(d)["fwd"]
        grid = (_cdiv(q_len, cfg["BLOCK_M"]), b * hq)
        v8_t = _seq_contiguous(v8)  # halves the forward at head dim 128 on the H200 (RESULTS (23))
        fl.fp8_attention_fwd_kernel[grid](
            q8, k8, v8_t, o, lse, m, scales, amax_bits, *_strides(q8), *_strides(k8), *v8_t.stride(), *_strides(o),
            *m_strides, hq, hq // hkv, q_len, kv_len, softmax_scale,
            CAUSAL=causal, HAS_MASK=mask is not None, HEAD_DIM=d, **cfg,
        )  # fmt: skip
    return o, lse, amax_bits.view(torch.float32)[0]


@triton_fp8_attention_fwd.register_fake
def _(q8, k8, v8, mask, scales, softmax_scale, causal, out_dtype):
    return _bshd_like(q8, out_dtype), q8.new_empty(q8.shape[:3], dtype=torch.float32), q8.new_empty((), dtype=torch.float32)


@torch.library.custom_op("hf_fp8::triton_fp8_attention_bwd", mutates_args=())
def triton_fp8_attention_bwd(
    q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, o: torch.Tensor, do8: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, scales: torch.Tensor, softmax_scale: float, causal: bool,
    dq_dtype: torch.dtype, dk_dtype: torch.dtype, dv_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """-> dQ, dK, dV (BSHD memory, in the given dtypes) and the amaxes of dS, dQ, dK, dV before
    rounding (fp32 (4,)). scales [sq, sk, sv, sdo, s_ds] fp32; do8 in the gradient FP8 format."""
    fl = _kernels()
    b, hq, q_len, d = q8.shape
    hkv, kv_len = k8.shape[1], k8.shape[2]
    dq, dk, dv = _bshd_like(q8, dq_dtype), _bshd_like(k8, dk_dtype), _bshd_like(v8, dv_dtype)
    amax_bits = torch.zeros(5, dtype=torch.int32, device=q8.device)
    if q8.numel() and k8.numel():
        cfg = _blocks(d)
        m, m_strides = _mask_args(mask, q8)
        delta = torch.empty(b, hq, q_len, dtype=torch.float32, device=q8.device)
        c = cfg["delta"]
        fl.fp8_attention_bwd_delta_kernel[(_cdiv(q_len, c["BLOCK_M"]), b * hq)](
            o, do8, delta, scales, *_strides(o), *_strides(do8), hq, q_len, HEAD_DIM=d, **c,
        )  # fmt: skip
        ds_max = torch.finfo(do8.dtype).max
        q8_t, do8_t, k8_t = _seq_contiguous(q8), _seq_contiguous(do8), _seq_contiguous(k8)
        c = cfg["dkdv"]
        fl.fp8_attention_bwd_dkdv_kernel[(_cdiv(kv_len, c["BLOCK_N"]), b * hkv)](
            q8, k8, v8, do8, q8_t, do8_t, lse, delta, dk, dv, m, scales, amax_bits, *_strides(q8), *_strides(k8),
            *_strides(v8), *_strides(do8), *q8_t.stride(), *do8_t.stride(), *_strides(dk), *_strides(dv), *m_strides,
            hkv, hq // hkv, q_len, kv_len, softmax_scale,
            ds_max, CAUSAL=causal, HAS_MASK=mask is not None, EVEN_N=kv_len % c["BLOCK_N"] == 0, HEAD_DIM=d, **c,
        )  # fmt: skip
        c = cfg["dq"]
        fl.fp8_attention_bwd_dq_kernel[(_cdiv(q_len, c["BLOCK_M"]), b * hq)](
            q8, k8, v8, do8, k8_t, lse, delta, dq, m, scales, amax_bits, *_strides(q8), *_strides(k8), *_strides(v8),
            *_strides(do8), *k8_t.stride(), *_strides(dq), *m_strides, hq, hq // hkv, q_len, kv_len, softmax_scale, ds_max,
            CAUSAL=causal, HAS_MASK=mask is not None, HEAD_DIM=d, **c,
        )  # fmt: skip
    else:
        for g in (dq, dk, dv):
            g.zero_()
    # A fresh tensor, not a view at offset 1: inductor expects custom-op outputs 16-byte aligned.
    return dq, dk, dv, amax_bits.view(torch.float32)[1:].clone()


@triton_fp8_attention_bwd.register_fake
def _(q8, k8, v8, o, do8, lse, mask, scales, softmax_scale, causal, dq_dtype, dk_dtype, dv_dtype):
    return (_bshd_like(q8, dq_dtype), _bshd_like(k8, dk_dtype), _bshd_like(v8, dv_dtype),
            q8.new_empty(4, dtype=torch.float32))  # fmt: skip


# ---- autograd -------------------------------------------------------------------------------------


def _rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _TritonFP8Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, softmax_scale: float, causal: bool, state: DelayedScale, record: bool, out_dtype):
        # q (B, Hq, Q, D); k, v (B, Hkv, K, D): any float dtype, any strides; mask None or bool.
        (q8, sq, amax_q), (k8, sk, amax_k), (v8, sv, amax_v) = (
            cast_input(_rows_contiguous(t), state, i, record=False) for t, i in ((q, _Q), (k, _K), (v, _V))
        )
        scales = torch.stack([sq, sk, sv]).float()
        o, lse, amax_o = torch.ops.hf_fp8.triton_fp8_attention_fwd(q8, k8, v8, mask, scales, softmax_scale, causal, out_dtype)
        if record:
            record_amaxes(state, {_Q: amax_q, _K: amax_k, _V: amax_v, _O: amax_o})
        ctx.save_for_backward(q8, k8, v8, o, lse, scales, mask if mask is not None else q8.new_empty(0),
                              torch.stack([amax_q, amax_k, amax_v]))  # fmt: skip
        ctx.has_mask = mask is not None
        ctx.softmax_scale, ctx.causal, ctx.state = softmax_scale, causal, state
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        return o

    @staticmethod
    def backward(ctx, grad_out):
        q8, k8, v8, o, lse, scales, mask, amaxes = ctx.saved_tensors
        mask = mask if ctx.has_mask else None
        state, softmax_scale = ctx.state, ctx.softmax_scale
        do8, sdo, amax_do = cast_input(_rows_contiguous(grad_out), state, _DO, record=False)
        groups = q8.shape[1] // k8.shape[1]
        bound_ds = first_step_bounds(*amaxes.unbind(), amax_do, q8.shape[-1], q8.shape[2], groups, softmax_scale)[0]

        def run(amax_ds):
            s_ds = cast_scale(state, _DS, amax_ds)
            all_scales = torch.cat([scales, torch.stack([sdo, s_ds]).float()])
            return torch.ops.hf_fp8.triton_fp8_attention_bwd(
                q8, k8, v8, o, do8, lse, mask, all_scales, softmax_scale, ctx.causal, *ctx.in_dtypes
            )

        dq, dk, dv, grad_amaxes = run(bound_ds)
        if measures_first(state, True):  # first step: that pass measured amax(dS); now cast with it
            dq, dk, dv, grad_amaxes = run(grad_amaxes[0])
        record_amaxes(state, {_DO: amax_do, **dict(zip((_DS, _DQ, _DK, _DV), grad_amaxes.unbind()))})
        return dq, dk, dv, None, None, None, None, None, None


def fp8_attention_triton(query, key, value, mask, softmax_scale: float, causal: bool, state: DelayedScale,
                         record: bool, out_dtype: torch.dtype | None = None):  # fmt: skip
    """FP8 flash attention with `state`'s delayed scales: query (B, Hq, Q, D), key/value (B, Hkv, K, D),
    mask None or bool (True = attend) broadcastable to (B, Hq, Q, K), `causal` only without a mask
    -> (B, Hq, Q, D) in `out_dtype` (default query's; a transposed view of BSHD memory)."""
    if query.dim() != 4 or key.dim() != 4 or value.shape != key.shape or query.shape[1] % key.shape[1]:
        raise ValueError(f"fp8_attention_triton: query (B, Hq, Q, D) and key/value (B, Hkv, K, D) with Hq a multiple "
                         f"of Hkv, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")  # fmt: skip
    why = declines(query, key, mask, causal)
    if why is None and mask is not None and causal:
        why = "causal=True with a mask (put the causality into the boolean mask)"
    if why is not None:
        raise ValueError(f"fp8_attention_triton cannot take {why}; use hf_fp8.attention.fp8_attention_reference")
    return _TritonFP8Attention.apply(query, key, value, mask, softmax_scale, causal, state, record, out_dtype or query.dtype)
