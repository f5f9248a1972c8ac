"""Fine-tune a causal LM with an ordinary transformers Trainer, in FP8: the only hf_fp8 lines are the
import and `callbacks=[FP8TrainerCallback()]` (hf_fp8.FP8TrainerCallback is the same class).

    python examples/finetune_trainer.py --tiny                 # tiny random Llama on CPU, < 1 min
    python examples/finetune_trainer.py --model PATH_OR_HUB_ID --text my_corpus.txt --bf16
    # real size on one GPU, no network (model directory from benchmarks/make_local_model.py):
    python examples/finetune_trainer.py --model /tmp/llama1b --text /tmp/llama1b/train.txt --bf16 \\
        --seq-len 2048 --batch-size 8 --steps 150 --lr 3e-4 --warmup-steps 10

--tiny uses a byte-level "tokenizer" (UTF-8 bytes, vocab 256) and generated text, so it needs no
download. With --model the model's own tokenizer is used, the text is packed into --seq-len blocks
(no padding), and the weights are loaded in --dtype (float32 by default: fp32 master weights, with
--bf16 for bf16 autocast). The Trainer runs on CUDA when available. The last line printed is a
one-line JSON summary (first/last logged loss, steps, tokens/s, peak CUDA memory, FP8 coverage).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from hf_fp8.integrations.trainer import FP8TrainerCallback  # also exported as hf_fp8.FP8TrainerCallback

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}


def generated_text(n_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["the model", "a scale", "the gradient", "an amax", "the optimizer", "each layer"]
    verbs = ["tracks", "updates", "casts", "reduces", "stores", "follows"]
    objects = ["the history", "its maximum", "an e4m3 tensor", "the loss", "every step", "the margin"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_lines)]


def tokenize_text(tokenizer, text: str, chunk_chars: int = 1 << 16) -> list[int]:
    """The whole text as one stream of token ids: cut at line ends into ~64 KB pieces and encoded as a
    batch (a fast tokenizer encodes the pieces in parallel; one 20 MB string would take one core)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    ids: list[int] = []
    for enc in tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(enc)
    return ids


def blocks(ids: list[int], seq_len: int) -> dict[str, list[list[int]]]:
    n = len(ids) // seq_len
    chunks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return {"input_ids": chunks, "labels": [list(c) for c in chunks]}


class StepTimer(TrainerCallback):
    """Wall time of the optimizer steps after the first (warm-up) one, and a log on the last step
    so the final loss is in the log history whatever --log-every is."""

    def __init__(self):
        self.t_first = self.t_last = None
        self.first_step = self.last_step = 0

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.t_first is None:
            self.t_first, self.first_step = self._now(), state.global_step
        if state.global_step >= state.max_steps:
            self.t_last, self.last_step = self._now(), state.global_step
            control.should_log = True
        return control


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, byte tokens, generated text (CPU)")
    p.add_argument("--model", help="local path or hub id of a causal LM (ignored with --tiny)")
    p.add_argument("--text", help="a local text file to train on (default: generated text)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per packed block")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per micro-batch (per device)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up, then constant learning rate")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (always on with --tiny: CPU autocast)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype the --model weights are loaded in (float32: fp32 master weights; default)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--log-every", type=int, default=10, help="Trainer logging steps (FP8 health stats on these steps)")
    p.add_argument("--output-dir", default="out/finetune_trainer")
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("give --tiny or --model")

    lines = open(args.text, encoding="utf-8").read().splitlines() if args.text else generated_text(2000)
    text = "\n".join(lines)
    if args.tiny:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len))
        ids = list(text.encode("utf-8"))
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:  # not needed for packed blocks, but some collators/tools expect one
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype])
        ids = tokenize_text(tokenizer, text)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and args.seq_len > max_pos:
            p.error(f"--seq-len {args.seq_len} > the model's max_position_embeddings {max_pos}")
        vocab = model.get_input_embeddings().num_embeddings
        if ids and max(ids) >= vocab:
            p.error(f"the tokenizer gives id {max(ids)} but the model's embedding has {vocab} rows")
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train = Dataset.from_dict(blocks(ids, args.seq_len))
    if len(train) < args.batch_size:
        p.error(f"the text gives {len(train)} blocks of {args.seq_len} tokens, fewer than --batch-size {args.batch_size}")
    print(f"data: {len(ids):,} tokens -> {len(train)} blocks of {args.seq_len}; "
          f"{args.steps} steps x {args.batch_size} x {args.grad_accum} blocks")

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup" if args.warmup_steps else "constant",
        warmup_steps=args.warmup_steps,
        logging_steps=args.log_every,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16 or args.tiny,
        use_cpu=args.tiny or not torch.cuda.is_available(),  # CUDA when there is one
        disable_tqdm=True,
        seed=0,
    )
    fp8 = FP8TrainerCallback()
    timer = StepTimer()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=default_data_collator,
        callbacks=[fp8, timer],  # <- fp8 is the one hf_fp8 line; timer only feeds the summary below
    )
    result = trainer.train()
    print(f"final train loss {result.training_loss:.4f}")

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len * training_args.world_size
    timed_steps = timer.last_step - timer.first_step
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    summary = {
        "example": "finetune_trainer",
        "model": "tiny" if args.tiny else args.model,
        "device": str(training_args.device),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "bf16_autocast": training_args.bf16,
        "steps": trainer.state.global_step,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "tokens_per_step": tokens_per_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,  # mean over the last logging interval
        "train_loss": result.training_loss,
        # steps after the first (warm-up) one; the first step alone when only one ran
        "tokens_per_s": (round(tokens_per_step * timed_steps / (timer.t_last - timer.t_first), 1) if timed_steps > 0
                         else round(tokens_per_step * trainer.state.global_step / result.metrics["train_runtime"], 1)),
        "train_runtime_s": round(result.metrics["train_runtime"], 2),
        "peak_cuda_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        **(fp8.report.summary() if fp8.report is not None else {"fp8_layers": 0}),
        "fp8_scale_updates": fp8.scale_updates,
        "fp8_anomalies": len(fp8.anomalies),
    }
    if summary["last_loss"] is not None and not math.isfinite(summary["last_loss"]):
        print("warning: the last loss is not finite")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
