"""Training throughput: BF16 vs torchao tensorwise (dynamic) vs hf_fp8 (delayed), one device.

`hf-fp8 bench` and `benchmarks/train_throughput.py` run this. All modes run in one process on the
same model shape, data and seed: forward + backward + AdamW (fused on CUDA), per-decoder-layer
torch.compile (unless --no-compile), use_cache=False, bf16 parameters, LM head in BF16. Reports the
median step time over the timed steps (after warm-up/compile), tokens/s, ratio to BF16, peak memory
(CUDA), the loss after the timed steps, the median host time of a step (how long the CPU took to
enqueue it) and, with --gpu-time, the GPU time of a step (its kernels' durations summed under the
profiler over two steps, in a second pass after every mode is timed, since a profiler session slows
whatever runs after it). GPU ms near ms/step: the GPU bounds the step. Well under it: the GPU waits
for the host. Host ms alone does not tell: CUDA holds the host back once ~1,000 launches are pending
on a stream, so a host that is ahead still reads near the step time.

Modes: bf16; torchao (tensorwise dynamic, the peer); hf_fp8 (linears in FP8, delayed scaling);
hf_fp8_attn (linears + attention in FP8); hf_fp8_nosync (hf_fp8 without the inf/NaN check).
--micro-batches N splits each batch into N accumulated micro-batches (one optimizer step per batch).
--cuda-graphs replays each compiled layer as a CUDA graph (inductor `triton.cudagraphs`): the host
cost of a layer becomes one graph launch, which is what small micro-batches need. Gradients then stay
allocated between steps (zeroed, not freed) so that accumulation adds into them in place; a gradient
taken over from a graph's output would be overwritten by the next replay (pytorch#169545).
Shapes: the paper's 1.5B Llama, an 8B-shape slice (4 of 32 layers), FOG-flash at 1.5B, tiny ones
for smoke runs. Data: a fresh batch per step of learnable sequences (each token follows the previous
by a fixed random map over a 4096-token alphabet, 10% noise), so the loss after the timed steps
compares how FP8 and BF16 start to learn; random tokens cycled over a few batches (the earlier data)
measured how fast each memorizes noise. A throughput run, not a quality measure. A mode that
compiles during its timed steps (too few --warmup steps) is flagged: a warning, its ratio starred,
`compiled_during_timing` in its results.

  hf-fp8 bench --shape 1.5b --modes bf16,torchao,hf_fp8,hf_fp8_attn --gpu-time --out results.json \
      --results-md benchmarks/RESULTS.md --note "what changed since the last run"
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from . import _results

LLAMA_SHAPES = {
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8),
    "8b-slice": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
}
# FOG-flash at the paper's 1.5B shape: recipes/models/fog-flash-1.5b.json (a test keeps them equal).
FOG_SHAPES = {
    "fog-flash-1.5b": dict(variant="fog-flash", hidden_size=2048, intermediate_size=12288, num_hidden_layers=16,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, softmax_scale=0.125),
    "fog-flash-tiny": dict(variant="fog-flash", hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=128),
}  # fmt: skip
MODES = ("bf16", "torchao", "hf_fp8", "hf_fp8_attn", "hf_fp8_nosync")
VOCAB = 32768


def build_model(shape: str, seq_len: int, device):
    """The benchmark model, random init (seed 0), bf16 parameters, use_cache off."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, max_position_embeddings=seq_len, rope_theta=500000.0, tie_word_embeddings=False)
    if shape in FOG_SHAPES:
        from .models.fog import FOGConfig, FOGForCausalLM

        config, cls = FOGConfig(**common, **FOG_SHAPES[shape]), FOGForCausalLM
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config, cls = LlamaConfig(**common, **LLAMA_SHAPES[shape]), LlamaForCausalLM
    config.use_cache = False
    with torch.device(device):
        model = cls(config)
    return model.to(torch.bfloat16)


def convert(model, mode: str):
    """Convert `model` for `mode`; returns hf_fp8's report (None for bf16/torchao)."""
    if mode == "bf16":
        return None
    if mode == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        # Same skip as hf_fp8: the LM head stays BF16. FSDP all-gather off (single device).
        config = Float8LinearConfig.from_recipe_name("tensorwise")
        convert_to_float8_training(model, config=config, module_filter_fn=lambda m, name: name != "lm_head")
        return None
    if mode in ("hf_fp8", "hf_fp8_attn", "hf_fp8_nosync"):
        from . import FP8Recipe, convert_model

        recipe = FP8Recipe(attention=mode == "hf_fp8_attn", on_nonfinite_amax="skip" if mode == "hf_fp8_nosync" else "warn")
        return convert_model(model, recipe)
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


ALPHABET = 4096


def learnable_batches(n: int, batch: int, seq_len: int, noise: float = 0.1, seed: int = 1) -> list[torch.Tensor]:
    """n batches of (batch, seq_len) token ids (CPU): next = succ[current] over ALPHABET token ids,
    a `noise` fraction replaced by uniformly random ones. Same for every mode (fixed seed)."""
    gen = torch.Generator().manual_seed(seed)
    succ = torch.randperm(ALPHABET, generator=gen)
    out = []
    for _ in range(n):
        ids = torch.empty(batch, seq_len, dtype=torch.long)
        ids[:, 0] = torch.randint(0, ALPHABET, (batch,), generator=gen)
        random = torch.randint(0, ALPHABET, (batch, seq_len), generator=gen)
        keep = torch.rand(batch, seq_len, generator=gen) >= noise
        for t in range(1, seq_len):
            ids[:, t] = torch.where(keep[:, t], succ[ids[:, t - 1]], random[:, t])
        out.append(ids)
    return out


def train_step(model, opt, ids: torch.Tensor, micro_batches: int, cuda_graphs: bool = False) -> torch.Tensor:
    """One optimizer step on `ids` (batch, seq), split into `micro_batches` accumulated micro-batches;
    returns the mean loss (a device tensor: reading it would sync). `cuda_graphs`: the layers replay
    CUDA graphs; each micro-batch starts a new graph generation and the gradients (allocated by
    `keep_grads_allocated`) are zeroed in place."""
    losses = []
    for micro in ids.chunk(micro_batches):
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = model(input_ids=micro, labels=micro, use_cache=False).loss
        (loss / micro_batches).backward()
        losses.append(loss.detach())
    opt.step()
    opt.zero_grad(set_to_none=not cuda_graphs)
    return torch.stack(losses).mean()


def keep_grads_allocated(model) -> None:
    """Give every trainable parameter a zero gradient, so that backward adds into it in place instead
    of adopting the graph's output buffer (which the next CUDA-graph replay overwrites)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_mode(args, mode: str, batches: list[torch.Tensor]):
    """Build, convert, (compile) and attach one mode: (model, optimizer, FP8 report or None, the
    batches on the device)."""
    from . import attach

    device = torch.device(args.device)
    model = build_model(args.shape, args.seq_len, device)
    report = convert(model, mode)
    if not args.no_compile:
        options = dict(args.compile_options or {}, **({"triton.cudagraphs": True} if args.cuda_graphs else {}))
        for layer in model.model.layers:
            layer.compile(options=options or None)
    if args.cuda_graphs:
        keep_grads_allocated(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    if report is not None:
        attach(model, opt)
    return model, opt, report, [b.to(device) for b in batches]


def _graphs_compiled() -> int:
    """How many graphs torch.compile (dynamo) has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _free_mode(device: torch.device) -> None:
    """After a mode's model and optimizer are deleted: release their memory and compiled code."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def run_mode(args, mode: str, batches: list[torch.Tensor]) -> dict:
    """Build, convert, (compile), warm up and time one mode on `batches` (CPU token ids, one per
    step); its result dict (gpu_busy_ms None: see measure_kernels)."""
    device = torch.device(args.device)
    model, opt, report, batches = prepare_mode(args, mode, batches)
    if report is not None and not args.quiet:
        print(report, flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, host_times, loss, compile_s = [], [], None, 0.0
    t_start = time.perf_counter()
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]
        _sync(device)
        t0 = time.perf_counter()
        step_loss = train_step(model, opt, ids, args.micro_batches, args.cuda_graphs)
        t_host = time.perf_counter() - t0
        _sync(device)
        if step == args.warmup - 1:
            compile_s = time.perf_counter() - t_start
            graphs_after_warmup = _graphs_compiled()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            host_times.append(t_host)
        loss = step_loss.item()
    median = statistics.median(times)
    # FP8 layers compile twice: the first steps' graphs scale from each tensor's own amax; once the
    # delayed scales exist (known on the host after 1 update on CPU, 2 on CUDA) the steady-state
    # graph replaces them. A compilation inside the timed steps makes their times meaningless.
    recompiled = _graphs_compiled() - graphs_after_warmup
    if recompiled:
        print(f"bench: WARNING: {mode} compiled {recompiled} graph(s) during its timed steps, so its step time includes "
              f"compilation; use --warmup 3 or more (compiled FP8 modes compile again at step 2 on CUDA, step 1 on CPU)",
              flush=True)  # fmt: skip
    result = {
        "tokens_per_s": args.batch_size * args.seq_len / median,
        "step_ms_median": 1000 * median,
        "host_ms_median": 1000 * statistics.median(host_times),
        "gpu_busy_ms": None,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "compile_and_warmup_s": compile_s,
        "loss": loss,
        "compiled_during_timing": recompiled,
    }
    if report is not None:
        result["fp8_flop_fraction"] = report.fp8_flop_fraction
        result["attention_kernel"] = report.attention_kernel or None
    del model, opt
    _free_mode(device)
    return result


def measure_kernels(args, mode: str, batches: list[torch.Tensor]) -> float | None:
    """--gpu-time and --profile, for one mode, in a pass of their own after every mode was timed:
    the mode is built and warmed up again (inductor's cache makes the compile quick) and profiled.
    Why not right after the mode's timed steps: a profiler session with CUDA activity leaves the
    process's host side slower (measured on the H200: the third mode of a 1.5B run 185 ms per step
    against 172 alone, same GPU time; CUPTI's hooks can stay attached, pytorch#144455). Returns the
    GPU ms of a step, or None without --gpu-time."""
    device = torch.device(args.device)
    model, opt, _, batches = prepare_mode(args, mode, batches)
    for step in range(args.warmup):
        train_step(model, opt, batches[step % len(batches)], args.micro_batches, args.cuda_graphs)
    gpu_ms = gpu_busy_ms(args, model, opt, batches) if args.gpu_time else None
    if args.profile:
        profile_steps(args, mode, model, opt, batches)
    del model, opt
    _free_mode(device)
    return gpu_ms


def _profiled_steps(args, model, opt, batches, steps: int):
    """The torch.profiler record of `steps` more training steps (CPU, and CUDA on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(args.device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in range(steps):
            train_step(model, opt, batches[step % len(batches)], args.micro_batches, args.cuda_graphs)
        _sync(torch.device(args.device))
    return prof


def _device_kernels(prof, steps: int) -> list[tuple[float, float, str]]:
    """Every kernel, copy and fill a profile saw on the device (kernels inside CUDA graphs
    included): (ms per step, calls per step, name), largest first."""
    from torch.autograd import DeviceType

    totals: dict[str, tuple[float, int]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not e.is_user_annotation:
            us, calls = totals.get(e.name, (0.0, 0))
            totals[e.name] = (us + e.self_device_time_total, calls + 1)
    rows = [(us / 1000 / steps, calls / steps, name) for name, (us, calls) in totals.items()]
    return sorted(rows, reverse=True)


def gpu_busy_ms(args, model, opt, batches, steps: int = 2) -> float:
    """Mean GPU time of `steps` more training steps: every kernel's, copy's and fill's duration
    summed, as the profiler's "Self CUDA time total" (kernels inside CUDA graphs included)."""
    prof = _profiled_steps(args, model, opt, batches, steps)
    return sum(ms for ms, _, _ in _device_kernels(prof, steps))


# What a device kernel is, from its name (first match wins): the names cuBLAS (nvjet*), cuDNN,
# PyTorch, inductor (triton_*) and hf_fp8 give their kernels on the H200. Used to sum a profile by kind.
_KERNEL_KINDS = (
    ("attention", ("sdpa", "fmha", "flash", "attention", "cudnn")),
    ("GEMM", ("nvjet", "gemm", "xmma")),
    ("optimizer, foreach", ("FusedOptimizer", "multi_tensor_apply")),
    ("loss", ("SoftMax", "nll_loss")),
    ("hf_fp8 casts", ("cast_fp8_kernel", "transpose_bytes_kernel")),
    ("inductor", ("triton_",)),
)


def kernel_kind(name: str) -> str:
    """The kind of a device kernel named `name` (one of _KERNEL_KINDS' or "other")."""
    for kind, parts in _KERNEL_KINDS:
        if any(part in name for part in parts):
            return kind
    return "other"


def kernels_by_kind(kernels: list[tuple[float, float, str]]) -> dict[str, tuple[float, float]]:
    """(ms, calls) per step of each kind present in `kernels` (_device_kernels' rows), in
    _KERNEL_KINDS' order, then "other"."""
    order = [kind for kind, _ in _KERNEL_KINDS] + ["other"]
    totals = {kind: [0.0, 0.0] for kind in order}
    for ms, calls, name in kernels:
        total = totals[kernel_kind(name)]
        total[0] += ms
        total[1] += calls
    return {kind: (ms, calls) for kind, (ms, calls) in totals.items() if calls}


def profile_steps(args, mode, model, opt, batches, steps: int = 3) -> None:
    """3 profiled training steps, written to <profile dir>/: <shape>_<mode>.txt, the profiler's
    table of the 80 largest ops and kernels, <shape>_<mode>_kernels.tsv, every device kernel with
    its time and calls per step (the many small kernels the table cuts off add up), and
    <shape>_<mode>_kinds.tsv, those summed by kind (GEMM, attention, inductor's kernels, ...), which
    is also printed."""
    prof = _profiled_steps(args, model, opt, batches, steps)
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    sort = "cuda_time_total" if torch.device(args.device).type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=80, max_name_column_width=90)
    (out / f"{args.shape}_{mode}.txt").write_text(table)
    kernels = _device_kernels(prof, steps)
    lines = [f"# {args.shape} {mode}: device kernels over {steps} profiled steps, "
             f"{sum(ms for ms, _, _ in kernels):.3f} ms per step in all", "ms_per_step\tcalls_per_step\tkernel"]  # fmt: skip
    lines += [f"{ms:.4f}\t{calls:g}\t{name}" for ms, calls, name in kernels]
    (out / f"{args.shape}_{mode}_kernels.tsv").write_text("\n".join(lines) + "\n")
    kinds = kernels_by_kind(kernels)
    lines = ["kind\tms_per_step\tcalls_per_step"] + [f"{kind}\t{ms:.4f}\t{calls:g}" for kind, (ms, calls) in kinds.items()]
    (out / f"{args.shape}_{mode}_kinds.tsv").write_text("\n".join(lines) + "\n")
    summary = " | ".join(f"{kind} {ms:.2f}" for kind, (ms, _) in kinds.items()) or "no device kernels"
    print(f"profile {args.shape} {mode}, device kernel ms per step: {summary}", flush=True)


def _inductor_options(text: str) -> dict:
    """--compile-options: a JSON object of torch._inductor.config names -> values."""
    import torch._inductor.config as inductor_config

    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError("expected a JSON object of inductor config names -> values")
    unknown = [k for k in options if k not in inductor_config.get_config_copy()]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown inductor option(s) {', '.join(unknown)}")
    return options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(LLAMA_SHAPES) + sorted(FOG_SHAPES), default="1.5b")
    p.add_argument("--modes", default="bf16,torchao,hf_fp8", help=f"comma-separated, of: {', '.join(MODES)}")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=1,
                   help="split each batch into this many micro-batches, one optimizer step per batch (gradient accumulation)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed steps first (compilation happens here; compiled FP8 modes compile again once their "
                        "delayed scales exist, at step 2 on CUDA and step 1 on CPU, so use 3 or more)")
    p.add_argument("--steps", type=int, default=15, help="timed steps")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-compile", action="store_true", help="eager (no per-layer torch.compile)")
    p.add_argument("--compile-options", type=_inductor_options, default=None, metavar="JSON",
                   help='inductor options for every mode\'s per-layer compile, e.g. \'{"triton.tile_reductions": true}\'')
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each compiled layer as a CUDA graph (CUDA only); gradients stay allocated between steps")
    p.add_argument("--quiet", action="store_true", help="do not print the FP8 coverage reports")
    p.add_argument("--out", default=None, help="merge the results into this JSON (shape -> mode -> numbers)")
    p.add_argument("--gpu-time", action="store_true",
                   help="also measure each mode's GPU (kernel) time per step, in a profiled pass after all modes are timed (CUDA)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also write a kernel time table per mode here (profiled pass after all modes are timed)")
    p.add_argument("--results-md", default=None, metavar="PATH",
                   help="also record the run (command, versions, date, table) as the newest section of this Markdown "
                        "file, e.g. benchmarks/RESULTS.md")  # fmt: skip
    p.add_argument("--note", default=None, metavar="TEXT", help="with --results-md: what changed since the last run")


def run(args) -> dict:
    """Run every mode of `args`; print the table; merge into --out. Returns mode -> result."""
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"--modes: unknown {', '.join(unknown)}; expected some of {', '.join(MODES)}")
    if args.warmup < 1 or args.steps < 1:
        raise ValueError("--warmup and --steps must be >= 1")
    if args.micro_batches < 1 or args.batch_size % args.micro_batches:
        raise ValueError(f"--micro-batches must be >= 1 and divide --batch-size ({args.batch_size}); got {args.micro_batches}")
    if args.compile_options and args.no_compile:
        raise ValueError("--compile-options needs compilation (drop --no-compile)")
    if args.cuda_graphs and (args.no_compile or torch.device(args.device).type != "cuda"):
        raise ValueError("--cuda-graphs needs compilation on a CUDA device (drop --no-compile; --device cuda)")
    if problem := _results.missing_output_directory({"--results-md": args.results_md, "--out": args.out}):
        raise ValueError(problem)
    if args.gpu_time and torch.device(args.device).type != "cuda":
        raise ValueError("--gpu-time needs a CUDA device (--device cuda)")
    results = {}
    batches = learnable_batches(args.warmup + args.steps, args.batch_size, args.seq_len)  # the same for every mode
    for mode in modes:
        results[mode] = run_mode(args, mode, batches)
        print(mode, json.dumps(results[mode]), flush=True)
    if args.gpu_time or args.profile:  # every mode timed first: see measure_kernels
        for mode in modes:
            results[mode]["gpu_busy_ms"] = measure_kernels(args, mode, batches)
    base = results.get("bf16", {}).get("tokens_per_s")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    options = f"  inductor {json.dumps(args.compile_options)}" if args.compile_options else ""
    options += "  CUDA graphs" if args.cuda_graphs else ""
    micro = _micro_batches_text(args)
    print(f"\n{args.shape}  batch {args.batch_size}x{args.seq_len}{micro}  {name}  torch {torch.__version__}{options}")
    print(f"{'mode':<14} {'tok/s':>10} {'vs bf16':>8} {'ms/step':>8} {'GPU ms':>8} {'host ms':>8} {'peak GiB':>9} {'compile s':>9} {'loss':>8}")
    for mode, r in results.items():
        r["ratio_vs_bf16"] = r["tokens_per_s"] / base if base else None
        ratio, gpu, peak = _cells(r)
        print(f"{mode:<14} {r['tokens_per_s']:>10.0f} {ratio:>8} {r['step_ms_median']:>8.1f} {gpu:>8} {r['host_ms_median']:>8.1f} {peak:>9} "
              f"{r['compile_and_warmup_s']:>9.1f} {r['loss']:>8.4f}")  # fmt: skip
    if note := _recompiled_note(results):
        print(note)
    if args.results_md:
        _record(args, results, name)
    if args.out:
        # One file for all shapes: shape -> {device, torch, batch, mode -> numbers}; a run replaces its shape.
        path = Path(args.out)
        data = json.loads(path.read_text()) if path.exists() else {}
        data = {} if "results" in data else data  # an old single-shape file is replaced
        data[args.shape] = {"device": name, "torch": torch.__version__, "batch": f"{args.batch_size}x{args.seq_len}",
                            **({"micro_batches": args.micro_batches} if args.micro_batches > 1 else {}),
                            **({"compile_options": args.compile_options} if args.compile_options else {}),
                            **({"cuda_graphs": True} if args.cuda_graphs else {}), **results}
        path.write_text(json.dumps(data, indent=2))
    return results


def _cells(r: dict) -> tuple[str, str, str]:
    """A result's ratio to BF16, GPU ms and peak memory as table cells ("-" where there is none)."""
    ratio = f"{r['ratio_vs_bf16']:.3f}" if r["ratio_vs_bf16"] is not None else "-"
    ratio += "*" if r.get("compiled_during_timing") else ""
    gpu = f"{r['gpu_busy_ms']:.1f}" if r["gpu_busy_ms"] is not None else "-"
    peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
    return ratio, gpu, peak


def _recompiled_note(results: dict) -> str | None:
    """The table's footnote for modes that compiled during their timed steps, or None."""
    modes = [f"{m} ({r['compiled_during_timing']})" for m, r in results.items() if r.get("compiled_during_timing")]
    if not modes:
        return None
    return (f"* compiled during the timed steps (graphs): {', '.join(modes)}; those step times include compilation. "
            "Rerun with --warmup 3 or more.")  # fmt: skip


def _micro_batches_text(args) -> str:
    return f" in {args.micro_batches} micro-batches" if args.micro_batches > 1 else ""


def _record(args, results: dict, device_name: str) -> None:
    """--results-md: this run as the newest section of the Markdown file."""
    argv = getattr(args, "argv", None)
    command = _results.command_line(argv if argv is not None else sys.argv[1:], getattr(args, "program", "python3 -m hf_fp8 bench"))
    how = "eager" if args.no_compile else "per-decoder-layer torch.compile" + (
        f" with inductor {json.dumps(args.compile_options)}" if args.compile_options else "")  # fmt: skip
    how += ", each layer replayed as a CUDA graph (gradients kept allocated)" if args.cuda_graphs else ""
    micro = _micro_batches_text(args)
    rows = []
    for mode, r in results.items():
        ratio, gpu, peak = _cells(r)
        rows.append([mode, f"{r['tokens_per_s']:,.0f}", ratio, f"{r['step_ms_median']:.1f}", gpu, f"{r['host_ms_median']:.1f}", peak,
                     f"{r['compile_and_warmup_s']:.1f}", f"{r['loss']:.4f}"])  # fmt: skip
    adamw = "fused AdamW" if torch.device(args.device).type == "cuda" else "AdamW"
    body = [f"Shape {args.shape}, batch {args.batch_size} x {args.seq_len}{micro}, {how}, {adamw}; median of "
            f"{args.steps} timed steps after {args.warmup} warm-up steps; ratios to BF16 in this run; GPU ms (--gpu-time): "
            f"kernel time of a step (profiler, 2 steps in a pass after all modes are timed; near ms/step: GPU-bound); "
            f"host ms: time to enqueue a step."]  # fmt: skip
    body += [""] + _results.markdown_table(
        ["mode", "tok/s", "vs BF16", "ms/step", "GPU ms", "host ms", "peak GiB", "compile + warm-up s", "loss"], rows)
    if note := _recompiled_note(results):
        body += ["", note]
    if args.out:
        body += ["", f"Raw: `{args.out}`."]
    _results.record(args.results_md, f"hf-fp8 bench: {args.shape} ({device_name})", command,
                    _results.environment(torch.device(args.device)), body, args.note)  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.program = "python3 benchmarks/train_throughput.py"
    run(args)
