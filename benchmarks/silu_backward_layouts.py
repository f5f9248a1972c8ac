"""Probe behind RESULTS.md (18): where should the SiLU backward's transposed E5M2 copies (read by the
gate/up weight-gradient GEMMs) be written? Compares, at 16384 x 8192 on one GPU, us per call:
  A  the compiled expression as in training (one kernel writes both layouts from BF16)
  D  A with inductor's triton.tile_reductions (and prefer_nd_tiling)
  R  the kernel writing the row-major FP8 only; B/C: R + aten / tiled Triton FP8 transposes
and the forward SiLU(gate) * up cast with and without tile_reductions. Every variant is checked bit
for bit against A.  Usage (CUDA): python3 benchmarks/silu_backward_layouts.py"""
import statistics
import torch
import triton
import triton.language as tl

E5 = torch.float8_e5m2
T, F = 16384, 8192


def amax_rows(x):
    return x.abs().amax(-1).amax().float()


def cast(x, s):
    m = torch.finfo(E5).max
    return (x.float() * s).clamp(-m, m).to(E5)


def silu_bwd(dh, g, u):
    gf, uf, dhf = g.float(), u.float(), dh.float()
    sig = torch.sigmoid(gf)
    du = (dhf * gf * sig).to(torch.bfloat16)
    dg = (dhf * uf * sig * (1 + gf * (1 - sig))).to(torch.bfloat16)
    return dg, du


def fused_with_t(dh, g, u, s, pend):  # variant A: what the training graph does today
    dg, du = silu_bwd(dh, g, u)
    pend[0].copy_(torch.maximum(pend[0], amax_rows(dg))); pend[1].copy_(torch.maximum(pend[1], amax_rows(du)))
    dg8, du8 = cast(dg, s), cast(du, s)
    return dg8, du8, dg8.t().contiguous(), du8.t().contiguous()


def fused_row_major(dh, g, u, s, pend):  # variants B/C, first kernel
    dg, du = silu_bwd(dh, g, u)
    pend[0].copy_(torch.maximum(pend[0], amax_rows(dg))); pend[1].copy_(torch.maximum(pend[1], amax_rows(du)))
    return cast(dg, s), cast(du, s)


@triton.jit
def _t_kernel(x_ptr, y_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tile = tl.load(x_ptr + rm[:, None] * N + rn[None, :], mask=mask)
    tl.store(y_ptr + rn[None, :] * M + rm[:, None], tile, mask=mask)


def triton_t(x8):
    m, n = x8.shape
    y = torch.empty(n, m, dtype=torch.uint8, device=x8.device)
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))
    _t_kernel[grid](x8.view(torch.uint8), y, m, n, BM=64, BN=64)
    return y.view(x8.dtype)


def timed(fn, n=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(1000 * a.elapsed_time(b))
    return statistics.median(ts)


torch.manual_seed(0)
dh, g, u = (torch.randn(T, F, device="cuda", dtype=torch.bfloat16) for _ in range(3))
s, pend = torch.tensor(4.0, device="cuda"), torch.zeros(2, device="cuda")
A = torch.compile(fused_with_t, dynamic=False)
R = torch.compile(fused_row_major, dynamic=False)
ref = A(dh, g, u, s, pend)
dg8, du8 = R(dh, g, u, s, pend)
for name, t in (("aten", lambda x: x.t().contiguous()), ("triton", triton_t)):
    got = (dg8, du8, t(dg8), t(du8))
    same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, ref))
    print(f"{name} transposes bitwise equal to A: {same}")
print(f"A  fused, transposes from BF16      {timed(lambda: A(dh, g, u, s, pend)):7.0f} us")
for opts in ({"triton.tile_reductions": True}, {"triton.tile_reductions": True, "triton.prefer_nd_tiling": True}):
    torch._dynamo.reset()
    D = torch.compile(fused_with_t, dynamic=False, options=opts)
    got = D(dh, g, u, s, pend)
    same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, ref))
    print(f"D  A with {opts}: equal {same}  {timed(lambda: D(dh, g, u, s, pend)):7.0f} us")
print(f"R  fused, row-major only            {timed(lambda: R(dh, g, u, s, pend)):7.0f} us")
print(f"B  R + aten FP8 transposes          {timed(lambda: [x.t().contiguous() for x in R(dh, g, u, s, pend)]):7.0f} us")
print(f"C  R + Triton tiled FP8 transposes  {timed(lambda: [triton_t(x) for x in R(dh, g, u, s, pend)]):7.0f} us")

# forward: SiLU(gate) * up -> E4M3 row-major + the transposed copy the down_proj weight-gradient GEMM saves
E4 = torch.float8_e4m3fn


def fwd(g, u, s, pend):
    h = torch.nn.functional.silu(g) * u
    pend[0].copy_(torch.maximum(pend[0], amax_rows(h)))
    m = torch.finfo(E4).max
    h8 = (h.float() * s).clamp(-m, m).to(E4)
    return h8, h8.t().contiguous()


for opts in ({}, {"triton.tile_reductions": True}, {"triton.tile_reductions": True, "triton.prefer_nd_tiling": True}):
    torch._dynamo.reset()
    Fw = torch.compile(fwd, dynamic=False, options=opts)
    print(f"fwd {opts}: {timed(lambda: Fw(g, u, s, pend)):7.0f} us")
