"""Does torch.compile put a delayed FP8 cast and its amax in one kernel? (GPU; RESULTS.md (15))

Times three cast expressions compiled by inductor, each with the amax reduced over the whole tensor
at once ("full", the old `hf_fp8.scaling.amax_of`), per row then over rows ("rows", the current one)
or per 2048-element chunk ("chunk2048"), and lists the Triton kernels each ran:
  mlp_fwd   SiLU(gate) * up -> amax + E4M3 cast                      (T x F)
  mlp_bwd   its backward: dgate, dup -> amaxes + E5M2 casts + transposed copies (the weight-gradient
            GEMMs want them K-contiguous)                              (T x F)
  cast+T    a plain E4M3 cast + transposed copy                      (T x D)
Every variant must give the same FP8 bytes; the amax may differ in its last bits (inductor keeps the
fused SiLU product in fp32 where the whole-tensor form reduces the bf16-rounded one).

  python3 benchmarks/cast_fusion.py [--tokens 16384 --ffn 8192 --hidden 2048]
"""

from __future__ import annotations

import argparse

import torch
from _cuda_timing import median_us
from torch.profiler import ProfilerActivity, profile

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
AMAX = {
    "full": lambda x: x.abs().amax().float(),
    "rows": lambda x: x.abs().amax(-1).amax().float(),
    "chunk2048": lambda x: x.reshape(-1, 2048).abs().amax(-1).amax().float(),
}


def cast(x, scale, dtype):
    fp8_max = torch.finfo(dtype).max
    return (x.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)


def mlp_fwd(amax):
    def f(g, u, scale, pending):
        h = torch.nn.functional.silu(g) * u
        pending.copy_(torch.maximum(pending, amax(h)))
        return (cast(h, scale, E4M3),)

    return f


def mlp_bwd(amax):
    def f(dh, g, u, scale, pending):
        gf, uf, dhf = g.float(), u.float(), dh.float()
        sig = torch.sigmoid(gf)
        du = (dhf * gf * sig).to(torch.bfloat16)
        dg = (dhf * uf * sig * (1 + gf * (1 - sig))).to(torch.bfloat16)
        pending[0].copy_(torch.maximum(pending[0], amax(dg)))
        pending[1].copy_(torch.maximum(pending[1], amax(du)))
        dg8, du8 = cast(dg, scale, E5M2), cast(du, scale, E5M2)
        return dg8, du8, dg8.t().contiguous(), du8.t().contiguous()

    return f


def cast_t(amax):
    def f(x, scale, pending):
        pending.copy_(torch.maximum(pending, amax(x)))
        x8 = cast(x, scale, E4M3)
        return x8, x8.t().contiguous()

    return f


def time_us(fn, args, n=30) -> tuple[float, list[tuple[str, int]]]:
    """Median CUDA-event time of one call, and (kernel, us) of the Triton kernels one call ran."""
    us = median_us(lambda: fn(*args), warmup=3, iters=n)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    kernels = [(e.key, round(e.device_time_total)) for e in prof.key_averages() if "triton" in e.key and e.device_time_total > 0]
    return us, kernels


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cast_fusion.py measures inductor's GPU kernels: it needs a CUDA device")
    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    g, u, dh = (torch.randn(args.tokens, args.ffn, **bf16) for _ in range(3))
    x = torch.randn(args.tokens, args.hidden, **bf16)
    scale = torch.tensor(20.0, device="cuda")
    cases = {
        "mlp_fwd": (mlp_fwd, lambda: (g, u, scale, torch.zeros((), device="cuda"))),
        "mlp_bwd": (mlp_bwd, lambda: (dh, g, u, scale, torch.zeros(2, device="cuda"))),
        "cast+T": (cast_t, lambda: (x, scale, torch.zeros((), device="cuda"))),
    }
    rows = []
    for case, (make, inputs) in cases.items():
        reference = None
        for name, amax in AMAX.items():
            torch._dynamo.reset()
            fn = torch.compile(make(amax), dynamic=False)
            out = fn(*inputs())
            reference = reference or out
            same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(out, reference))
            us, kernels = time_us(fn, inputs())
            rows.append((case, name, us, len(kernels), same))
            print(case, name, f"{us:.0f} us", kernels, flush=True)
    print(f"\n{'case':<10} {'amax':<10} {'us':>6} {'kernels':>8} {'same FP8 bytes':>15}")
    for case, name, us, n, same in rows:
        print(f"{case:<10} {name:<10} {us:>6.0f} {n:>8} {str(same):>15}")


if __name__ == "__main__":
    main()
