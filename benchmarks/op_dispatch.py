"""Host cost per call of hf_fp8's Library-defined `hf_fp8::transpose_fp8` against the same kernel
defined with `torch.library.custom_op` (what hf_fp8 used before) and against calling the Python
kernel directly, on a small FP8 tensor (host time dominates). Why hf_fp8._ops exists.

    python3 benchmarks/op_dispatch.py [--device cuda] [--calls 20000]
"""

import argparse
import statistics
import time

import torch

from hf_fp8 import cast


@torch.library.custom_op("hf_fp8_bench::transpose_fp8_custom_op", mutates_args=())
def transpose_as_custom_op(y: torch.Tensor) -> torch.Tensor:
    return cast._transpose_fp8(y)


def us_per_call(fn, y, calls: int, repeats: int = 5) -> float:
    """Median over `repeats` of the mean host time of `calls` back-to-back calls, in microseconds."""
    for _ in range(200):
        fn(y)
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(y)
        means.append((time.perf_counter() - start) / calls * 1e6)
    if y.is_cuda:
        torch.cuda.synchronize()
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    y = (torch.randn(64, 64) * 8).to(args.device, torch.float8_e4m3fn)
    rows = [
        ("python kernel, no op", cast._transpose_fp8),
        ("torch.library.custom_op", transpose_as_custom_op),
        ("hf_fp8 Library op", cast.transpose_fp8),
    ]
    print(f"torch {torch.__version__}, device {args.device}, 64 x 64 FP8, {args.calls} calls")
    print(f"{'transpose_fp8 as':26} {'us per call':>11}")
    for name, fn in rows:
        print(f"{name:26} {us_per_call(fn, y, args.calls):11.1f}")


if __name__ == "__main__":
    main()
