"""Tile sweep of hf_fp8's Triton FP8 attention kernels on a GPU: the forward op and the backward op
(delta + dK/dV + dQ kernels) timed alone on pre-cast FP8 inputs, one tile configuration at a time,
with BF16 SDPA beside them. Used to pick `triton_flash._blocks`; results in `results/`.

  python benchmarks/attention_triton_tiles.py --head-dims 64,128
"""

from __future__ import annotations

import argparse

import torch
from _cuda_timing import median_us

from hf_fp8.attention import triton_flash

# (BLOCK_M, BLOCK_N, num_warps, num_stages); FP8 GEMMs need their reduced block >= 32.
FWD = [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 32, 4, 4)]
DKDV = [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (64, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 3)]
DQ = [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 4, 3), (64, 64, 4, 4)]


def median_ms(fn) -> float:
    return median_us(fn, warmup=3, iters=10) / 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    args = p.parse_args()
    default_blocks = triton_flash._blocks
    b, h, kv, s = args.batch, args.heads, args.kv_heads, args.seq
    for d in map(int, args.head_dims.split(",")):
        print(f"head dim {d}: B{b} H{h}/{kv} S{s}, causal", flush=True)

        def fp8(heads, dtype=torch.float8_e4m3fn):  # (B, S, H, D) memory as (B, H, S, D), as HF gives it
            return torch.randn(b, s, heads, d, device="cuda").to(dtype).transpose(1, 2)

        q8, k8, v8, do8 = fp8(h), fp8(kv), fp8(kv), fp8(h, torch.float8_e5m2)
        scales = torch.ones(5, device="cuda")
        o, lse, _ = triton_flash.triton_fp8_attention_fwd(q8, k8, v8, None, scales[:3], d**-0.5, True, torch.bfloat16)

        def forward():
            triton_flash.triton_fp8_attention_fwd(q8, k8, v8, None, scales[:3], d**-0.5, True, torch.bfloat16)

        def backward():
            triton_flash.triton_fp8_attention_bwd(q8, k8, v8, o, do8, lse, None, scales, d**-0.5, True, *[torch.bfloat16] * 3)

        for kind, configs, fn in (("fwd", FWD, forward), ("dkdv", DKDV, backward), ("dq", DQ, backward)):
            for bm, bn, warps, stages in configs:
                def blocks(head_dim, kind=kind, tile=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)):
                    return {**default_blocks(head_dim), kind: tile}

                triton_flash._blocks = blocks
                try:
                    op = "forward" if kind == "fwd" else "backward"
                    print(f"  {op} with {kind} {(bm, bn, warps, stages)}: {median_ms(fn):.3f} ms", flush=True)
                except Exception as e:  # a tile that does not fit: report and go on
                    print(f"  {kind} {(bm, bn, warps, stages)}: failed {type(e).__name__}: {str(e)[:120]}", flush=True)
        triton_flash._blocks = default_blocks
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        print(f"  BF16 SDPA forward {median_ms(lambda: sdpa(q, k, v, is_causal=True)):.3f} ms, forward + backward "
              f"{median_ms(lambda: sdpa(q, k, v, is_causal=True).sum().backward()):.3f} ms", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
