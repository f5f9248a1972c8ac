"""Tiles of hf_fp8's two Triton byte-moving kernels (GPU): which tile and warp count moves the bytes
fastest, each variant checked bit for bit against the reference first.

  cast   `cast_fp8_kernel` with the transposed store, BF16 -> E4M3, on the weight shapes of the 8B
         and 1.5B Llama (under torch.compile it casts every weight once per step, both layouts and
         the amax: `cast_weight_fp8`); 4 bytes moved per element.
  transpose  `transpose_bytes_kernel` on FP8 activations and gradients of 16384 tokens (the 44
         transposed copies of an 8B-slice step); 2 bytes moved per element.

Each call is timed alone between CUDA events; with --after-gemm an FP8 GEMM of the 8B MLP's size
runs right before each timed call (outside the events), so the kernel starts at the clocks it meets
inside a training step, where FP8 GEMMs draw the most power (RESULTS (38): kernels bound by
instructions run up to 30% slower there than alone).

  python3 benchmarks/cast_tiles.py [--after-gemm] [--kernels cast,transpose]
"""

from __future__ import annotations

import argparse

import torch
from _cuda_timing import median_us

from hf_fp8.cast import cast_fp8_reference

E4M3 = torch.float8_e4m3fn
CAST_SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (8192, 2048), (2048, 8192), (2048, 2048)]
TRANSPOSE_SHAPES = [(16384, 14336), (16384, 4096), (16384, 1024), (16384, 8192), (16384, 2048)]
# (BLOCK_M, BLOCK_N, num_warps); the first of each list is what hf_fp8 uses.
CAST_TILES = [(64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 128, 4), (128, 128, 8), (64, 256, 4), (64, 256, 8), (32, 256, 4)]
TRANSPOSE_TILES = [(64, 128, 4), (128, 128, 4), (128, 128, 8), (64, 256, 4), (128, 256, 8), (256, 128, 8), (64, 64, 4)]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cast_variant(x, scale, bm, bn, warps):
    from hf_fp8._cast_triton import cast_fp8_kernel

    rows, cols = x.shape
    y = torch.empty(rows, cols, dtype=E4M3, device=x.device)
    y_t = torch.empty(cols, rows, dtype=E4M3, device=x.device)
    amax = torch.zeros((), dtype=torch.int32, device=x.device)

    def run():
        cast_fp8_kernel[(_cdiv(rows, bm), _cdiv(cols, bn))](
            x, y, y_t, scale.reshape(1), amax, amax, rows, cols, torch.finfo(E4M3).max,
            TRANSPOSED=True, TWO_AMAXES=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        )  # fmt: skip

    return run, (y, y_t, amax)


def transpose_variant(y, bm, bn, warps):
    from hf_fp8._cast_triton import transpose_bytes_kernel

    rows, cols = y.shape
    y_t = torch.empty(cols, rows, dtype=y.dtype, device=y.device)

    def run():
        transpose_bytes_kernel[(_cdiv(rows, bm), _cdiv(cols, bn))](
            y.view(torch.uint8), y_t.view(torch.uint8), rows, cols, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps
        )

    return run, y_t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--after-gemm", action="store_true", help="an FP8 GEMM right before each timed call")
    ap.add_argument("--kernels", default="cast,transpose")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    before = None
    if args.after_gemm:
        a = torch.randn(16384, 4096, device="cuda", generator=gen).to(E4M3)
        b = torch.randn(14336, 4096, device="cuda", generator=gen).to(E4M3).t()
        one = torch.ones((), device="cuda")

        def before():
            torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    print(f"{'kernel':<10} {'shape':>13} {'tile':>12} {'us':>8} {'TB/s':>6} {'vs first':>8}")
    if "cast" in args.kernels:
        scale = torch.tensor(37.0, device="cuda")
        for shape in CAST_SHAPES:
            x = (torch.randn(shape, device="cuda", generator=gen) * 3).to(torch.bfloat16)
            ref, ref_t = cast_fp8_reference(x, scale, E4M3, transposed=True)
            first = None
            for bm, bn, warps in CAST_TILES:
                run, (y, y_t, amax) = cast_variant(x, scale, bm, bn, warps)
                run()
                exact = torch.equal(y.view(torch.uint8), ref.view(torch.uint8)) and torch.equal(
                    y_t.view(torch.uint8), ref_t.view(torch.uint8)) and amax.view(torch.float32) == x.abs().max().float()  # fmt: skip
                us = median_us(run, before=before)
                first = first or us
                tb = x.numel() * 4 / us / 1e6
                flag = "" if exact else "  MISMATCH"
                print(f"{'cast':<10} {str(shape):>13} {f'{bm}x{bn}/{warps}':>12} {us:8.1f} {tb:6.2f} {first / us:8.3f}{flag}", flush=True)
    if "transpose" in args.kernels:
        for shape in TRANSPOSE_SHAPES:
            y = torch.randn(shape, device="cuda", generator=gen).to(E4M3)
            ref_t = y.view(torch.uint8).t().contiguous()
            first = None
            for bm, bn, warps in TRANSPOSE_TILES:
                run, y_t = transpose_variant(y, bm, bn, warps)
                run()
                exact = torch.equal(y_t.view(torch.uint8), ref_t)
                us = median_us(run, before=before)
                first = first or us
                tb = y.numel() * 2 / us / 1e6
                flag = "" if exact else "  MISMATCH"
                print(f"{'transpose':<10} {str(shape):>13} {f'{bm}x{bn}/{warps}':>12} {us:8.1f} {tb:6.2f} {first / us:8.3f}{flag}", flush=True)


if __name__ == "__main__":
    main()
