"""The `hf-fp8` command line (also `python -m hf_fp8`).

  hf-fp8 train     Train a small Llama-style byte-level language model twice from the same initial
                   weights on the same batches, once with FP8 linears (hf_fp8.convert_model +
                   hf_fp8.attach) and once in plain BF16, and compare their losses. Runs on CPU in
                   about a minute with no network: the text is the Python standard library's
                   own sources, read from this machine (see hf_fp8/_data.py).
  hf-fp8 inspect   Show which layers of a model (given by its config.json) would run in FP8 and
                   why the others would not, without loading weights or training.
  hf-fp8 push      Upload a directory written by a converted model's save_pretrained (weights,
                   config, fp8_state.safetensors, fp8_recipe.json) with its model card to the Hub.
  hf-fp8 bench     Training throughput of BF16, torchao tensorwise and hf_fp8 on one GPU, in one run
                   (hf_fp8.bench; also benchmarks/train_throughput.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

# hf_fp8 first: it installs the filters for torchao's import-time log noise before transformers
# imports torchao.
import hf_fp8
from hf_fp8 import FP8Recipe, attach, convert_model
from hf_fp8 import _data, bench as _bench

import torch
import transformers
import yaml
from tqdm import tqdm
from transformers import CONFIG_MAPPING, AutoModel, AutoModelForCausalLM, PreTrainedConfig

# The default `train` model: Llama-style (RMSNorm, RoPE, SwiGLU, grouped-query attention), small
# enough for a CPU. Every GEMM dimension is a multiple of 16, so every linear but the LM head (kept
# in high precision by the default recipe) runs in FP8. head_dim = 128 / 4 = 32.
DEFAULT_MODEL_CONFIG = {
    "model_type": "llama",
    "vocab_size": _data.VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}

# Learning-rate schedule: linear warm-up over this share of the steps, then cosine decay to
# MIN_LR_FRACTION of the peak. Fixed, so that FP8 and the baseline follow the same schedule.
WARMUP_FRACTION = 0.1
MIN_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.1
GRAD_CLIP_NORM = 1.0
# "Final train loss" averages the last steps: one batch's loss is too noisy to compare two runs.
FINAL_LOSS_STEPS = 20
# Held-out windows evaluated after training (fewer if the held-out text is short).
EVAL_WINDOWS = 64

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class UsageError(Exception):
    """Bad input the user can fix (a path, a config, a value); `main` prints it like argparse does."""


# ---------------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-fp8",
        description="FP8 training of Hugging Face models with delayed per-tensor scaling (torchao).",
    )
    parser.add_argument("--version", action="version", version=f"hf-fp8 {hf_fp8.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train a small model in FP8 and in BF16 and compare the losses",
        description=(
            "Train a causal LM (by default a small Llama-style byte-level model, random init) with FP8 "
            "linears and delayed scaling, then the same run (same init, same batches) in BF16, and "
            "print a comparison table. The text is the Python standard library's sources on this "
            "machine; nothing is downloaded."
        ),
    )
    train.add_argument("--model-config", type=Path, metavar="PATH",
                       help="a transformers config JSON (or a directory holding config.json) of a causal LM "
                            "with vocab_size >= 256; random init (default: a 2-layer Llama, hidden 128)")
    train.add_argument("--recipe", type=existing_file, metavar="PATH",
                       help="FP8Recipe as YAML or JSON (default: FP8Recipe())")
    train.add_argument("--steps", type=positive_int, default=300, help="optimizer steps per run (default 300)")
    train.add_argument("--batch-size", type=positive_int, default=8, help="sequences per step (default 8)")
    train.add_argument("--seq-len", type=positive_int, default=128, help="tokens (bytes) per sequence (default 128)")
    train.add_argument("--lr", type=positive_float, default=3e-3, help="peak AdamW learning rate (default 3e-3)")
    train.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    train.add_argument("--dtype", choices=tuple(COMPUTE_DTYPES), default="bf16",
                       help="compute dtype: bf16 (autocast; default) or fp32; master weights are fp32 either way")
    train.add_argument("--no-bf16-baseline", action="store_true",
                       help="train only the FP8 run (no high-precision comparison run)")
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order (default 0)")
    train.add_argument("--log-every", type=positive_int, default=25, metavar="N",
                       help="print the loss every N steps (default 25)")
    train.add_argument("--threads", type=positive_int, metavar="N",
                       help="CPU threads for torch (default: 1 with --device cpu, robust when other processes share the cores; else torch's default)")
    train.add_argument("--output-json", type=Path, metavar="PATH", help="also write the results as JSON")
    train.set_defaults(handler=run_train)

    inspect = commands.add_parser(
        "inspect",
        help="show which layers of a model would run in FP8, without training",
        description=(
            "Build a model from its config (no weights are loaded, nothing is downloaded; the model "
            "is built on the meta device), convert it with hf_fp8.convert_model and print the FP8 "
            "coverage report."
        ),
    )
    inspect.add_argument("model", type=Path, metavar="CONFIG_OR_MODEL_DIR",
                         help="a config JSON file, or a model directory containing config.json")
    inspect.add_argument("--recipe", type=existing_file, metavar="PATH", help="FP8Recipe as YAML or JSON")
    inspect.add_argument("--context", type=positive_int, metavar="TOKENS",
                         help="sequence length at which attention FLOPs are counted in the report "
                              "(default: the config's max_position_embeddings, at most 4096)")
    inspect.set_defaults(handler=run_inspect)

    push = commands.add_parser(
        "push",
        help="upload a saved FP8-trained model directory (weights, FP8 state, model card) to the Hub",
        description=(
            "Upload MODEL_DIR (written by save_pretrained of a model converted with hf_fp8: weights, "
            "config.json, fp8_state.safetensors, fp8_recipe.json) to the Hub model repo REPO_ID in one commit, "
            "creating the repo if needed. Its README.md is the model card; without one, a card is generated "
            "from config.json and fp8_recipe.json (uploaded, not written into MODEL_DIR). The token is "
            "huggingface_hub's (HF_TOKEN or `hf auth login`)."
        ),
    )
    push.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a directory written by save_pretrained")
    push.add_argument("repo_id", metavar="REPO_ID", help="the Hub model repo, e.g. user/llama-fp8")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    push.add_argument("--message", metavar="TEXT", help="commit message (default: 'Upload FP8-trained model (hf_fp8)')")
    push.add_argument("--dry-run", action="store_true", help="list what would be uploaded and print the card; contact nothing")
    push.set_defaults(handler=run_push)

    bench_parser = commands.add_parser(
        "bench",
        help="time training steps of BF16, torchao and hf_fp8 on one GPU (ratios to BF16, same run)",
        description=(
            "Training throughput of one model shape in several modes, in one process: BF16, torchao "
            "tensorwise (dynamic scaling), hf_fp8 (delayed scaling; linears, or linears + attention). "
            "Per-decoder-layer torch.compile, random tokens, median step time after warm-up."
        ),
    )
    _bench.add_arguments(bench_parser)
    bench_parser.set_defaults(handler=run_bench)
    return parser


def run_bench(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available (use --device cpu for a smoke run)")
    try:
        _bench.run(args)
    except ValueError as error:
        raise UsageError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # recorded by `bench --results-md`
    args.program = "python3 -m hf_fp8"
    try:
        args.handler(args)
    except UsageError as error:
        parser.exit(2, f"hf-fp8 {args.command}: error: {error}\n")
    return 0


# ---------------------------------------------------------------------------------------------
# Shared by both commands: configs and recipes from files
# ---------------------------------------------------------------------------------------------


def load_model_config(path: Path) -> PreTrainedConfig:
    """A transformers config from a JSON file or a directory holding config.json. Read locally with
    the config class of its `model_type` (never a Hub lookup, whatever the path looks like)."""
    if not path.exists():
        raise UsageError(f"{path} does not exist")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise UsageError(f"{path} is a directory without a config.json")
    try:
        data = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UsageError(f"{config_file} has no \"model_type\" (a transformers config JSON names its model type, e.g. \"llama\")")
    model_type = data["model_type"]
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"{config_file}: model_type {model_type!r} is not a model type of transformers {transformers.__version__}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{config_file}: {error}") from None


def load_recipe(path: Path | None) -> FP8Recipe:
    if path is None:
        return FP8Recipe()
    try:
        return FP8Recipe.from_file(path)
    except (OSError, TypeError, ValueError) as error:  # bad fields, bad JSON (JSONDecodeError is a ValueError)
        raise UsageError(str(error)) from None
    except yaml.YAMLError as error:
        raise UsageError(f"{path} is not valid YAML: {error}") from None


def convert(model: torch.nn.Module, recipe: FP8Recipe, context: int | None) -> hf_fp8.FP8Report:
    """convert_model, with its refusals (no eligible layer, unsupported recipe) as usage errors."""
    try:
        return convert_model(model, recipe, context=context)
    except (ValueError, NotImplementedError) as error:
        raise UsageError(str(error)) from None


def first_line(error: Exception) -> str:
    """transformers' "Unrecognized configuration class" errors go on to list every model class."""
    return str(error).strip().splitlines()[0]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# hf-fp8 inspect
# ---------------------------------------------------------------------------------------------


def model_on_meta_device(config: PreTrainedConfig, source) -> torch.nn.Module:
    """The model of `config` with no memory behind its weights (the meta device), so a 70B config
    builds in a second; fp32 master weights, as `train` uses. Not a causal LM (an encoder or
    encoder-decoder): its base model."""
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except ValueError:
            try:
                return AutoModel.from_config(config, dtype=torch.float32)
            except ValueError as error:
                raise UsageError(f"cannot build a model from {source}: {first_line(error)}") from None


def run_inspect(args: argparse.Namespace) -> None:
    config = load_model_config(args.model)
    recipe = load_recipe(args.recipe)
    model = model_on_meta_device(config, args.model)
    report = convert(model, recipe, args.context)
    print(
        f"{type(model).__name__} ({config.model_type}, {count_parameters(model) / 1e6:,.1f}M parameters) "
        f"from {args.model}, built on the meta device (no weights loaded)"
    )
    print(report)


# ---------------------------------------------------------------------------------------------
# hf-fp8 push
# ---------------------------------------------------------------------------------------------


def generated_card(model_dir: Path) -> str:
    """A model card for a saved directory without README.md: the model is built from config.json on
    the meta device (no weights loaded) and converted with the recipe of fp8_recipe.json."""
    from hf_fp8 import hub

    config = load_model_config(model_dir)
    recipe_file = model_dir / hub.FP8_RECIPE_NAME
    try:
        recipe = hub.read_fp8_recipe(recipe_file) if recipe_file.is_file() else FP8Recipe()
    except (OSError, TypeError, ValueError) as error:
        raise UsageError(f"{recipe_file}: {error}") from None
    model = model_on_meta_device(config, model_dir)
    report = convert(model, recipe, None)
    return str(hub.model_card(model, report))


def run_push(args: argparse.Namespace) -> None:
    from hf_fp8 import hub

    model_dir: Path = args.model_dir
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir} is not a directory (give the directory save_pretrained wrote)")
    if not (model_dir / "config.json").is_file():
        raise UsageError(f"{model_dir} has no config.json: not a save_pretrained directory")
    if not any((model_dir / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        raise UsageError(f"{model_dir} has no model.safetensors (or model.safetensors.index.json); hf-fp8 push uploads safetensors checkpoints only")
    if not args.repo_id.strip("/") or args.repo_id.count("/") > 1:
        raise UsageError(f"REPO_ID must be 'name' or 'namespace/name', got {args.repo_id!r}")
    notes = []
    if not (model_dir / hub.FP8_STATE_NAME).is_file():
        notes.append(f"note: no {hub.FP8_STATE_NAME} in {model_dir}: the FP8 training state is not uploaded (FP8 training cannot resume exactly from this repo)")
    extra = {}
    if (model_dir / hub.CARD_NAME).is_file():
        card_text = (model_dir / hub.CARD_NAME).read_text()
        card_source = f"{hub.CARD_NAME} of {model_dir}"
    else:
        card_text = generated_card(model_dir)
        extra[hub.CARD_NAME] = card_text.encode()
        card_source = "generated from config.json and fp8_recipe.json"
    for note in notes:
        print(note, file=sys.stderr)
    files = hub.upload_folder(model_dir, args.repo_id, dry_run=True, extra=extra)
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(files)} files to {args.repo_id} "
          f"({'private' if args.private else 'default visibility'}); model card: {card_source}")
    for name in files:
        print(f"  {name}")
    if args.dry_run:
        print()
        print(card_text)
        return
    from huggingface_hub.errors import HfHubHTTPError

    try:
        commit = hub.upload_folder(model_dir, args.repo_id, private=args.private or None,
                                   commit_message=args.message, extra=extra)
    except (HfHubHTTPError, OSError) as error:
        raise UsageError(f"upload to {args.repo_id} failed: {first_line(error)}") from None
    print(f"uploaded: {getattr(commit, 'commit_url', commit)}")


# ---------------------------------------------------------------------------------------------
# hf-fp8 train
# ---------------------------------------------------------------------------------------------


def run_train(args: argparse.Namespace) -> None:
    device = check_device(args.device)
    compute_dtype = COMPUTE_DTYPES[args.dtype]
    recipe = load_recipe(args.recipe)
    if args.seq_len < 2:
        raise UsageError("--seq-len must be >= 2 (a sequence of one token has nothing to predict)")
    if args.output_json is not None and not args.output_json.parent.is_dir():
        raise UsageError(f"--output-json: directory {args.output_json.parent} does not exist")

    model_config = load_model_config(args.model_config) if args.model_config else CONFIG_MAPPING["llama"].from_dict(DEFAULT_MODEL_CONFIG)
    check_model_config_for_training(model_config, args.seq_len)

    corpus = _data.load_corpus()
    if len(corpus.heldout) < args.seq_len or len(corpus.train) < args.seq_len:
        raise UsageError(
            f"--seq-len {args.seq_len} is longer than the held-out text ({len(corpus.heldout)} tokens) of the "
            f"{corpus.source}; use a shorter --seq-len"
        )

    with cpu_threads(device, args.threads):
        # One random init, deep-copied into each run: both start from identical weights.
        torch.manual_seed(args.seed)
        try:
            initial_model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        except ValueError as error:  # a config of a model type with no causal LM (e.g. T5, ViT)
            raise UsageError(f"cannot build a causal LM from the model config: {first_line(error)}") from None
        eval_batches = _data.evaluation_windows(corpus.heldout, args.seq_len, EVAL_WINDOWS).split(args.batch_size)

        print(
            f"model: {type(initial_model).__name__} ({model_config.model_type}), "
            f"{count_parameters(initial_model) / 1e6:.2f}M parameters, random init (seed {args.seed})"
        )
        print(corpus.describe())
        print(
            f"training: {args.steps} steps x {args.batch_size} sequences x {args.seq_len} tokens, "
            f"AdamW lr {args.lr:g}, {args.dtype} compute, fp32 master weights, device {device}"
        )

        runs = {"fp8": train_one_run("fp8", copy.deepcopy(initial_model), recipe, corpus, eval_batches, args, device, compute_dtype)}
        if not args.no_bf16_baseline:
            runs[args.dtype] = train_one_run(args.dtype, copy.deepcopy(initial_model), None, corpus, eval_batches, args, device, compute_dtype)

    results = {
        "model": {
            "class": type(initial_model).__name__,
            "parameters": count_parameters(initial_model),
            "config": model_config.to_diff_dict(),
        },
        "corpus": {"source": corpus.source, "train_tokens": len(corpus.train), "heldout_tokens": len(corpus.heldout)},
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "device": str(device),
            "dtype": args.dtype,
            "seed": args.seed,
            "recipe": recipe.to_dict(),
        },
        "runs": runs,
    }
    if not args.no_bf16_baseline:
        baseline = runs[args.dtype]
        results["fp8_over_baseline"] = {
            key: runs["fp8"][key] / baseline[key] for key in ("final_train_loss", "eval_loss", "tokens_per_s")
        }

    print()
    print(comparison_table(results))
    if args.output_json is not None:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results written to {args.output_json}")


def check_device(name: str) -> torch.device:
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device cuda: no CUDA device available to this torch ({torch.__version__})")
        if torch.cuda.get_device_capability() < (8, 9):
            raise UsageError(
                f"--device cuda: FP8 GEMMs need compute capability 8.9+ (Ada, Hopper or newer); "
                f"{torch.cuda.get_device_name()} has {'.'.join(map(str, torch.cuda.get_device_capability()))}"
            )
    return torch.device(name)


def check_model_config_for_training(config: PreTrainedConfig, seq_len: int) -> None:
    """Catch configs that cannot train on the byte-level corpus before building anything."""
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None or vocab_size < _data.VOCAB_SIZE:
        raise UsageError(
            f"the model config's vocab_size is {vocab_size}; the byte-level tokenizer needs vocab_size >= {_data.VOCAB_SIZE}"
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and max_positions < seq_len:
        raise UsageError(f"--seq-len {seq_len} exceeds the model config's max_position_embeddings ({max_positions})")


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None):
    """Run with `threads` intra-op CPU threads (default 1 on CPU), restoring torch's setting after.

    Why 1: the default model's ops are tiny, so extra threads gain little, while OpenMP threads
    that share cores with any other busy process wait for each other at every op. Measured on a
    2-core machine: 2 threads made a step 1.4x faster when the machine was idle, but ~50x slower
    than 1 thread while one other process kept a core busy."""
    if threads is None and device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or 1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def autocast_for(device: torch.device, compute_dtype: torch.dtype):
    """BF16 autocast (FP8 linears run their GEMMs in FP8 and return the autocast dtype), or
    nothing for fp32 compute."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=compute_dtype)


def learning_rate_factor(step: int, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to MIN_LR_FRACTION (multiplies the peak lr)."""
    warmup_steps = max(1, int(WARMUP_FRACTION * total_steps))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases), as usual for LMs."""
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    others = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": WEIGHT_DECAY}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def train_one_run(
    name: str,
    model: torch.nn.Module,
    recipe: FP8Recipe | None,
    corpus: _data.Corpus,
    eval_batches: tuple[torch.Tensor, ...],
    args: argparse.Namespace,
    device: torch.device,
    compute_dtype: torch.dtype,
) -> dict:
    """Train `model` for args.steps steps (in FP8 when `recipe` is given), evaluate it on the
    held-out windows, and return its numbers. The batch order depends on args.seed only."""
    print(f"\n=== {name} run ===")
    model.to(device)
    model.train()
    report = None
    if recipe is not None:
        report = convert(model, recipe, context=args.seq_len)
        print(report)
    optimizer = make_optimizer(model, args.lr)
    if recipe is not None:
        attach(model, optimizer)  # updates the FP8 scales after every optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, args.steps))
    batch_generator = torch.Generator().manual_seed(args.seed)

    losses: list[float] = []
    tokens_per_step = args.batch_size * args.seq_len
    train_seconds = 0.0
    progress = tqdm(range(args.steps), desc=f"{name} training", unit="step", mininterval=0.5, dynamic_ncols=True)
    for step in progress:
        batch = _data.sample_batch(corpus.train, args.batch_size, args.seq_len, batch_generator).to(device)
        started = time.perf_counter()
        with autocast_for(device, compute_dtype):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # .item() syncs, so the step is finished when timed
        train_seconds += time.perf_counter() - started

        progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            tqdm.write(
                f"[{name}] step {step + 1:>5}/{args.steps}  loss {losses[-1]:.4f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {tokens_per_step * (step + 1) / train_seconds:,.0f} tokens/s"
            )
    progress.close()
    eval_loss = evaluate(model, eval_batches, device, compute_dtype)

    final_train_loss = sum(losses[-FINAL_LOSS_STEPS:]) / len(losses[-FINAL_LOSS_STEPS:])
    print(f"[{name}] final train loss {final_train_loss:.4f} (mean of last {min(FINAL_LOSS_STEPS, len(losses))} steps), eval loss {eval_loss:.4f}")
    run = {
        "final_train_loss": final_train_loss,
        "eval_loss": eval_loss,
        "tokens_per_s": tokens_per_step * args.steps / train_seconds,
        "train_seconds": train_seconds,
        "losses": losses,
    }
    if report is not None:
        run["fp8_layers"] = len(report.converted)
        run["fp8_flop_fraction"] = report.fp8_flop_fraction
    return run


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: tuple[torch.Tensor, ...], device: torch.device, compute_dtype: torch.dtype) -> float:
    """Mean loss per predicted token over the held-out windows (FP8 models evaluate in FP8, with
    their trained delayed scales; eval mode records no amaxes)."""
    model.eval()
    total_loss, total_windows = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with autocast_for(device, compute_dtype):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        # Every window has the same length, so weighting by windows weights by tokens.
        total_loss += loss.item() * len(batch)
        total_windows += len(batch)
    model.train()
    return total_loss / total_windows


def comparison_table(results: dict) -> str:
    """The final table: one column per run, and FP8 / baseline when there is a baseline."""
    runs = results["runs"]
    names = list(runs)
    settings = results["settings"]
    title = (
        f"{' vs '.join(n.upper() for n in names)}: {results['model']['class']} "
        f"({results['model']['parameters'] / 1e6:.2f}M parameters), {settings['steps']} steps x "
        f"{settings['batch_size']} x {settings['seq_len']} tokens, {settings['device']}"
    )
    rows = [
        ("final train loss", "final_train_loss", "{:.4f}", "{:.4f}"),
        ("eval loss (held-out)", "eval_loss", "{:.4f}", "{:.4f}"),
        ("tokens/s (training)", "tokens_per_s", "{:,.0f}", "{:.3f}"),
    ]
    ratio_header = f"fp8/{names[1]}" if len(names) > 1 else None
    header = f"  {'':<22}" + "".join(f"{n:>12}" for n in names) + (f"{ratio_header:>12}" if ratio_header else "")
    lines = [title, header]
    for label, key, value_format, ratio_format in rows:
        line = f"  {label:<22}" + "".join(f"{value_format.format(runs[n][key]):>12}" for n in names)
        if ratio_header:
            line += f"{ratio_format.format(results['fp8_over_baseline'][key]):>12}"
        lines.append(line)
    lines.append(f"  final train loss: mean of the last {FINAL_LOSS_STEPS} steps' batch losses")
    if settings["device"] == "cpu":
        lines.append("  on CPU the FP8 GEMMs are emulated: tokens/s here says nothing about FP8 speed on a GPU")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
