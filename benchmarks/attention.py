"""Attention alone, forward + backward: BF16 SDPA (PyTorch's default; cuDNN on Hopper) vs hf_fp8's
FP8 attention: whatever `hf_fp8_attention_forward` picks (`--kernels auto`: cuDNN's fused FP8
kernel on sm_90 with nvidia-cudnn-frontend at head dim 128, else hf_fp8's Triton kernel), or each
kernel named in `--kernels` (cudnn, triton, reference) forced in turn.

Causal, batch x heads x seq x head_dim as given, Q/K/V laid out as a HF model hands them over
(`--layout bshd`: transposed views of (B, S, H, D) projections) or contiguous (B, H, S, D). Both
functions run under torch.compile (as inside a compiled decoder layer: the casts fuse) unless --eager.
Three numbers per function, all including the FP8 casts, amax recording and dequantization (the
scale update, once per optimizer step in training, runs between the timed regions):
- latency: median of CUDA-event-timed single calls, the GPU idle before each (host time shows here);
- throughput: `--iters` calls back to back, as the layers of a training step queue them, total / iters;
- host: CPU wall time to enqueue one call (median), to tell host-bound from GPU-bound.
--profile DIR also writes a torch.profiler table (self CPU time and CUDA time per op) and a Chrome
trace of 3 back-to-back FP8 calls per case. Writes JSON with --out; --results-md PATH also records
the run (command, versions, date, table; --note: what changed) as the newest section of PATH.

  python benchmarks/attention.py --out results/attention.json --results-md RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import hf_fp8
from hf_fp8 import _results
from hf_fp8.attention import hf_fp8_attention_forward, kernels, new_attention_scales


class _Attention(nn.Module):
    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.is_causal = True
        self.num_key_value_groups = heads // kv_heads
        recipe = hf_fp8.FP8Recipe(attention=True)
        self.fp8_attention_scale = new_attention_scales(recipe, device="cuda")


def _inputs(b, h, kv, s, d, layout: str):
    """q (B, H, S, D), k/v (B, KV, S, D) bf16; grad of the (B, S, H, D) output."""
    def make(heads):
        if layout == "bshd":  # what `proj(x).view(B, S, H, D).transpose(1, 2)` gives
            return torch.randn(b, s, heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(b, heads, s, d, device="cuda", dtype=torch.bfloat16)

    return make(h), make(kv), make(kv), torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)


def _call(call, module, q, k, v, grad):
    qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))
    out, _ = call(module, qi, ki, vi, None, scaling=q.shape[-1] ** -0.5)
    out.backward(grad)


def time_fwd_bwd(call, module, q, k, v, grad, warmup: int, iters: int, is_fp8: bool) -> dict:
    def update():  # once per optimizer step in training: between timed regions here
        if is_fp8:
            hf_fp8.update_scales(module)

    for _ in range(warmup):
        _call(call, module, q, k, v, grad)
        update()
    torch.cuda.synchronize()
    latency, host = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        _call(call, module, q, k, v, grad)
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        latency.append(start.elapsed_time(end))
        update()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):  # as the layers of one step: the next call queued while the GPU works
        _call(call, module, q, k, v, grad)
    end.record()
    torch.cuda.synchronize()
    update()
    return {"latency_ms": statistics.median(latency), "throughput_ms": start.elapsed_time(end) / iters,
            "host_ms": statistics.median(host)}  # fmt: skip


def profile_fp8(call, module, q, k, v, grad, out_dir: Path, case: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            _call(call, module, q, k, v, grad)
        torch.cuda.synchronize()
    hf_fp8.update_scales(module)
    out_dir.mkdir(parents=True, exist_ok=True)
    averages = prof.key_averages()
    text = (f"# {case}: 3 back-to-back FP8 calls (forward + backward)\n\n## by self CPU time\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=30)
            + "\n## by CUDA time\n" + averages.table(sort_by="cuda_time_total", row_limit=30))  # fmt: skip
    (out_dir / f"attention_{case}.txt").write_text(text)
    prof.export_chrome_trace(str(out_dir / f"attention_{case}.trace.json"))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def markdown_rows(results: dict) -> list[list[str]]:
    """Table rows of `results` (case -> function -> timings, as written to --out), SDPA first per case."""
    rows = []
    for case, row in results.items():
        for name, r in row.items():
            label = f"{name} ({r['kernel']})" if "kernel" in r else name
            ratio = f"{r['speedup_latency']:.3f} / {r['speedup_throughput']:.3f}" if "speedup_latency" in r else ""
            rows.append([case, label, f"{r['latency_ms']:.2f}", f"{r['throughput_ms']:.2f}", f"{r['host_ms']:.2f}", ratio])
    return rows


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="4x16x4096x128,2x16x8192x128,4x16x4096x64,2x16x8192x64",
                   help="comma-separated BATCHxHEADSxSEQxHEAD_DIM")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--layout", choices=["bshd", "bhsd"], default="bshd",
                   help="memory layout of Q/K/V: bshd as HF projections give them (default), bhsd contiguous")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--eager", action="store_true", help="no torch.compile")
    p.add_argument("--kernels", default="auto",
                   help="comma-separated FP8 attention kernels to time: auto (hf_fp8's choice), cudnn, triton, reference")
    p.add_argument("--profile", default=None, metavar="DIR", help="also write a profiler table and trace per case")
    p.add_argument("--out", default=None)
    p.add_argument("--results-md", default=None, metavar="PATH", help="also record the run as the newest section of this Markdown file")
    p.add_argument("--note", default=None, metavar="TEXT", help="with --results-md: what changed since the last run")
    args = p.parse_args(argv)
    if problem := _results.missing_output_directory({"--results-md": args.results_md, "--out": args.out}):
        p.error(problem)
    results = {}
    header = f"{'case':<18} {'':>22} {'latency ms':>10} {'thru ms':>8} {'host ms':>8} {'vs SDPA (lat/thru)':>19}"
    print(header)
    for case in args.cases.split(","):
        b, h, s, d = map(int, case.split("x"))
        torch.manual_seed(0)
        q, k, v, grad = _inputs(b, h, args.kv_heads, s, d, args.layout)
        module = _Attention(h, args.kv_heads).train()
        row = {}
        runs = [("sdpa_bf16", sdpa_attention_forward, None)]
        runs += [(f"hf_fp8_{c}" if c != "auto" else "hf_fp8", hf_fp8_attention_forward, c) for c in args.kernels.split(",")]
        for name, fn, kernel in runs:
            if kernel is not None:
                kernels._CHOICE = kernel
                module = _Attention(h, args.kv_heads).train()  # fresh scales per kernel
                torch._dynamo.reset()
            # Static shapes per case, as in training: after a shape change torch.compile would
            # otherwise recompile with dynamic shapes, and AOTAutograd then copies the incoming
            # gradient to a contiguous layout (~0.1 ms at 8192 on the H200).
            call = fn if args.eager else torch.compile(fn, dynamic=False)
            try:
                # The kernel that takes the call, decided outside torch.compile as converting a model
                # does in training (traced, the first device check made dynamo break the graph).
                chosen_kernel = kernels.kernel_for(q, k, None, True)[0] if kernel is not None else None
                row[name] = time_fwd_bwd(call, module, q, k, v, grad, args.warmup, args.iters, kernel is not None)
            except Exception as e:  # e.g. cudnn forced at a head dim it declines: record and go on
                print(f"{case:<18} {name:>10} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            if kernel is not None:
                row[name]["kernel"] = chosen_kernel
            if args.profile and kernel is not None:
                profile_fp8(call, module, q, k, v, grad, Path(args.profile), f"{case}_{name}")
        sdpa = row["sdpa_bf16"]
        for name, r in row.items():
            if name != "sdpa_bf16":
                r["speedup_latency"] = sdpa["latency_ms"] / r["latency_ms"]
                r["speedup_throughput"] = sdpa["throughput_ms"] / r["throughput_ms"]
        results[case] = row
        for name, r in row.items():
            ratio = f"{r['speedup_latency']:.3f} / {r['speedup_throughput']:.3f}" if name != "sdpa_bf16" else ""
            label = f"{name} ({r['kernel']})" if "kernel" in r else name
            times = f"{r['latency_ms']:>10.2f} {r['throughput_ms']:>8.2f} {r['host_ms']:>8.2f}"
            print(f"{case:<18} {label:>22} {times} {ratio:>19}", flush=True)
        del q, k, v, grad
        torch.cuda.empty_cache()
    if args.results_md:
        body = [f"Causal, {args.kv_heads} KV heads, layout {args.layout}, {'eager' if args.eager else 'both under torch.compile'}; "
                f"forward + backward incl. casts and amax bookkeeping; median over {args.iters} calls after {args.warmup} "
                "warm-up; ms; latency = one call on an idle GPU, throughput = calls queued back to back, host = time to "
                "enqueue a call."]  # fmt: skip
        body += [""] + _results.markdown_table(["case", "function (kernel)", "latency", "throughput", "host", "vs SDPA lat / thru"],
                                               markdown_rows(results))  # fmt: skip
        if args.out:
            body += ["", f"Raw: `{args.out}`."]
        command = _results.command_line(list(argv) if argv is not None else sys.argv[1:], "python3 benchmarks/attention.py")
        _results.record(args.results_md, "benchmarks/attention.py: FP8 attention vs BF16 SDPA", command,
                        _results.environment(torch.device("cuda")), body, args.note)  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "causal": True,
                       "kv_heads": args.kv_heads, "layout": args.layout, "compiled": not args.eager,
                       "results": results}, f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
