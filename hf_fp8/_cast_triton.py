"""Triton kernel of hf_fp8.cast.cast_fp8_fused (imported only on CUDA; its reference is
hf_fp8.cast.cast_fp8_reference, compared bit for bit in tests/test_cast.py on the GPU)."""

import triton
import triton.language as tl


@triton.jit
def _amax_bits(x):
    """max |x| of a 2-D tile as int32 bits. For non-negative floats integer order is float order, and
    a NaN's bits (exponent all ones, mantissa non-zero) exceed +inf's, so one NaN makes the amax NaN,
    as torch.amax does. Callers zero masked-out lanes."""
    return tl.max(tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis=1), axis=0)


@triton.jit
def _to_fp8(x, scale, fp8_max, dtype: tl.constexpr):
    """torchao's cast: FP32 multiply, saturate (NaN stays NaN), round to nearest even."""
    return tl.clamp(x * scale, -fp8_max, fp8_max, propagate_nan=tl.PropagateNan.ALL).to(dtype)


@triton.jit
def cast_fp8_kernel(x_ptr, y_ptr, y_t_ptr, scale_ptr, amax_bits_ptr, amax_bits_ptr2, rows, cols, fp8_max,
                    TRANSPOSED: tl.constexpr, TWO_AMAXES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    # One BLOCK_M x BLOCK_N tile of x (rows x cols, row-major) per program. The amax is max-reduced
    # into the float32 at amax_bits_ptr (as int32 bits), and into a second one when TWO_AMAXES:
    # either a zeroed scratch, or straight into pending amaxes of the scaling state (>= 0 or the
    # -1 "none recorded", whose bits are a negative int32, below every |x|).
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    x = tl.load(x_ptr + r[:, None].to(tl.int64) * cols + c[None, :], mask=mask, other=0.0).to(tl.float32)

    bits = _amax_bits(x)  # masked-out lanes load as 0
    tl.atomic_max(amax_bits_ptr, bits)
    if TWO_AMAXES:
        tl.atomic_max(amax_bits_ptr2, bits)
    y = _to_fp8(x, tl.load(scale_ptr), fp8_max, y_ptr.dtype.element_ty)
    tl.store(y_ptr + r[:, None].to(tl.int64) * cols + c[None, :], y, mask=mask)
    if TRANSPOSED:
        # y_t is cols x rows; Triton stages the tile through shared memory so the store is coalesced.
        tl.store(y_t_ptr + c[None, :].to(tl.int64) * rows + r[:, None], y, mask=mask)


@triton.jit
def transpose_bytes_kernel(y_ptr, y_t_ptr, rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # y (rows x cols, 1-byte elements, row-major) -> y_t (cols x rows), one tile per program.
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r[:, None] < rows) & (c[None, :] < cols)
    tile = tl.load(y_ptr + r[:, None].to(tl.int64) * cols + c[None, :], mask=mask)
    tl.store(y_t_ptr + c[None, :].to(tl.int64) * rows + r[:, None], tile, mask=mask)
