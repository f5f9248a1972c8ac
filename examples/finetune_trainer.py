"""Fine-tune a causal LM with an ordinary transformers Trainer, in FP8: the only hf_fp8 lines are the
import and `callbacks=[FP8TrainerCallback()]` (hf_fp8.FP8TrainerCallback is the same class).

    python examples/finetune_trainer.py --tiny                 # tiny random Llama on CPU, < 1 min
    python examples/finetune_trainer.py --model PATH_OR_HUB_ID --text my_corpus.txt --bf16

--tiny uses a byte-level "tokenizer" (UTF-8 bytes, vocab 256) and generated text, so it needs no
download. With --model the model's own tokenizer is used.
"""

from __future__ import annotations

import argparse
import random

import torch
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
    default_data_collator,
)

from hf_fp8.integrations.trainer import FP8TrainerCallback  # also exported as hf_fp8.FP8TrainerCallback


def generated_text(n_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["the model", "a scale", "the gradient", "an amax", "the optimizer", "each layer"]
    verbs = ["tracks", "updates", "casts", "reduces", "stores", "follows"]
    objects = ["the history", "its maximum", "an e4m3 tensor", "the loss", "every step", "the margin"]
    return [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(n_lines)]


def blocks(ids: list[int], seq_len: int) -> dict[str, list[list[int]]]:
    n = len(ids) // seq_len
    chunks = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    return {"input_ids": chunks, "labels": [list(c) for c in chunks]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, byte tokens, generated text (CPU)")
    p.add_argument("--model", help="local path or hub id of a causal LM (ignored with --tiny)")
    p.add_argument("--text", help="a local text file to train on (default: generated text)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (always on with --tiny: CPU autocast)")
    p.add_argument("--output-dir", default="out/finetune_trainer")
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("give --tiny or --model")

    lines = open(args.text).read().splitlines() if args.text else generated_text(2000)
    text = "\n".join(lines)
    if args.tiny:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len))
        ids = list(text.encode("utf-8"))
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        ids = tokenizer(text)["input_ids"]
    model.config.use_cache = False
    train = Dataset.from_dict(blocks(ids, args.seq_len))

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16 or args.tiny,
        use_cpu=args.tiny,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        data_collator=default_data_collator,
        callbacks=[FP8TrainerCallback()],  # <- the one hf_fp8 line
    )
    result = trainer.train()
    print(f"final train loss {result.training_loss:.4f}")


if __name__ == "__main__":
    main()
