"""LoRA fine-tune on an FP8 base model: the frozen base linears run in FP8 (forward and grad-input;
no grad-weight GEMM for frozen weights), the LoRA adapters train in high precision. At the end the
adapters are merged and the model reverted to plain nn.Linear layers, and saved as an ordinary
checkpoint that stock transformers loads.

    python examples/lora_fp8.py --tiny                      # tiny random Llama on CPU, < 1 min
    python examples/lora_fp8.py --model PATH_OR_HUB_ID --text corpus.txt --output-dir out/lora
"""

from __future__ import annotations

import argparse
import random

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_fp8
from hf_fp8.integrations.peft import convert_peft_model, merge_and_revert


def generated_text(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["scale", "amax", "history", "margin", "gradient", "weight", "layer", "step", "tensor", "loss"]
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) + "." for _ in range(n_lines))


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
    p.add_argument("--output-dir", default="out/lora_fp8")
    args = p.parse_args(argv)
    if not args.tiny and not args.model:
        p.error("give --tiny or --model")

    text = open(args.text).read() if args.text else generated_text(3000)
    torch.manual_seed(0)
    if args.tiny:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len))
        ids = torch.tensor(list(text.encode("utf-8")))
        device = "cpu"
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
        ids = torch.tensor(tokenizer(text)["input_ids"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    n = len(ids) // args.seq_len
    data = ids[: n * args.seq_len].view(n, args.seq_len)

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
    for step in range(args.steps):
        batch = data[torch.randint(0, n, (args.batch_size,), generator=gen)].to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")

    merged = merge_and_revert(model)  # plain transformers model, plain nn.Linear weights
    merged.save_pretrained(args.output_dir)
    print(f"merged checkpoint saved to {args.output_dir} ({type(merged).__name__})")


if __name__ == "__main__":
    main()
