"""Training quality of FP8 (hf_fp8, delayed scaling) against BF16 on real text, one device.

Data (no network): the Python standard library's *.py sources on this machine (sorted by path;
site-packages, __pycache__ and the generated encodings/ tables left out; its test suite included
unless --no-stdlib-tests: ~34 MB, ~8M tokens on CPython 3.11), read in order until --max-bytes; every --heldout-every-th file is held out for evaluation. A
byte-level BPE tokenizer is trained here with `tokenizers` on the training files only (vocab 8192,
1024 with --tiny), each file is encoded followed by <|endoftext|>, and the token stream is cut into
blocks of --seq-len tokens held in `datasets.Dataset`s. The tokenizer's hash is stored in each
result, so two runs can be checked to have seen the same tokens.

Run: a Llama (d 768, 12 layers, 12 query / 4 KV heads, FFN 2048) or a FOG-max (same d/layers/heads,
non-gated xIELU MLP of 3072) of ~125M shape; --tiny: 2-layer d-64 shapes for CPU smoke runs.
`--mode bf16`: fp32 master weights under bf16 autocast. `--mode fp8`: the same, after
`hf_fp8.convert_model(model, FP8Recipe(attention=True))` (or `--recipe FILE`; `--no-fp8-attention`:
linears only) and `hf_fp8.attach(model, optimizer)` (the LM head and embeddings stay in high
precision, as in the recipe's default skip list). Both modes use the same seed, initial weights and
batch order. AdamW (0.9, 0.95), weight decay 0.1 on matrices, linear warm-up then cosine decay to
--min-lr-ratio * --lr, gradient clipping at 1.0.

Logged: loss, grad norm (pre-clip), learning rate and step time every step; held-out loss every
--eval-every steps (and at the end); every --stats-every steps one training step runs inside
`hf_fp8.collect_fp8_stats(model)` and its `stats.flat()` is logged (kurtosis of the QKV outputs, MLP
down-projection inputs and block outputs, mean and max over blocks; worst overflow/underflow
fraction and lowest SQNR of the FP8 casts, and the SQNR per module name and role; in bf16 mode only
the kurtosis). One JSON per run goes to --out-dir as
`{model}_{mode}_{tag}.json`; it is rewritten at every eval, so a run cut short keeps its log.
`--plot` turns every JSON in --out-dir into PNGs in --plot-dir, one figure per metric.

Parity runs (H200; ~125M shape, 2000 steps of 16 x 1024 tokens, each under the 8-minute budget;
FP8 attention runs cuDNN's fused kernel there; benchmarks/RESULTS.md has the exact commands):

  python benchmarks/quality.py --model llama   --mode bf16 --steps 2000 --tag parity
  python benchmarks/quality.py --model llama   --mode fp8  --steps 2000 --tag parity
  python benchmarks/quality.py --model fog-max --mode bf16 --steps 2000 --tag parity
  python benchmarks/quality.py --model fog-max --mode fp8  --steps 2000 --tag parity

Stress runs (a high learning rate and short warm-up, where the paper's Llama FP8 attention
diverges and FOG should not):

  python benchmarks/quality.py --model llama   --mode fp8  --steps 2000 --lr 3e-3 --warmup 50 --tag stress
  python benchmarks/quality.py --model llama   --mode bf16 --steps 2000 --lr 3e-3 --warmup 50 --tag stress
  python benchmarks/quality.py --model fog-max --mode fp8  --steps 2000 --lr 3e-3 --warmup 50 --tag stress

Then the figures:

  python benchmarks/quality.py --plot          # benchmarks/results/quality/*.json -> benchmarks/plots/*.png

Add --compile for per-decoder-layer torch.compile (stats steps then run eagerly, under
torch.compiler.set_stance("force_eager"), so the stats hooks cause no recompiles), and --max-minutes
to stop cleanly inside a time budget.
CPU smoke run (seconds): python benchmarks/quality.py --tiny --steps 6 --eval-every 3 --stats-every 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch

from hf_fp8._data import python_source_files, stdlib_source_files

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = ROOT / "benchmarks" / "results" / "quality"
DEFAULT_PLOT_DIR = ROOT / "benchmarks" / "plots"
EOS = "<|endoftext|>"

LLAMA_SHAPES = {
    # head dim 128, the paper's (and the only one cuDNN's FP8 attention backward takes on Hopper)
    "default": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
FOG_SHAPES = {
    "default": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=6, num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}
TINY_DEFAULTS = dict(max_bytes=1_000_000, vocab_size=1024, seq_len=64, batch_size=4, eval_blocks=16, warmup=2)
FULL_DEFAULTS = dict(max_bytes=50_000_000, vocab_size=8192, seq_len=1024, batch_size=16, eval_blocks=128, warmup=200)


# ----------------------------------------------------------------------------------------- data


_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "encodings"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_files(include_tests: bool = True) -> list[Path]:
    """The stdlib's *.py files sorted by relative path: installed packages, bytecode caches and the
    generated codec tables (encodings/) left out; the stdlib's own test suite too unless include_tests
    (it roughly triples the text: ~34 MB instead of ~11 MB on CPython 3.11)."""
    return stdlib_source_files(_SKIP_DIRS if include_tests else _SKIP_DIRS | _TEST_DIRS)


def read_documents(max_bytes: int, heldout_every: int, include_tests: bool = True,
                   text_dirs: tuple[str, ...] = ()) -> tuple[list[str], list[str], int]:  # fmt: skip
    """(train texts, held-out texts, files read): the stdlib's files, then those of each of
    `text_dirs`, in sorted order until max_bytes; every heldout_every-th file (the 0th, k-th, 2k-th,
    ...) is held out."""
    train, heldout, total, n = [], [], 0, 0
    paths = stdlib_files(include_tests) + [p for d in text_dirs for p in python_source_files(d)]
    for path in paths:
        if total >= max_bytes:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if not text.strip():
            continue
        (heldout if n % heldout_every == 0 else train).append(text)
        total += len(text.encode("utf-8"))
        n += 1
    if not train or not heldout:
        raise RuntimeError(f"too few stdlib sources found ({n} files); raise --max-bytes or check the Python install")
    return train, heldout, n


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return tok


def to_blocks(tok, texts: list[str], seq_len: int) -> list[list[int]]:
    """Each text encoded and followed by EOS, concatenated, cut into full blocks of seq_len."""
    eos = tok.token_to_id(EOS)
    stream: list[int] = []
    for enc in tok.encode_batch(texts):
        stream.extend(enc.ids)
        stream.append(eos)
    n = len(stream) // seq_len
    return [stream[i * seq_len : (i + 1) * seq_len] for i in range(n)]


def build_data(args):
    import datasets

    t0 = time.perf_counter()
    train_texts, heldout_texts, n_files = read_documents(args.max_bytes, args.heldout_every, args.stdlib_tests, tuple(args.text_dirs))
    tok = train_tokenizer(train_texts, args.vocab_size)
    train_blocks = to_blocks(tok, train_texts, args.seq_len)
    heldout_blocks = to_blocks(tok, heldout_texts, args.seq_len)[: args.eval_blocks]
    if len(train_blocks) < 1 or len(heldout_blocks) < 1:
        raise RuntimeError("not enough text for one training and one held-out block; raise --max-bytes or lower --seq-len")
    train_ds = datasets.Dataset.from_dict({"input_ids": train_blocks}).with_format("torch")
    heldout_ds = datasets.Dataset.from_dict({"input_ids": heldout_blocks}).with_format("torch")
    vocab_json = json.dumps(tok.get_vocab(), sort_keys=True)
    info = {
        "source": f"python {platform.python_version()} stdlib *.py ({sysconfig.get_paths()['stdlib']})" + "".join(f" + {d}/**.py" for d in args.text_dirs),
        "files": n_files,
        "train_files": len(train_texts),
        "heldout_files": len(heldout_texts),
        "train_bytes": sum(len(t.encode("utf-8")) for t in train_texts),
        "train_blocks": len(train_ds),
        "train_tokens": len(train_ds) * args.seq_len,
        "heldout_blocks_used": len(heldout_ds),
        "tokenizer_vocab": tok.get_vocab_size(),
        "tokenizer_sha256": hashlib.sha256(vocab_json.encode()).hexdigest()[:16],
        "prep_s": time.perf_counter() - t0,
    }
    return train_ds, heldout_ds, tok.get_vocab_size(), info


# ---------------------------------------------------------------------------------------- model


def _shape(shape: dict, args) -> dict:
    """The shape dict, with --layers applied."""
    return {**shape, "num_hidden_layers": args.layers} if args.layers else shape


def build_model(args, vocab_size: int):
    shape = "tiny" if args.tiny else "default"
    # Round the vocabulary up to a multiple of 64 (GEMM-friendly; the extra rows are never targets).
    vocab = -(-vocab_size // 64) * 64
    torch.manual_seed(args.seed)
    if args.model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, max_position_embeddings=args.seq_len, rope_theta=500000.0,
                             tie_word_embeddings=False, **_shape(LLAMA_SHAPES[shape], args))
        config.use_cache = False
        model = LlamaForCausalLM(config)
    else:
        import hf_fp8

        config = hf_fp8.FOGConfig(variant=args.model, vocab_size=vocab, max_position_embeddings=args.seq_len,
                                  rope_theta=500000.0, tie_word_embeddings=False, use_cache=False, **_shape(FOG_SHAPES[shape], args))
        model = hf_fp8.FOGForCausalLM(config)
    return model


def make_optimizer(model, args, device):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def lr_at(step: int, args) -> float:
    """Linear warm-up over args.warmup steps, then cosine to min_lr_ratio * lr at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    ratio = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return args.lr * ratio


def batch_order(n_blocks: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Indices of each step's batch: epochs of seeded permutations, the same for every mode."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(torch.randperm(n_blocks, generator=gen).tolist())
    return [torch.tensor(order[i * batch_size : (i + 1) * batch_size]) for i in range(steps)]


@torch.no_grad()
def evaluate(model, heldout_ds, args, device, autocast) -> float:
    model.eval()  # FP8 layers record no amaxes outside training mode
    total, count = 0.0, 0
    for i in range(0, len(heldout_ds), args.batch_size):
        ids = heldout_ds[i : i + args.batch_size]["input_ids"].to(device)
        with autocast():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        total += loss.float().item() * ids.shape[0]
        count += ids.shape[0]
    model.train()
    return total / count


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def versions() -> dict:
    import tokenizers
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "tokenizers": tokenizers.__version__}
    for name in ("torchao", "hf_fp8", "datasets"):
        try:
            out[name] = getattr(__import__(name), "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def finite_or_none(x):
    return x if x is not None and math.isfinite(x) else None


def run(args) -> dict:
    import hf_fp8

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    train_ds, heldout_ds, vocab_size, data_info = build_data(args)
    print(json.dumps({"data": data_info}), flush=True)

    model = build_model(args, vocab_size).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    report = None
    if args.mode == "fp8":
        recipe = hf_fp8.FP8Recipe.from_file(args.recipe) if args.recipe else hf_fp8.FP8Recipe(attention=True)
        if not args.fp8_attention:
            recipe = dataclasses.replace(recipe, attention=False)
        report = hf_fp8.convert_model(model, recipe)
        print(report, flush=True)
    if args.compile:
        for layer in hf_fp8.stats.decoder_blocks(model):
            layer[1].compile()
    model.train()
    opt = make_optimizer(model, args, device)
    if args.mode == "fp8":
        hf_fp8.attach(model, opt)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.model}_{args.mode}_{args.tag}.json"
    config = {k: v for k, v in vars(args).items() if k not in ("plot", "plot_dir")}
    result = {
        "name": f"{args.model}_{args.mode}_{args.tag}",
        "config": config,
        "model_config": model.config.to_dict(),
        "n_params": n_params,
        "data": data_info,
        "fp8_report": str(report) if report is not None else None,
        "fp8_flop_fraction": getattr(report, "fp8_flop_fraction", None),
        "versions": versions(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "log": [],
        "eval": [],
        "stats": [],
        "final_eval_loss": None,
        "diverged_at": None,
        "completed_steps": 0,
        "wall_s": None,
        "train_s": None,
    }

    def save():
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, path)

    batches = batch_order(len(train_ds), args.steps, args.batch_size, args.seed + 1)
    t_start = time.perf_counter()
    nonfinite_run = 0
    step = 0
    for step in range(args.steps):
        if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes:
            print(f"stopping at step {step}: --max-minutes {args.max_minutes} reached", flush=True)
            result["stopped_early"] = f"max_minutes at step {step}"
            break
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        ids = train_ds[batches[step]]["input_ids"].to(device, non_blocking=True)
        want_stats = args.stats_every > 0 and (step % args.stats_every == 0 or step == args.steps - 1)
        sync(device)
        t0 = time.perf_counter()
        stats = hf_fp8.collect_fp8_stats(model) if want_stats else None
        if stats is not None:
            stats.start()
        # A stats step under --compile runs eagerly: the stats hooks inside compiled layers would
        # otherwise recompile every layer per step and exhaust dynamo's recompile limit.
        stance = (torch.compiler.set_stance("force_eager") if args.compile and stats is not None
                  else contextlib.nullcontext())
        try:
            with stance, autocast():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
        finally:
            if stats is not None:
                stats.stop()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()  # attach(): FP8 scales update right after
        opt.zero_grad(set_to_none=True)
        loss_v, gnorm_v = loss.item(), grad_norm.item()
        sync(device)
        dt = time.perf_counter() - t0
        result["log"].append({"step": step, "loss": finite_or_none(loss_v), "grad_norm": finite_or_none(gnorm_v),
                              "lr": lr, "step_s": dt})
        if stats is not None:
            flat = {k: finite_or_none(v) for k, v in stats.flat().items()}
            result["stats"].append({"step": step, **flat})
        if step % args.log_every == 0 or step == args.steps - 1:
            extra = ""
            if stats is not None:
                extra = "  kurt qkv {:.2f}  overflow {}".format(
                    flat.get("fp8/kurtosis/qkv_mean") or float("nan"), flat.get("fp8/overflow_max"))
            print(f"step {step:5d}  loss {loss_v:.4f}  gnorm {gnorm_v:.3f}  lr {lr:.2e}  {1000 * dt:.0f} ms{extra}", flush=True)
        result["completed_steps"] = step + 1
        if not math.isfinite(loss_v):
            nonfinite_run += 1
            if result["diverged_at"] is None:
                result["diverged_at"] = step
            if nonfinite_run >= args.stop_after_nonfinite:
                print(f"stopping: {nonfinite_run} non-finite losses in a row", flush=True)
                result["stopped_early"] = f"non-finite loss at step {step}"
                break
        else:
            nonfinite_run = 0
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            ev = evaluate(model, heldout_ds, args, device, autocast)
            result["eval"].append({"step": step + 1, "loss": finite_or_none(ev)})
            print(f"eval  step {step + 1:5d}  held-out loss {ev:.4f}", flush=True)
            result["train_s"] = time.perf_counter() - t_start
            save()
    final = evaluate(model, heldout_ds, args, device, autocast)
    result["eval"].append({"step": result["completed_steps"], "loss": finite_or_none(final)})
    result["final_eval_loss"] = finite_or_none(final)
    result["train_s"] = time.perf_counter() - t_start
    result["wall_s"] = result["train_s"] + data_info["prep_s"]
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    save()
    print(f"final held-out loss {final:.4f}  ({result['completed_steps']} steps, {result['train_s']:.1f} s)  -> {path}", flush=True)
    return result


# ----------------------------------------------------------------------------------------- plot

PLOTS = {
    # file stem: (title, y label, source list, key, log y, ema smoothing); log y "symlog": log above
    # SYMLOG_LINTHRESH, linear below it, so zeros stay on the plot (overflow is often exactly 0)
    "loss": ("training loss", "loss", "log", "loss", False, True),
    "eval_loss": ("held-out loss", "loss", "eval", "loss", False, False),
    "grad_norm": ("gradient norm (pre-clip)", "grad norm", "log", "grad_norm", True, True),
    "kurtosis_qkv": ("QKV kurtosis (mean over blocks)", "kurtosis", "stats", "fp8/kurtosis/qkv_mean", True, False),
    "kurtosis_qkv_max": ("QKV kurtosis (max over blocks)", "kurtosis", "stats", "fp8/kurtosis/qkv_max", True, False),
    "kurtosis_mlp_down": ("MLP down-proj input kurtosis (mean)", "kurtosis", "stats", "fp8/kurtosis/mlp_down_input_mean", True, False),
    "kurtosis_block_output": ("block output kurtosis (mean over blocks)", "kurtosis", "stats", "fp8/kurtosis/block_output_mean", True, False),
    "kurtosis_block_output_max": ("block output kurtosis (max over blocks)", "kurtosis", "stats", "fp8/kurtosis/block_output_max", True, False),
    "overflow": ("FP8 overflow (worst fraction over layers/roles)", "fraction", "stats", "fp8/overflow_max", "symlog", False),
    "underflow": ("FP8 underflow (worst fraction over layers/roles)", "fraction", "stats", "fp8/underflow_max", True, False),
    "sqnr": ("FP8 cast SQNR (lowest over layers/roles)", "dB", "stats", "fp8/sqnr_min_db", False, False),
}

SYMLOG_LINTHRESH = 1e-8  # below the smallest nonzero fraction of a 16 x 1024 x 3072 tensor (2e-8)


def ema(values: list, alpha: float = 0.05) -> list:
    out, acc = [], None
    for v in values:
        if v is None:
            out.append(None)
            continue
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


_STEP_LINE = re.compile(r"^step +(\d+)  loss (\S+)  gnorm (\S+)  lr (\S+)  (\d+) ms(?:  kurt qkv (\S+)  overflow (\S+))?$")
_EVAL_LINE = re.compile(r"^eval  step +(\d+)  held-out loss (\S+)$")
_FINAL_LINE = re.compile(r"^final held-out loss (\S+)  \((\d+) steps, (\S+) s\)  -> (\S+)$")


def import_log(log_path: Path) -> dict:
    """A result JSON rebuilt from a run's console output, for runs whose JSON was lost: the printed
    subset only (training loss/grad norm every --log-every steps, held-out loss, mean QKV kurtosis
    and worst overflow on stats steps that were also log steps). Marked `reconstructed_from_log`."""

    def num(text: str):
        value = float(text) if text not in ("None", "nan") else None
        return value if value is None or math.isfinite(value) else None

    result = {"name": None, "log": [], "eval": [], "stats": [], "diverged_at": None, "reconstructed_from_log": str(log_path)}
    for line in Path(log_path).read_text().splitlines():
        if line.startswith('{"data"'):
            result["data"] = json.loads(line)["data"]
        elif m := _STEP_LINE.match(line):
            step = int(m[1])
            result["log"].append({"step": step, "loss": num(m[2]), "grad_norm": num(m[3]), "lr": float(m[4]), "step_s": int(m[5]) / 1000})
            if m[2] in ("nan", "inf") and result["diverged_at"] is None:
                result["diverged_at"] = step
            if m[6] is not None:
                result["stats"].append({"step": step, "fp8/kurtosis/qkv_mean": num(m[6]), "fp8/overflow_max": num(m[7])})
        elif m := _EVAL_LINE.match(line):
            result["eval"].append({"step": int(m[1]), "loss": num(m[2])})
        elif m := _FINAL_LINE.match(line):
            result["final_eval_loss"], result["completed_steps"], result["train_s"] = num(m[1]), int(m[2]), float(m[3])
            result["name"] = Path(m[4]).stem
            result["eval"].append({"step": int(m[2]), "loss": num(m[1])})
    if result["name"] is None:
        raise ValueError(f"{log_path}: no 'final held-out loss ... -> NAME.json' line; not a complete quality.py log")
    return result


def has_tag(name: str, tag: str) -> bool:
    """Whether run `name` (MODEL_MODE_TAG[_VARIANT]) belongs to `tag`: "parity125" takes
    "llama_fp8_parity125" and "llama_fp8_parity125_linears", not "llama_fp8_parity"."""
    return name.endswith(f"_{tag}") or f"_{tag}_" in name


def plot(out_dir: Path, plot_dir: Path, tag: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for f in sorted(Path(out_dir).glob("*.json")):
        try:
            runs.append(json.loads(f.read_text()))
        except (json.JSONDecodeError, OSError) as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
    if tag is not None:
        runs = [r for r in runs if has_tag(str(r.get("name", "")), tag)]
    if not runs:
        raise SystemExit(f"no result JSONs in {out_dir}" + (f" named *_{tag}" if tag else ""))
    plot_dir = Path(plot_dir)
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, (title, ylabel, source, key, logy, smooth) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        drawn = 0
        for r in runs:
            rows = [row for row in r.get(source, []) if row.get(key) is not None]
            if not rows:
                continue
            xs = [row["step"] for row in rows]
            ys = [row[key] for row in rows]
            label = r.get("name", "?")
            if smooth and len(ys) > 20:
                ax.plot(xs, ys, alpha=0.15, linewidth=0.8)
                ax.plot(xs, ema(ys), label=label, color=ax.lines[-1].get_color())
            else:
                ax.plot(xs, ys, label=label, marker="o" if len(ys) < 50 else None, markersize=3)
            if r.get("diverged_at") is not None:
                ax.axvline(r["diverged_at"], linestyle=":", color=ax.lines[-1].get_color())
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        if logy == "symlog":
            ax.set_yscale("symlog", linthresh=SYMLOG_LINTHRESH)
        elif logy and all(v > 0 for line in ax.lines for v in line.get_ydata() if v == v):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        target = plot_dir / (f"{tag}_{stem}.png" if tag else f"{stem}.png")
        fig.savefig(target, dpi=120)
        plt.close(fig)
        written.append(target)
        print(f"wrote {target}")
    return written


# ----------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["llama", "fog-max"], default="llama")
    p.add_argument("--mode", choices=["bf16", "fp8"], default="fp8")
    p.add_argument("--recipe", default=None, metavar="FILE",
                   help="fp8 mode: FP8 recipe YAML/JSON (default: the paper recipe with attention on)")
    p.add_argument("--fp8-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="fp8 mode: attention's two matmuls in FP8 too (--no-fp8-attention: linears only)")
    p.add_argument("--tag", default="parity", help="third part of the result name (e.g. parity, stress)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1 MB of text, vocab 1024 (CPU smoke runs)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default 12; 2 with --tiny): 18 gives ~125M parameters at vocab 8192")
    p.add_argument("--batch-size", type=int, default=None, help="blocks per step (16; 4 with --tiny)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per block (1024; 64 with --tiny)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (200; 2 with --tiny)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-blocks", type=int, default=None, help="held-out blocks per eval (128; 16 with --tiny)")
    p.add_argument("--stats-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--max-bytes", type=int, default=None, help="stdlib text to read (50 MB; 1 MB with --tiny)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (8192; 1024 with --tiny)")
    p.add_argument("--stdlib-tests", action=argparse.BooleanOptionalAction, default=True,
                   help="include the stdlib's own test suite (Lib/test, ...) in the corpus")
    p.add_argument("--text-dirs", nargs="*", default=[], metavar="DIR",
                   help="more local *.py sources read after the stdlib (e.g. an installed package's directory)")
    p.add_argument("--heldout-every", type=int, default=10, help="every k-th file is held out")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training cleanly after this long")
    p.add_argument("--stop-after-nonfinite", type=int, default=20, help="stop after this many non-finite losses in a row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR))
    p.add_argument("--plot", action="store_true", help="only plot the JSONs in --out-dir")
    p.add_argument("--plot-tag", default=None, help="with --plot: only runs whose name ends in _TAG (file names get TAG_)")
    p.add_argument("--import-log", nargs="+", metavar="LOG", help="only rebuild result JSONs (into --out-dir) from console logs")
    p.add_argument("--plot-dir", default=str(DEFAULT_PLOT_DIR))
    args = p.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        plot(Path(args.out_dir), Path(args.plot_dir), args.plot_tag)
        return
    if args.import_log:
        for log in args.import_log:
            result = import_log(Path(log))
            path = Path(args.out_dir) / f"{result['name']}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=1))
            print(f"{log} -> {path}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run(args)


if __name__ == "__main__":
    main()
