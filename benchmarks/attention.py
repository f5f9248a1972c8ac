"""Attention alone, forward + backward: BF16 SDPA (PyTorch's default; cuDNN on Hopper) vs hf_fp8's
FP8 attention (whatever `hf_fp8_attention_forward` picks: cuDNN's fused FP8 kernel on sm_90 with
nvidia-cudnn-frontend at head dim 128, else the pure-PyTorch reference).

Causal, batch x heads x seq x head_dim as given; time = median of CUDA-event-timed iterations after
warm-up, including the FP8 casts and amax bookkeeping (the scale update runs between iterations, as
once per optimizer step, and is not timed). Both functions run under torch.compile (as inside a
compiled decoder layer: the casts fuse) unless --eager. Writes JSON with --out.

  python benchmarks/attention.py --out results/attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_fp8
from hf_fp8.attention import hf_fp8_attention_forward, new_attention_scales


class _Attention(nn.Module):
    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads
        recipe = hf_fp8.FP8Recipe(attention=True)
        self.fp8_attention_scale = new_attention_scales(recipe, device="cuda")


def time_fwd_bwd(fn, module, q, k, v, grad, warmup: int, iters: int, compiled: bool) -> float:
    call = torch.compile(fn) if compiled else fn
    times = []
    for i in range(warmup + iters):
        qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out, _ = call(module, qi, ki, vi, None, scaling=q.shape[-1] ** -0.5)
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        if fn is hf_fp8_attention_forward:
            torch.cuda.synchronize()
            hf_fp8.update_scales(module)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="4x16x4096x128,2x16x8192x128,4x16x4096x64,2x16x8192x64",
                   help="comma-separated BATCHxHEADSxSEQxHEAD_DIM")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    results = {}
    print(f"{'case':<18} {'sdpa bf16 ms':>12} {'hf_fp8 ms':>10} {'speedup':>8}")
    for case in args.cases.split(","):
        b, h, s, d = map(int, case.split("x"))
        torch.manual_seed(0)
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, args.kv_heads, s, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, args.kv_heads, s, d, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
        module = _Attention(h, args.kv_heads).train()
        sdpa = time_fwd_bwd(sdpa_attention_forward, module, q, k, v, grad, args.warmup, args.iters, not args.eager)
        fp8 = time_fwd_bwd(hf_fp8_attention_forward, module, q, k, v, grad, args.warmup, args.iters, not args.eager)
        results[case] = {"sdpa_bf16_ms": sdpa, "hf_fp8_ms": fp8, "speedup_vs_sdpa": sdpa / fp8}
        print(f"{case:<18} {sdpa:>12.2f} {fp8:>10.2f} {sdpa / fp8:>8.3f}", flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "causal": True,
                       "kv_heads": args.kv_heads, "compiled": not args.eager, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
