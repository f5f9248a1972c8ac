"""Probe behind RESULTS.md (27): what the FP8 GEMMs of one decoder layer cost with and without Hopper's
fast accumulation, against BF16, and how accurate each is. hf_fp8 (like torchao's tensorwise
default) runs the forward GEMM with fast accumulation and both backward GEMMs without it.

For each linear of a Llama layer (N outputs, K inputs, T tokens) the three training GEMMs:
  fwd     (T, K) e4m3 @ (K, N) e4m3
  dgrad   (T, N) e5m2 @ (N, K) e4m3
  wgrad   (N, T) e5m2 @ (T, K) e4m3          (inner dim = tokens: the longest accumulation)
us per call (median of --iters after warm-up, CUDA events), and the relative error of each FP8 result
against the FP32 product of the same FP8 operands (so only accumulation differs).
Usage (CUDA): python3 benchmarks/gemm_accumulation.py [--shape 8b|1.5b] [--tokens 16384]"""
import argparse
import torch
from _cuda_timing import median_us

E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2
SHAPES = {  # d, FFN, KV width
    "8b": (4096, 14336, 1024),
    "1.5b": (2048, 8192, 1024),
}


def linears(d: int, ffn: int, kv: int) -> list[tuple[str, int, int]]:
    """(name, N, K) of a Llama decoder layer's linears."""
    return [("q", d, d), ("k", kv, d), ("v", kv, d), ("o", d, d), ("gate", ffn, d), ("up", ffn, d), ("down", d, ffn)]


def fp8_operand(rows: int, cols: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A (rows, cols) row-major FP8 tensor of N(0, 1) values cast with a unit scale, and its scale."""
    return torch.randn(rows, cols, device="cuda").to(dtype), torch.ones((), device="cuda")


def gemm_case(m: int, k: int, n: int, a_dtype, b_dtype, warmup: int, iters: int) -> dict:
    a, sa = fp8_operand(m, k, a_dtype)
    b_nk, sb = fp8_operand(n, k, b_dtype)  # stored (N, K): its .t() is the column-major (K, N) operand
    b = b_nk.t()
    exact = a.float() @ b.float()
    row = {}
    for fast in (False, True):
        out = torch._scaled_mm(a, b, sa, sb, out_dtype=torch.float32, use_fast_accum=fast)
        rel = ((out - exact).norm() / exact.norm()).item()
        us = median_us(lambda: torch._scaled_mm(a, b, sa, sb, out_dtype=torch.bfloat16, use_fast_accum=fast), warmup, iters)
        row["fast" if fast else "exact"] = (us, rel)
    a16, b16 = a.to(torch.bfloat16), b_nk.to(torch.bfloat16).t()
    row["bf16"] = (median_us(lambda: a16 @ b16, warmup, iters), None)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    T = args.tokens
    totals = {"fast": 0.0, "exact": 0.0, "bf16": 0.0, "hf_fp8": 0.0}
    print(f"{args.shape}, {T} tokens: us per GEMM (relative error vs FP32 accumulation)")
    print("| linear | GEMM | M x K x N | BF16 | FP8 exact accum | FP8 fast accum | fast / exact |")
    print("|---|---|---|---|---|---|---|")
    for name, n, k in linears(*SHAPES[args.shape]):
        for gemm, (m, kk, nn, ad) in {"fwd": (T, k, n, E4), "dgrad": (T, n, k, E5), "wgrad": (n, T, k, E5)}.items():
            r = gemm_case(m, kk, nn, ad, E4, args.warmup, args.iters)
            (te, ee), (tf, ef), (tb, _) = r["exact"], r["fast"], r["bf16"]
            totals["exact"] += te
            totals["fast"] += tf
            totals["bf16"] += tb
            totals["hf_fp8"] += tf if gemm == "fwd" else te
            print(f"| {name} | {gemm} | {m}x{kk}x{nn} | {tb:.0f} | {te:.0f} ({ee:.1e}) | {tf:.0f} ({ef:.1e}) | {tf / te:.3f} |")
    print(f"layer total us: BF16 {totals['bf16']:.0f}, FP8 all exact {totals['exact']:.0f}, "
          f"hf_fp8 today (fast fwd only) {totals['hf_fp8']:.0f}, all fast {totals['fast']:.0f}")


if __name__ == "__main__":
    main()
