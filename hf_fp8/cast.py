"""The FP8 cast of a 2D tensor with a known scale: the FP8 tensor, optionally its transposed copy,
and the amax of the input.

Hopper's FP8 GEMM wants both operands K-major, so the weight-gradient GEMM needs the activations
and gradients transposed, in FP8. Two implementations with the same numerics (bit for bit):

  cast_fp8_reference  plain PyTorch. CPU runs it, and it is what torch.compile sees: inductor fuses
                      it with the op that produces x (and the amax with it, see scaling.amax_of)
                      and writes both layouts from one kernel.
  cast_fp8_fused      one Triton kernel (CUDA, FP8-capable GPUs, eager mode): reads x once,
                      writes the FP8 tensor and its transposed copy, and max-reduces |x| with
                      atomics. In eager mode the reference is ~8 full-tensor passes with FP32
                      intermediates, and aten's transposing copy of a 1-byte tensor is slow (H200,
                      16384 x 8192: 865 us, against 84 us as a tiled Triton copy).

`fused_cast_applies(x)` says which one a call gets. Under torch.compile on such GPUs, an inductor
pass (hf_fp8._inductor_pass, installed on import) also drops the reference's clamp where the
generated conversion saturates by itself. Set HF_FP8_FUSED_CAST=0 to always use the reference as it
is (A/B comparisons; the Triton kernel is tested against it on the GPU).
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from . import _inductor_pass
from ._ops import define_op
from ._torchao import to_fp8_saturated
from .scaling import amax_of, memory_order

FUSED_CAST_ENABLED = os.environ.get("HF_FP8_FUSED_CAST", "1") != "0"
if FUSED_CAST_ENABLED:
    _inductor_pass.install()
# Tile of the Triton kernel: 64 x 64 elements, small enough that the transposed store is coalesced
# through shared memory; one amax atomic per tile.
_BLOCK = 64


def to_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """saturate(x * scale) in `dtype`, x upcast to FP32 first, rounded to nearest even: torchao's
    hp_tensor_and_scale_to_float8 expression, which every FP8 cast of hf_fp8 computes."""
    return to_fp8_saturated(x.float() * scale, dtype)


def cast_fp8_reference(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transposed: bool):
    """(y, y_t): y = to_fp8(x, scale, dtype), y_t = y.T contiguous (or None)."""
    y = to_fp8(x, scale, dtype)
    return y, (y.t().contiguous() if transposed else None)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def triton_fp8_unavailable(device_index: int) -> str | None:
    """Why hf_fp8's Triton FP8 kernels (this cast, the flash attention) cannot run on CUDA device
    `device_index`, or None: FP8 conversions and FP8 tensor-core GEMMs need compute capability 8.9
    (Ada) or newer, and Triton itself."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < (8, 9):
        return f"compute capability {major}.{minor} (FP8 tensor cores need 8.9+)"
    return None


def fused_cast_applies(x: torch.Tensor) -> bool:
    """True when `cast_fp8_fused` handles x: eager mode (not while torch.compile traces) and an
    eligible tensor (`_eligible`)."""
    return FUSED_CAST_ENABLED and not torch.compiler.is_compiling() and _eligible(x)


def _eligible(x: torch.Tensor) -> bool:
    """A real CUDA tensor (not a fake/functional one), 2D contiguous, BF16/FP16/FP32, on a GPU where
    Triton converts to FP8."""
    return (
        type(x) in (torch.Tensor, nn.Parameter)
        and x.is_cuda
        and x.dim() == 2
        and x.is_contiguous()
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and triton_fp8_unavailable(_index(x.device)) is None
    )


def describe(device: torch.device) -> str:
    """Which cast FP8 layers on `device` run, one line for FP8Report."""
    compiled = "under torch.compile the reference"
    if FUSED_CAST_ENABLED and _inductor_pass.installed() and _inductor_pass.converts_saturating(device):
        compiled += " without its clamp (the generated conversion saturates; hf_fp8's inductor pass)"
    compiled += ", fused by inductor into the kernels around it"
    if FUSED_CAST_ENABLED:
        compiled += (", but weights once the delayed scales are known: one pass writing both layouts and the amax "
                     "(hf_fp8's cast_weight_fp8 op" + (", the Triton kernel)" if device.type == "cuda" else ")"))
    if device.type != "cuda":
        why = f"{device.type} device"
    elif not FUSED_CAST_ENABLED:
        why = "HF_FP8_FUSED_CAST=0"
    elif triton_fp8_unavailable(_index(device)) is not None:
        why = "needs Triton and a GPU of compute capability 8.9+"
    else:
        return (f"eager: one Triton kernel per cast (cast, amax and transposed copy; FP32 tensors: a second one "
                f"for the transposed copy), once the delayed scales are known, else the reference; {compiled}")
    return f"eager: the PyTorch reference ({why}); {compiled}"


def cast_fp8_fused(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transposed: bool,
                   record_into: tuple[torch.Tensor, ...] = ()):  # fmt: skip
    """(y, y_t, amax) from one read of x: `cast_fp8_reference(x, scale, dtype, transposed)` and
    max(|x|) as a float32 scalar tensor (NaN if x has a NaN, as scaling.amax_of). x: 2D contiguous
    CUDA (see fused_cast_applies); scale: float32 scalar tensor on x's device.

    `record_into`: up to two float32 0-dim tensors (pending amaxes of a scaling state, each >= 0,
    NaN, or -1 for none recorded) that the kernel max-reduces the amax into, as
    `scaling.record_amax` would; amax is then None. In eager mode this saves the launches of a
    scratch buffer and of the max-and-copy per cast (host time, which bounds eager training with
    small micro-batches)."""
    from ._cast_triton import cast_fp8_kernel

    if len(record_into) > 2 or any(p.dtype != torch.float32 or p.dim() != 0 for p in record_into):
        raise ValueError("cast_fp8_fused: record_into takes at most two float32 0-dim tensors")
    rows, cols = x.shape
    y = torch.empty(rows, cols, dtype=dtype, device=x.device)
    y_t = torch.empty(cols, rows, dtype=dtype, device=x.device) if transposed else None
    # |x| as int32 bit patterns: for non-negative floats integer order is float order (see the kernel).
    targets = [p.view(torch.int32) for p in record_into] or [torch.zeros((), dtype=torch.int32, device=x.device)]
    if not x.numel():
        for p in record_into:  # an empty tensor's amax is 0, as amax_of gives
            p.clamp_(min=0.0)
    else:
        grid = (_cdiv(rows, _BLOCK), _cdiv(cols, _BLOCK))
        # FP32 input (master weights under autocast): the kernel's transposed store came out wrong for
        # it on the H200 with Triton 3.6 (elements swapped within groups of four; BF16/FP16 bit-exact),
        # so the transposed copy is a second kernel, a byte transpose of y.
        one_pass = transposed and x.dtype != torch.float32
        cast_fp8_kernel[grid](
            x, y, y_t if one_pass else y, scale.reshape(1), targets[0], targets[-1], rows, cols,
            torch.finfo(dtype).max, TRANSPOSED=one_pass, TWO_AMAXES=len(targets) == 2, BLOCK_M=_BLOCK, BLOCK_N=_BLOCK,
        )  # fmt: skip
        if transposed and not one_pass:
            transpose_bytes(y, y_t)
    return y, y_t, (None if record_into else targets[0].view(torch.float32))


# Tile of the byte transpose: 64 source rows x 128 columns. On the H200 (RESULTS (32), 16384-row
# tensors of 1024-14336 columns) 12-15% faster than 64 x 64, within 3% of the best tile of each shape.
_TRANSPOSE_BLOCK_M, _TRANSPOSE_BLOCK_N = 64, 128


def transpose_bytes(y: torch.Tensor, y_t: torch.Tensor) -> None:
    """y_t = y.T for a 2D row-major CUDA tensor of 1-byte elements (FP8) into row-major y_t, with one
    tiled Triton kernel (aten's transposing copy of 1-byte data is several times slower)."""
    from ._cast_triton import transpose_bytes_kernel

    rows, cols = y.shape
    grid = (_cdiv(rows, _TRANSPOSE_BLOCK_M), _cdiv(cols, _TRANSPOSE_BLOCK_N))
    transpose_bytes_kernel[grid](
        y.view(torch.uint8), y_t.view(torch.uint8), rows, cols, BLOCK_M=_TRANSPOSE_BLOCK_M, BLOCK_N=_TRANSPOSE_BLOCK_N
    )


def _transpose_fp8(y: torch.Tensor) -> torch.Tensor:
    """y.T as a new row-major tensor, for a 2D FP8 tensor: the transposed copy of an FP8 input or
    grad-output that the grad-weight GEMM reads (hf_fp8.linear, from _TRANSPOSE_OP_MIN_TOKENS
    tokens). An opaque op (`transpose_fp8`), so torch.compile neither fuses the transposed store into
    the kernel that produces y nor repeats it per consumer. Fused, inductor stores it from a row-wise
    reduction kernel one byte per token row: the q/k/v input's copy was recomputed in backward and
    stored three times from the RMSNorm-backward kernel (H200, 1.5B shape, 4096-token batches: 0.37
    ms per layer, ~10% of the step), and the SwiGLU backward storing three copies (the down
    projection's input, recomputed, and the gate/up grad-outputs) took 1.37 ms per layer at the 8B
    slice, against 0.74 ms without them and ~0.12 ms per copy here. On CUDA with Triton: one tiled
    kernel; elsewhere aten's copy (the same bytes).

    Tagged `flexible_layout`: inductor then hands the op the buffer the cast wrote instead of a
    stride-fixed copy of its own. With the default constraint, y, also read by a `_scaled_mm` (which
    has its own), was written twice by the producing kernel, once per consumer (H200, 8B slice: six
    FP8 tensors per layer; ~0.05 ms per step). Any layout works here (`.contiguous()` above)."""
    y_t = torch.empty(y.shape[1], y.shape[0], dtype=y.dtype, device=y.device)
    if y.is_cuda and y.numel() and triton_fp8_unavailable(_index(y.device)) is None:
        transpose_bytes(y.contiguous(), y_t)
    else:
        y_t.copy_(y.t())
    return y_t


transpose_fp8 = define_op(
    "transpose_fp8(Tensor y) -> Tensor",
    {"CompositeExplicitAutograd": _transpose_fp8},  # every device; the kernel picks Triton on CUDA
    fake=lambda y: y.new_empty(y.shape[1], y.shape[0]),
    tags=(torch.Tag.flexible_layout,),
)


def _cast_weight_fp8(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """(w8, w8_t, amax): a 2D weight cast to FP8 with a known `scale` in both layouts from one read,
    and its amax (float32 scalar), the numerics of `cast_fp8_reference` and `scaling.amax_of`. An
    opaque op (`cast_weight_fp8`) for torch.compile, which otherwise casts a weight twice: cast and
    amax in forward, then, since the partitioner recomputes rather than keeps the FP8 copy, the cast
    again with a transposed store in backward (6 bytes moved per parameter where this moves 4). On
    CUDA with Triton: `cast_fp8_fused`; elsewhere the reference expressions."""
    w = w.contiguous()
    if fused_cast_applies(w):  # the op runs eagerly, also inside a compiled graph
        return cast_fp8_fused(w, scale, dtype, transposed=True)
    w8, w8_t = cast_fp8_reference(w, scale, dtype, transposed=True)
    return w8, w8_t, amax_of(w)


cast_weight_fp8 = define_op(
    "cast_weight_fp8(Tensor w, Tensor scale, ScalarType dtype) -> (Tensor, Tensor, Tensor)",
    {"CompositeExplicitAutograd": _cast_weight_fp8},  # every device; the kernel picks Triton on CUDA
    fake=lambda w, scale, dtype: (
        w.new_empty(w.shape, dtype=dtype),
        w.new_empty(w.shape[1], w.shape[0], dtype=dtype),
        w.new_empty((), dtype=torch.float32),
    ),
    tags=(torch.Tag.flexible_layout,),
)


def fused_cast_applies_any_layout(x: torch.Tensor) -> bool:
    """`fused_cast_applies` for a tensor of rank >= 1 stored densely in some dim order, such as
    attention's (B, H, S, D) query, a transposed view of (B, S, H, D) memory."""
    if x.dim() == 0 or not FUSED_CAST_ENABLED or torch.compiler.is_compiling():
        return False
    mem = x.permute(memory_order(x))
    return mem.is_contiguous() and _eligible(mem.reshape(-1, mem.shape[-1]))


def cast_fp8_fused_any_layout(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """(y, amax) with y = the reference cast of x, with x's strides (as the reference gives), from one
    read of x: the kernel runs on x's memory viewed as 2D (see fused_cast_applies_any_layout)."""
    order = memory_order(x)
    mem = x.permute(order)
    y, _, amax = cast_fp8_fused(mem.reshape(-1, mem.shape[-1]), scale, dtype, transposed=False)
    return y.view(mem.shape).permute([order.index(d) for d in range(x.dim())]), amax


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
