"""Probe behind RESULTS.md (18) and (25): where should the SiLU backward's transposed E5M2 copies (read
by the gate/up weight-gradient GEMMs) be written? For 16384 tokens and each FFN width asked for (8192:
the 1.5B shape; 14336: the 8B shape), us per call:
  A  the compiled expression as in training (one kernel writes both layouts)
  D  A with inductor's triton.tile_reductions (and prefer_nd_tiling)
  R  the kernel writing the row-major FP8 only; B/C: R + aten / tiled Triton FP8 transposes
  H  one hand-written Triton kernel writing all four outputs from 2D tiles, amaxes by atomics, per tile
     shape (a ceiling probe: its sigmoid differs from inductor's in the last bit of some values)
and the forward SiLU(gate) * up cast with and without tile_reductions. A..C are checked bit for bit
against A, H's amaxes against A's.
Usage (CUDA): python3 benchmarks/silu_backward_layouts.py [--ffn 8192,14336]"""
import argparse
import torch
from _cuda_timing import median_us
import triton
import triton.language as tl

E5 = torch.float8_e5m2
E4 = torch.float8_e4m3fn
T = 16384


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


@triton.jit
def _silu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, dg_t_ptr, du_t_ptr, s_ptr, amax_bits_ptr, M, N, fp8_max,
                     BM: tl.constexpr, BN: tl.constexpr):  # fmt: skip
    r = tl.program_id(0) * BM + tl.arange(0, BM)
    c = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (r[:, None] < M) & (c[None, :] < N)
    off = r[:, None].to(tl.int64) * N + c[None, :]
    dh = tl.load(dh_ptr + off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    du = (dh * g * sig).to(tl.bfloat16).to(tl.float32)
    dg = (dh * u * sig * (1 + g * (1 - sig))).to(tl.bfloat16).to(tl.float32)
    tl.atomic_max(amax_bits_ptr, tl.max(tl.max(tl.abs(dg).to(tl.int32, bitcast=True), 1), 0))
    tl.atomic_max(amax_bits_ptr + 1, tl.max(tl.max(tl.abs(du).to(tl.int32, bitcast=True), 1), 0))
    s = tl.load(s_ptr)
    dg8 = tl.clamp(dg * s, -fp8_max, fp8_max).to(dg_ptr.dtype.element_ty)
    du8 = tl.clamp(du * s, -fp8_max, fp8_max).to(du_ptr.dtype.element_ty)
    tl.store(dg_ptr + off, dg8, mask=mask)
    tl.store(du_ptr + off, du8, mask=mask)
    off_t = c[None, :].to(tl.int64) * M + r[:, None]
    tl.store(dg_t_ptr + off_t, dg8, mask=mask)
    tl.store(du_t_ptr + off_t, du8, mask=mask)


def hand(dh, g, u, s, amax_bits, bm=64, bn=64, warps=4):
    m, n = dh.shape
    outs = [torch.empty(m, n, dtype=E5, device="cuda") for _ in range(2)] + [torch.empty(n, m, dtype=E5, device="cuda") for _ in range(2)]
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _silu_bwd_kernel[grid](dh, g, u, *outs, s, amax_bits, m, n, torch.finfo(E5).max, BM=bm, BN=bn, num_warps=warps)
    return outs


def timed(fn):
    return median_us(fn, warmup=3, iters=30)


def fwd(g, u, s, pend):  # forward: SiLU(gate) * up -> E4M3 and the transposed copy down_proj's grad-weight GEMM reads
    h = torch.nn.functional.silu(g) * u
    pend[0].copy_(torch.maximum(pend[0], amax_rows(h)))
    m = torch.finfo(E4).max
    h8 = (h.float() * s).clamp(-m, m).to(E4)
    return h8, h8.t().contiguous()


def probe(width: int) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    dh, g, u = (torch.randn(T, width, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    s, pend = torch.tensor(4.0, device="cuda"), torch.zeros(2, device="cuda")
    A = torch.compile(fused_with_t, dynamic=False)
    R = torch.compile(fused_row_major, dynamic=False)
    ref = A(dh, g, u, s, pend)
    dg8, du8 = R(dh, g, u, s, pend)
    for name, t in (("aten", lambda x: x.t().contiguous()), ("triton", triton_t)):
        got = (dg8, du8, t(dg8), t(du8))
        same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, ref))
        print(f"F={width} {name} transposes bitwise equal to A: {same}")
    gb = (3 * 2 + 4) * T * width / 1e9
    print(f"F={width} A  fused, transposes from BF16      {timed(lambda: A(dh, g, u, s, pend)):7.0f} us  ({gb:.2f} GB moved)")
    for opts in ({"triton.tile_reductions": True}, {"triton.tile_reductions": True, "triton.prefer_nd_tiling": True}):
        torch._dynamo.reset()
        D = torch.compile(fused_with_t, dynamic=False, options=opts)
        got = D(dh, g, u, s, pend)
        same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, ref))
        print(f"F={width} D  A with {opts}: equal {same}  {timed(lambda: D(dh, g, u, s, pend)):7.0f} us")
    print(f"F={width} R  fused, row-major only            {timed(lambda: R(dh, g, u, s, pend)):7.0f} us")
    print(f"F={width} B  R + aten FP8 transposes          {timed(lambda: [x.t().contiguous() for x in R(dh, g, u, s, pend)]):7.0f} us")
    print(f"F={width} C  R + Triton tiled FP8 transposes  {timed(lambda: [triton_t(x) for x in R(dh, g, u, s, pend)]):7.0f} us")
    amax_bits = torch.zeros(2, dtype=torch.int32, device="cuda")
    hand(dh, g, u, s, amax_bits)
    print(f"F={width} H  amaxes {amax_bits.view(torch.float32).tolist()} (A: {pend.tolist()})")
    for bm, bn, warps in ((64, 64, 4), (32, 128, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8)):
        print(f"F={width} H  hand-written, {bm}x{bn} tiles, {warps} warps  {timed(lambda: hand(dh, g, u, s, amax_bits, bm, bn, warps)):7.0f} us")
    for opts in ({}, {"triton.tile_reductions": True}, {"triton.tile_reductions": True, "triton.prefer_nd_tiling": True}):
        torch._dynamo.reset()
        Fw = torch.compile(fwd, dynamic=False, options=opts)
        print(f"F={width} fwd {opts}: {timed(lambda: Fw(g, u, s, pend)):7.0f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ffn", default="8192", help="comma-separated FFN widths (default 8192)")
    for width in parser.parse_args().ffn.split(","):
        probe(int(width))
