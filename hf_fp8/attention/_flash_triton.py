"""Triton kernels of hf_fp8's FP8 flash attention (imported only where Triton is; the wrapper is
`triton_flash.py`, the numerics `reference.py` with `fp8_outputs=False`).

All six GEMMs take FP8 operands and accumulate in FP32:
    forward   S = Q8 K8^T,  O += E8 V8                       (E8 = E * 448 in E4M3, E in [0, 1])
    backward  S recomputed; dV += P8^T dO8;  dP = dO8 V8^T;  dQ += dS8 K8;  dK += dS8^T Q8
The FP8 inputs come with per-tensor scales (the tensors hold x * scale); every product is
descaled once, in FP32, after its GEMM. Outputs (O, dQ, dK, dV) are written in the model's dtype;
the kernels also max-reduce |O|, |dS|, |dQ|, |dK|, |dV| (before rounding) into int32 bit patterns
(for non-negative floats integer order is float order, and NaN's bits exceed +inf's, so a NaN
shows up in the amax as it does in torch.amax).

Softmax runs in base 2: s2 = S * softmax_scale * log2(e), E = exp2(s2 - running row max), and the
forward stores lse2 = row max + log2(row sum) per query so the backward recomputes P = exp2(s2 - lse2)
exactly normalized. A query row with no visible key gets lse2 = +inf, so its P is 0 everywhere.

Masking: `CAUSAL` (query i sees keys 0..i, equal lengths) skips the blocks above the diagonal;
`HAS_MASK` reads a boolean (True = attend) mask tile broadcast over batch/head by zero strides.

Tensors are indexed by explicit (batch, head, sequence, dim) strides, so the transposed views a
HF attention layer hands over are read in place. The GEMMs that reduce over the sequence (E8 V8,
P8^T dO8, dS8^T Q8, dS8 K8) read second, sequence-contiguous copies the wrapper makes: Hopper's FP8
tensor-core GEMM wants both operands contiguous along the reduced dim. Layouts per program are in
the comments.
"""

import triton
import triton.language as tl

from .._cast_triton import _amax_bits, _to_fp8  # the linears' cast kernel's amax and cast

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _visible(rows, cols, q_len, kv_len, mask_ptr, stride_mm, stride_mn, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """(len(rows), len(cols)) bool: may query `rows` attend to key `cols` (both may run past the end).
    Queries past the end come out as they may (their loads give lse2 = +inf, P = 0, or they are not
    stored), but the mask is only read inside its bounds."""
    ok = (rows[:, None] >= 0) & (cols[None, :] < kv_len)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if HAS_MASK:
        inside = ok & (rows[:, None] < q_len)
        m = tl.load(mask_ptr + rows[:, None] * stride_mm + cols[None, :] * stride_mn, mask=inside, other=0)
        ok = inside & (m != 0)
    return ok


@triton.jit
def _key_ranges(start_m, kv_len, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):  # fmt: skip
    """(full_end, end) for the query block starting at start_m: key blocks [0, full_end) need no
    per-element check, [full_end, end) do (the mask, the causal diagonal, or the last partial block)."""
    if HAS_MASK:
        return 0, kv_len
    elif CAUSAL:  # keys below the block's first query are all visible; none past its last
        return start_m, tl.minimum(start_m + BLOCK_M, kv_len)
    else:
        return (kv_len // BLOCK_N) * BLOCK_N, kv_len


# ---- forward --------------------------------------------------------------------------------------


@triton.jit
def _fwd_blocks(acc, row_max, row_sum, q8, k_base, v_base, stride_kn, stride_vn, stride_vd, offs_m, offs_d,
                lo, hi, q_len, kv_len, mask_ptr, stride_mm, stride_mn, qk_scale2,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Online softmax over key blocks [lo, hi). MASKED: check bounds/causality/mask per element."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_keys = offs_n < kv_len
        k8 = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_keys[:, None], other=0.0)
        v8 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=in_keys[:, None], other=0.0)
        s2 = tl.dot(q8, tl.trans(k8)) * qk_scale2  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            ok = _visible(offs_m, offs_n, q_len, kv_len, mask_ptr, stride_mm, stride_mn, CAUSAL, HAS_MASK)
            s2 = tl.where(ok, s2, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s2, axis=1))
        # A row that has seen no visible key yet keeps max -inf; subtract 0 there (E = 0, not NaN).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        e = tl.math.exp2(s2 - shift[:, None])  # (BLOCK_M, BLOCK_N) in [0, 1]
        alpha = tl.math.exp2(tl.where(row_max == float("-inf"), 0.0, row_max) - shift)
        row_sum = row_sum * alpha + tl.sum(e, axis=1)
        e8 = (e * 448.0).to(tl.float8e4nv)  # E4M3's max: E's row max 1 maps to 448, no saturation
        acc = acc * alpha[:, None] + tl.dot(e8, v8, max_num_imprecise_acc=BLOCK_N)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _query_block(n_heads, groups, q_len, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's BLOCK_M queries of one (batch, query head), from its program ids: (start_m,
    bh = batch * n_heads + head, b, h, the KV head hkv of h, offs_m, offs_d, in_rows)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    return start_m, bh, b, h, h // groups, offs_m, tl.arange(0, HEAD_DIM), offs_m < q_len


@triton.jit
def _load_scales(scales_ptr, softmax_scale):
    """scales [sq, sk, sv, ...] -> (sq, sk, sv, qk_scale2): exp2(S8 * qk_scale2) is softmax's exp of
    the dequantized, softmax-scaled scores."""
    sq, sk, sv = tl.load(scales_ptr), tl.load(scales_ptr + 1), tl.load(scales_ptr + 2)
    return sq, sk, sv, softmax_scale * LOG2E / (sq * sk)


@triton.jit
def _load_grad_scales(scales_ptr, sv):
    """scales [.., .., .., sdo, s_ds] -> (sdo, s_ds, dp_descale = 1 / (sv sdo), which turns dO8 V8^T into dP)."""
    sdo, s_ds = tl.load(scales_ptr + 3), tl.load(scales_ptr + 4)
    return sdo, s_ds, 1.0 / (sv * sdo)


@triton.jit
def fp8_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr, scales_ptr, amax_bits_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_mb, stride_mh, stride_mm, stride_mn,
    n_heads, groups, q_len, kv_len, softmax_scale,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries of one (batch, query head). q8 (B, Hq, Q, D), k8/v8 (B, Hkv, K, D),
    # last dim contiguous (v8: any strides); o (B, Hq, Q, D) model dtype; lse (B, Hq, Q) fp32; scales [sq, sk, sv].
    start_m, bh, b, h, hkv, offs_m, offs_d, in_rows = _query_block(n_heads, groups, q_len, BLOCK_M, HEAD_DIM)
    sq, sk, sv, qk_scale2 = _load_scales(scales_ptr, softmax_scale)
    q8 = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                 mask=in_rows[:, None], other=0.0)  # fmt: skip
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end, end = _key_ranges(start_m, kv_len, CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N)
    acc, row_max, row_sum = _fwd_blocks(
        acc, row_max, row_sum, q8, k_base, v_base, stride_kn, stride_vn, stride_vd, offs_m, offs_d, 0, full_end, q_len, kv_len,
        mask_base, stride_mm, stride_mn, qk_scale2, CAUSAL, HAS_MASK, False, BLOCK_N, HEAD_DIM,
    )  # fmt: skip
    acc, row_max, row_sum = _fwd_blocks(
        acc, row_max, row_sum, q8, k_base, v_base, stride_kn, stride_vn, stride_vd, offs_m, offs_d, full_end, end, q_len, kv_len,
        mask_base, stride_mm, stride_mn, qk_scale2, CAUSAL, HAS_MASK, True, BLOCK_N, HEAD_DIM,
    )  # fmt: skip

    # O = (E8 V8) / (448 sv) / rowsum; rows with no visible key have rowsum 0 and acc 0: O = 0.
    out = acc / (448.0 * sv) / tl.maximum(row_sum, 1.1754943508222875e-38)[:, None]
    tl.atomic_max(amax_bits_ptr, _amax_bits(tl.where(in_rows[:, None], out, 0.0)))
    o_ptrs = o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=in_rows[:, None])
    lse2 = tl.where(row_sum > 0, row_max + tl.math.log2(row_sum), float("inf"))
    tl.store(lse_ptr + bh * q_len + offs_m, lse2, mask=in_rows)


# ---- backward -------------------------------------------------------------------------------------


@triton.jit
def fp8_attention_bwd_delta_kernel(
    o_ptr, do_ptr, delta_ptr, scales_ptr, stride_ob, stride_oh, stride_om, stride_db, stride_dh, stride_dm,
    n_heads, q_len, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # delta_i = rowsum(dO_i * O_i), dO as its FP8 values (dO8 / sdo), O as the forward returned it.
    bh = tl.program_id(1)
    b, h = bh // n_heads, bh % n_heads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < q_len
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=rows, other=0.0)
    do8 = tl.load(do_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :], mask=rows, other=0.0)
    sdo = tl.load(scales_ptr + 3)
    delta = tl.sum(do8.to(tl.float32) * o.to(tl.float32), axis=1) / sdo
    tl.store(delta_ptr + bh * q_len + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _dkdv_blocks(dk, dv, ds_bits, k8, v8, q_base, do_base, qt_base, dot_base, lse_base, delta_base, stride_qm, stride_dm,
                 stride_qtm, stride_qtd, stride_dtm, stride_dtd, offs_n, offs_d, lo, hi, q_len, kv_len,
                 mask_base, stride_mm, stride_mn,
                 qk_scale2, softmax_scale, dp_descale, s_ds, ds_max,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr, EVEN_N: tl.constexpr,
                 BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Accumulate dK, dV of one key block (BLOCK_N keys) over query blocks [lo, hi) of one head.
    Works on transposed tiles (keys x queries) so both accumulations are (keys x D) GEMMs.
    Q and dO tiles are read twice: head-dim-contiguous for the GEMMs that reduce over D, and from
    sequence-contiguous copies (qt, dot) for the ones that reduce over queries, because Hopper's FP8
    tensor-core GEMM wants both operands contiguous along the reduced dim (K-major).
    MASKED: apply causality/the mask per element; keys past kv_len are dropped unless EVEN_N."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_rows = offs_m < q_len
        q8 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=in_rows[:, None], other=0.0)
        do8 = tl.load(do_base + offs_m[:, None] * stride_dm + offs_d[None, :], mask=in_rows[:, None], other=0.0)
        lse2 = tl.load(lse_base + offs_m, mask=in_rows, other=float("inf"))  # (BLOCK_M,); +inf: P = 0
        delta = tl.load(delta_base + offs_m, mask=in_rows, other=0.0)
        s2_t = tl.dot(k8, tl.trans(q8)) * qk_scale2  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s2_t - lse2[None, :])
        if MASKED:
            ok = _visible(offs_m, offs_n, q_len, kv_len, mask_base, stride_mm, stride_mn, CAUSAL, HAS_MASK)
            p_t = tl.where(tl.trans(ok), p_t, 0.0)
        elif not EVEN_N:
            p_t = tl.where(offs_n[:, None] < kv_len, p_t, 0.0)
        p8_t = (p_t * 448.0).to(tl.float8e4nv)
        do8_k = tl.load(dot_base + offs_m[:, None] * stride_dtm + offs_d[None, :] * stride_dtd, mask=in_rows[:, None], other=0.0)
        dv += tl.dot(p8_t, do8_k, max_num_imprecise_acc=BLOCK_M)  # (BLOCK_N, D), times 448 sdo
        dp_t = tl.dot(v8, tl.trans(do8)) * dp_descale  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :]) * softmax_scale
        ds_bits = tl.maximum(ds_bits, _amax_bits(ds_t))
        ds8_t = _to_fp8(ds_t, s_ds, ds_max, do8.dtype)
        q8_k = tl.load(qt_base + offs_m[:, None] * stride_qtm + offs_d[None, :] * stride_qtd, mask=in_rows[:, None], other=0.0)
        dk += tl.dot(ds8_t, q8_k, max_num_imprecise_acc=BLOCK_M)  # (BLOCK_N, D), times s_ds sq
    return dk, dv, ds_bits


@triton.jit
def fp8_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, qt_ptr, dot_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, mask_ptr, scales_ptr, amax_bits_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm, stride_qtb, stride_qth, stride_qtm, stride_qtd, stride_dtb, stride_dth, stride_dtm, stride_dtd,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mh, stride_mm, stride_mn,
    n_kv_heads, groups, q_len, kv_len, softmax_scale, ds_max,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program: dK, dV of BLOCK_N keys of one (batch, KV head), summed over the `groups` query
    # heads that share it (GQA), so no reduction pass follows. q8/do8 (B, Hq, Q, D), k8/v8 and
    # dk/dv (B, Hkv, K, D), lse/delta (B, Hq, Q) fp32. scales: [sq, sk, sv, sdo, s_ds];
    # amax_bits: [O, dS, dQ, dK, dV]. CAUSAL needs BLOCK_N a multiple of BLOCK_M.
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b, hkv = bh // n_kv_heads, bh % n_kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    in_keys = offs_n < kv_len
    sq, sk, sv, qk_scale2 = _load_scales(scales_ptr, softmax_scale)
    sdo, s_ds, dp_descale = _load_grad_scales(scales_ptr, sv)
    k8 = tl.load(k_ptr + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                 mask=in_keys[:, None], other=0.0)  # fmt: skip
    v8 = tl.load(v_ptr + b * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                 mask=in_keys[:, None], other=0.0)  # fmt: skip

    # Query blocks checked per element: all (mask), the diagonal band (causal: queries before the
    # key block see none of it, queries after it see all of it), or none.
    if HAS_MASK:
        masked_lo, masked_hi, full_lo = 0, q_len, q_len
    elif CAUSAL:
        masked_lo, masked_hi, full_lo = start_n, tl.minimum(start_n + BLOCK_N, q_len), start_n + BLOCK_N
    else:
        masked_lo, masked_hi, full_lo = 0, 0, 0
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    ds_bits = tl.zeros([], dtype=tl.int32)
    for g in range(groups):
        h = hkv * groups + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_db + h * stride_dh
        qt_base = qt_ptr + b * stride_qtb + h * stride_qth
        dot_base = dot_ptr + b * stride_dtb + h * stride_dth
        row_base = (b * n_kv_heads * groups + h) * q_len
        mask_base = mask_ptr + b * stride_mb + h * stride_mh
        dk, dv, ds_bits = _dkdv_blocks(
            dk, dv, ds_bits, k8, v8, q_base, do_base, qt_base, dot_base, lse_ptr + row_base, delta_ptr + row_base,
            stride_qm, stride_dm, stride_qtm, stride_qtd, stride_dtm, stride_dtd, offs_n, offs_d, masked_lo, masked_hi,
            q_len, kv_len, mask_base, stride_mm, stride_mn, qk_scale2,
            softmax_scale, dp_descale, s_ds, ds_max, CAUSAL, HAS_MASK, True, EVEN_N, BLOCK_M, HEAD_DIM,
        )  # fmt: skip
        dk, dv, ds_bits = _dkdv_blocks(
            dk, dv, ds_bits, k8, v8, q_base, do_base, qt_base, dot_base, lse_ptr + row_base, delta_ptr + row_base,
            stride_qm, stride_dm, stride_qtm, stride_qtd, stride_dtm, stride_dtd, offs_n, offs_d, full_lo, q_len,
            q_len, kv_len, mask_base, stride_mm, stride_mn, qk_scale2,
            softmax_scale, dp_descale, s_ds, ds_max, CAUSAL, HAS_MASK, False, EVEN_N, BLOCK_M, HEAD_DIM,
        )  # fmt: skip

    dk = dk / (s_ds * sq)
    dv = dv / (448.0 * sdo)
    keep = in_keys[:, None]
    tl.atomic_max(amax_bits_ptr + 1, ds_bits)
    tl.atomic_max(amax_bits_ptr + 3, _amax_bits(tl.where(keep, dk, 0.0)))
    tl.atomic_max(amax_bits_ptr + 4, _amax_bits(tl.where(keep, dv, 0.0)))
    tl.store(dk_ptr + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=keep)  # fmt: skip
    tl.store(dv_ptr + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=keep)  # fmt: skip


@triton.jit
def _dq_blocks(dq, q8, do8, lse2, delta, k_base, v_base, kt_base, stride_kn, stride_vn, stride_ktn, stride_ktd,
               offs_m, offs_d, lo, hi, q_len, kv_len, mask_base, stride_mm, stride_mn, qk_scale2, softmax_scale,
               dp_descale, s_ds, ds_max,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """Accumulate dQ of one query block over key blocks [lo, hi). K tiles are read twice, as in
    _dkdv_blocks: head-dim-contiguous for S, from the sequence-contiguous copy kt for dQ."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_keys = offs_n < kv_len
        k8 = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=in_keys[:, None], other=0.0)
        v8 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_keys[:, None], other=0.0)
        p = tl.math.exp2(tl.dot(q8, tl.trans(k8)) * qk_scale2 - lse2[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            ok = _visible(offs_m, offs_n, q_len, kv_len, mask_base, stride_mm, stride_mn, CAUSAL, HAS_MASK)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do8, tl.trans(v8)) * dp_descale
        ds = p * (dp - delta[:, None]) * softmax_scale
        ds8 = _to_fp8(ds, s_ds, ds_max, do8.dtype)
        k8_k = tl.load(kt_base + offs_n[:, None] * stride_ktn + offs_d[None, :] * stride_ktd, mask=in_keys[:, None], other=0.0)
        dq += tl.dot(ds8, k8_k, max_num_imprecise_acc=BLOCK_N)  # (BLOCK_M, D), times s_ds sk
    return dq


@triton.jit
def fp8_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, kt_ptr, lse_ptr, delta_ptr, dq_ptr, mask_ptr, scales_ptr, amax_bits_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm, stride_ktb, stride_kth, stride_ktn, stride_ktd, stride_dqb, stride_dqh, stride_dqm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    n_heads, groups, q_len, kv_len, softmax_scale, ds_max,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One program: dQ of BLOCK_M queries of one (batch, query head).
    start_m, bh, b, h, hkv, offs_m, offs_d, in_rows = _query_block(n_heads, groups, q_len, BLOCK_M, HEAD_DIM)
    sq, sk, sv, qk_scale2 = _load_scales(scales_ptr, softmax_scale)
    sdo, s_ds, dp_descale = _load_grad_scales(scales_ptr, sv)
    q8 = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                 mask=in_rows[:, None], other=0.0)  # fmt: skip
    do8 = tl.load(do_ptr + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :],
                  mask=in_rows[:, None], other=0.0)  # fmt: skip
    lse2 = tl.load(lse_ptr + bh * q_len + offs_m, mask=in_rows, other=float("inf"))
    delta = tl.load(delta_ptr + bh * q_len + offs_m, mask=in_rows, other=0.0)
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    kt_base = kt_ptr + b * stride_ktb + hkv * stride_kth
    mask_base = mask_ptr + b * stride_mb + h * stride_mh

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full_end, end = _key_ranges(start_m, kv_len, CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N)
    dq = _dq_blocks(dq, q8, do8, lse2, delta, k_base, v_base, kt_base, stride_kn, stride_vn, stride_ktn, stride_ktd,
                    offs_m, offs_d, 0, full_end, q_len, kv_len, mask_base, stride_mm, stride_mn, qk_scale2,
                    softmax_scale, dp_descale, s_ds, ds_max, CAUSAL, HAS_MASK, False, BLOCK_N, HEAD_DIM)  # fmt: skip
    dq = _dq_blocks(dq, q8, do8, lse2, delta, k_base, v_base, kt_base, stride_kn, stride_vn, stride_ktn, stride_ktd,
                    offs_m, offs_d, full_end, end, q_len, kv_len, mask_base, stride_mm, stride_mn, qk_scale2,
                    softmax_scale, dp_descale, s_ds, ds_max, CAUSAL, HAS_MASK, True, BLOCK_N, HEAD_DIM)  # fmt: skip
    dq = dq / (s_ds * sk)
    tl.atomic_max(amax_bits_ptr + 2, _amax_bits(tl.where(in_rows[:, None], dq, 0.0)))
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=in_rows[:, None])  # fmt: skip
