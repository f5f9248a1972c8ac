"""LoRA fine-tune on an FP8 base model: the frozen base linears run in FP8 (forward and grad-input;
no grad-weight GEMM for frozen weights), the LoRA adapters train in high precision. At the end the
adapters are merged and the model reverted to plain nn.Linear layers, and saved as an ordinary
checkpoint that stock transformers loads.

    python examples/lora_fp8.py --tiny                      # tiny random Llama on CPU, < 1 min
    python examples/lora_fp8.py --model PATH_OR_HUB_ID --text corpus.txt --output-dir out/lora
    # real size on one GPU, no network (model directory from benchmarks/make_local_model.py):
    python examples/lora_fp8.py --model /tmp/llama1b --text /tmp/llama1b/train.txt \\
        --seq-len 2048 --batch-size 8 --steps 150 --lr 1e-3 --output-dir /tmp/lora_llama1b

With --model the base weights are loaded in --dtype (bfloat16 by default: they are frozen; PEFT keeps
the adapters in float32), the model's own tokenizer is used and the text is packed into --seq-len
blocks. Runs on CUDA when available (--device to choose). The last line printed is a one-line JSON
summary (first/last loss, steps, tokens/s, peak CUDA memory, FP8 coverage).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_fp8
from hf_fp8.integrations.peft import convert_peft_model, merge_and_revert

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": "auto"}


def generated_text(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["scale", "amax", "history", "margin", "gradient", "weight", "layer", "step", "tensor", "loss"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "." for _ in range(n_lines))


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


def sync(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, byte tokens, generated text (CPU)")
    p.add_argument("--model", help="local path or hub id of a causal LM (ignored with --tiny)")
    p.add_argument("--text", help="local text file (default: generated text)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the frozen --model weights")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (cpu with --tiny)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--output-dir", default="out/lora_fp8")
    p.add_argument("--no-save", action="store_true", help="skip saving the merged checkpoint")
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("give --tiny or --model")

    text = open(args.text, encoding="utf-8").read() if args.text else generated_text(3000)
    torch.manual_seed(0)
    if args.tiny:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len))
        ids = torch.tensor(list(text.encode("utf-8")))
        device = args.device or "cpu"
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:  # not needed for packed blocks, but some tools expect one
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype])
        ids = torch.tensor(tokenize_text(tokenizer, text), dtype=torch.long)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and args.seq_len > max_pos:
            p.error(f"--seq-len {args.seq_len} > the model's max_position_embeddings {max_pos}")
        vocab = model.get_input_embeddings().num_embeddings
        if len(ids) and int(ids.max()) >= vocab:
            p.error(f"the tokenizer gives id {int(ids.max())} but the model's embedding has {vocab} rows")
    model.config.use_cache = False
    model.to(device)
    n = len(ids) // args.seq_len
    if n < 1:
        p.error(f"the text gives {len(ids)} tokens, less than one --seq-len {args.seq_len} block")
    data = ids[: n * args.seq_len].view(n, args.seq_len)
    print(f"data: {len(ids):,} tokens -> {n} blocks of {args.seq_len}; {args.steps} steps x {args.batch_size} blocks; device {device}")

    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, lora)
    report = convert_peft_model(model)  # base layers -> FP8; lora_A/lora_B stay high precision
    print(report)
    model.print_trainable_parameters()

    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    hf_fp8.attach(model, opt)
    model.train()
    gen = torch.Generator().manual_seed(0)
    autocast_device = torch.device(device).type
    losses = []
    t_first = t_last = None
    for step in range(args.steps):
        batch = data[torch.randint(0, n, (args.batch_size,), generator=gen)].to(device)
        with torch.autocast(autocast_device, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step == 0:
            t_first = sync(device)  # the first step (warm-up) is left out of tokens/s
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    t_last = sync(device)
    losses = [float(x) for x in losses]

    tokens_per_step = args.batch_size * args.seq_len
    cuda = device.startswith("cuda")
    summary = {
        "example": "lora_fp8",
        "model": "tiny" if args.tiny else args.model,
        "device": device,
        "base_dtype": str(next(q for q in model.parameters() if not q.requires_grad).dtype).replace("torch.", ""),
        "rank": args.rank,
        "steps": len(losses),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens_per_step": tokens_per_step,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "tokens_per_s": round(tokens_per_step * (len(losses) - 1) / (t_last - t_first), 1) if len(losses) > 1 else None,
        "peak_cuda_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        **report.summary(),
    }

    if not args.no_save:
        merged = merge_and_revert(model)  # plain transformers model, plain nn.Linear weights
        merged.save_pretrained(args.output_dir)
        print(f"merged checkpoint saved to {args.output_dir} ({type(merged).__name__})")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
