"""Write a random-init Hugging Face causal LM directory (config, bf16 safetensors weights, a byte-level
BPE tokenizer trained here, and the training text) that `--model DIR` of examples/finetune_trainer.py
and examples/lora_fp8.py load with no network: `AutoTokenizer.from_pretrained(DIR)` and
`AutoModelForCausalLM.from_pretrained(DIR)` see an ordinary local checkpoint.

    python benchmarks/make_local_model.py --shape tiny --out /tmp/tiny            # CPU, seconds
    python benchmarks/make_local_model.py --shape llama-1b --out /tmp/llama1b     # ~1.1B params, 2.2 GB

Shapes (LlamaForCausalLM, untied LM head):
  llama-1b  hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads, vocab 32768,
            max_position_embeddings 4096: 1.107B parameters.
  tiny      hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, max_position_embeddings 2048,
            vocab = the trained tokenizer's size rounded up to a multiple of 16 (target --vocab-size 512).

Text (`--text FILE`, else the Python standard library's own *.py sources, sorted by path, site-packages
and bytecode caches left out), up to --max-text-mb MB, is written to DIR/train.txt; the tokenizer is
trained on it (`tokenizers` ByteLevel BPE, special tokens <|endoftext|> = eos = bos and <|pad|> = pad)
and saved as a PreTrainedTokenizerFast. The model is built on the meta device and its parameters are
materialized directly in bf16 with the Llama init (normal(0, initializer_range) matrices, unit norms).

Real size on one GPU (one H200; each run ~2 minutes including start-up; no network needed):

    python3 benchmarks/make_local_model.py --shape llama-1b --out /tmp/llama1b
    # full fine-tune with the Trainer: fp32 master weights, bf16 autocast, FP8 linears, 16k tokens/step
    python3 examples/finetune_trainer.py --model /tmp/llama1b --text /tmp/llama1b/train.txt --bf16 \\
        --seq-len 2048 --batch-size 8 --grad-accum 1 --steps 150 --lr 3e-4 --warmup-steps 10 \\
        --output-dir /tmp/ft_llama1b
    # LoRA (rank 16) on the frozen bf16 FP8 base, 16k tokens/step
    python3 examples/lora_fp8.py --model /tmp/llama1b --text /tmp/llama1b/train.txt \\
        --seq-len 2048 --batch-size 8 --steps 150 --lr 1e-3 --output-dir /tmp/lora_llama1b

Each example ends with one JSON line (first/last loss, steps, tokens/s, peak CUDA memory, FP8
coverage): `... | tail -n 1` records it. Estimates, not yet measured on a GPU: the full fine-tune
holds 1.1B params x 16 bytes (fp32 weights, grads, AdamW moments) ~ 18 GB plus eager activations at
8 x 2048 tokens, roughly 50-70 GB peak in all; the LoRA run 2.2 GB of bf16 weights plus activations of the
same order. At
the ~40-50k tokens/s expected eager (the compiled 1.5B benchmark runs ~85k), 150 steps of 16k tokens
take about a minute, plus ~30 s of start-up (tokenizing train.txt: ~5M tokens). If a run is slower,
lower --steps; if memory is short, add --gradient-checkpointing (Trainer example) or lower --batch-size.
Random weights: the loss starts at ~ln(32768) = 10.4 and falls; the runs show that FP8 training
works and learns at this size, not fine-tuning quality.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from hf_fp8._data import python_source_files

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32768, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=None, max_position_embeddings=2048),
}
TINY_VOCAB = 512  # BPE target of the tiny shape (its config takes the tokenizer's actual size)
EOS, PAD = "<|endoftext|>", "<|pad|>"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files() -> list[Path]:
    """*.py under the standard library directory (os.__file__'s), sorted by relative path; installed
    packages, bytecode caches and the per-machine _sysconfigdata* left out."""
    return python_source_files(os.path.dirname(os.__file__), SKIP_DIRS)


def read_text(text_file: str | None, max_bytes: int) -> tuple[list[str], str]:
    """(documents, description): the --text file as one document, else stdlib files (UTF-8 ones) until max_bytes."""
    if text_file:
        data = Path(text_file).read_bytes()[:max_bytes].decode("utf-8", errors="ignore")
        if not data.strip():
            raise SystemExit(f"--text {text_file} is empty")
        return [data], f"{text_file} ({len(data.encode()):,} bytes)"
    docs, total = [], 0
    for path in stdlib_files():
        if total >= max_bytes:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        data = text.encode("utf-8")
        if len(data) > max_bytes - total:  # the last file, cut
            text = data[: max_bytes - total].decode("utf-8", errors="ignore")
        elif not text.endswith("\n"):
            text += "\n"
        if text.strip():
            docs.append(text)
            total += len(text.encode("utf-8"))
    if not docs:
        raise SystemExit(f"no stdlib sources under {os.path.dirname(os.__file__)}; pass --text FILE")
    return docs, f"{len(docs)} Python stdlib files under {os.path.dirname(os.__file__)} ({total:,} bytes)"


def line_chunks(docs: list[str], size: int = 1 << 20):
    """Each document cut at line ends into pieces of about `size` characters."""
    for doc in docs:
        start = 0
        while start < len(doc):
            end = doc.find("\n", start + size)
            end = len(doc) if end < 0 else end + 1
            yield doc[start:end]
            start = end


def train_tokenizer(docs: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE (GPT-2 style pre-tokenization, no unknown tokens) as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    pieces = list(line_chunks(docs))  # pieces of <= ~1 MB: the trainer counts words in parallel over them
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=model_max_length)


def build_model(config, seed: int):
    """LlamaForCausalLM with parameters built on the meta device and then materialized in bf16 on the
    CPU with the Llama init; buffers (RoPE inv_freq) are built for real. Tied weights stay tied."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    done: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) not in done:
                    t = torch.empty(p.shape, dtype=torch.bfloat16)
                    if p.dim() >= 2:
                        t.normal_(0.0, std, generator=gen)
                        pad = getattr(module, "padding_idx", None)
                        if isinstance(module, torch.nn.Embedding) and pad is not None:
                            t[pad].zero_()
                    elif pname == "bias":
                        t.zero_()
                    else:  # RMSNorm gains
                        t.fill_(1.0)
                    done[id(p)] = torch.nn.Parameter(t, requires_grad=p.requires_grad)
                module._parameters[pname] = done[id(p)]
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"tensors left on the meta device: {meta[:5]}")
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--out", required=True, help="output directory (created; existing files are overwritten)")
    p.add_argument("--text", help="training text file (default: the Python standard library *.py sources)")
    p.add_argument("--max-text-mb", type=float, default=20.0, help="text read for train.txt and the tokenizer (MB)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"BPE vocabulary (default: the shape's, 32768 for llama-1b; {TINY_VOCAB} for tiny)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from transformers import LlamaConfig

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(SHAPES[args.shape])
    target_vocab = args.vocab_size or shape["vocab_size"] or TINY_VOCAB

    docs, source = read_text(args.text, int(args.max_text_mb * 1e6))
    train_txt = out / "train.txt"
    with open(train_txt, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(doc)
    t_text = time.perf_counter()

    tokenizer = train_tokenizer(docs, target_vocab, shape["max_position_embeddings"])
    n_tok = len(tokenizer)
    t_tok = time.perf_counter()
    # The config's vocabulary: the shape's (or --vocab-size); for tiny the tokenizer's size, rounded up
    # to a multiple of 16 so even the LM head GEMM has FP8-friendly dimensions.
    vocab = args.vocab_size or shape["vocab_size"] or -(-n_tok // 16) * 16
    if vocab < n_tok:
        raise SystemExit(f"tokenizer has {n_tok} tokens, more than the config vocabulary {vocab}")
    shape["vocab_size"] = vocab
    config = LlamaConfig(
        **shape,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=False,
        dtype="bfloat16",
    )
    model = build_model(config, args.seed)
    n_params = sum(t.numel() for t in model.parameters())
    t_model = time.perf_counter()

    # Remove a previous run's weights (shard counts may differ) before writing.
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    t_save = time.perf_counter()

    print(f"wrote {out}/ ({args.shape}; {time.perf_counter() - t0:.1f} s: text {t_text - t0:.1f} s, "
          f"tokenizer {t_tok - t_text:.1f} s, model init {t_model - t_tok:.1f} s, save {t_save - t_model:.1f} s)")
    print(f"  model: {type(model).__name__} {n_params / 1e6:.1f}M params, bf16, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, "
          f"intermediate {config.intermediate_size}, vocab {config.vocab_size}, max positions {config.max_position_embeddings}")
    print(f"  tokenizer: byte-level BPE, {n_tok} tokens (target {target_vocab}), eos/bos {EOS!r} = {tokenizer.eos_token_id}, "
          f"pad {PAD!r} = {tokenizer.pad_token_id}")
    print(f"  text: {source}")
    for f in sorted(out.iterdir()):
        if f.is_file():
            print(f"  {f.name:<32} {f.stat().st_size:>15,} bytes")
    print(f"use: --model {out} --text {train_txt}")


if __name__ == "__main__":
    main()
