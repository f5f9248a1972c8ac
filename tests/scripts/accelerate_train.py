"""Trains a tiny Llama a few steps through Accelerate with hf_fp8 as its FP8 backend; launched by
tests/test_accelerate.py with `accelerate launch` (1 process, or 2 CPU processes over gloo).

Each rank writes OUT/rank{R}.json: its micro-batch losses, the amax history and scale of every FP8
tensor, a checksum and the change of every converted weight, and what Accelerate selected.
The model, data and hyper-parameters are the module-level functions below, so the test builds the
same model and data for its hand-written single-process reference loop.

Usage: accelerate launch [...] accelerate_train.py OUT_DIR [--steps N] [--ga G] [--batch B] [--seq T]
The recipe comes from $HF_FP8_RECIPE (the test sets it), or hf_fp8's default.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path

import torch

SEED = 0
LR = 1e-3


def build_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        use_cache=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def make_batches(micro_steps: int, rows: int, seq: int) -> list[torch.Tensor]:
    """One (rows, seq) global micro-batch per micro-step: learnable sequences (next = perm[cur])."""
    gen = torch.Generator().manual_seed(1234)
    perm = torch.randperm(64, generator=gen)
    out = []
    for _ in range(micro_steps):
        x = torch.empty(rows, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, 64, (rows,), generator=gen)
        for t in range(1, seq):
            x[:, t] = perm[x[:, t - 1]]
        out.append(x)
    return out


def converted_weights(model) -> dict[str, torch.Tensor]:
    import hf_fp8

    return {name: m.weight for name, m in model.named_modules() if isinstance(m, hf_fp8.FP8Linear)}


def scaling_state(model) -> dict[str, dict]:
    from hf_fp8.scaling import delayed_scale_states

    return {
        name: {"amax_history": m.amax_history.tolist(), "scale": m.scale.tolist()}
        for name, m in delayed_scale_states(model)
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=3, help="real optimizer steps")
    parser.add_argument("--ga", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--batch", type=int, default=2, help="rows per rank per micro-batch")
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()

    import hf_fp8  # noqa: F401
    from hf_fp8.integrations import accelerate as hf_fp8_accelerate
    from hf_fp8.scaling import delayed_scale_states

    hf_fp8_accelerate.enable()  # a no-op if `import hf_fp8` enabled it already; recipe: $HF_FP8_RECIPE
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=args.ga)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = build_model()
    model.train()
    initial = {n: w.detach().clone() for n, w in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    real_steps = []
    optimizer.optimizer.register_step_post_hook(lambda *a: real_steps.append(1))
    batches = make_batches(args.steps * args.ga, world * args.batch, args.seq)
    losses = []
    for x in batches:
        x = x[rank * args.batch : (rank + 1) * args.batch].to(accelerator.device)
        with accelerator.accumulate(model):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.item())

    from torchao.float8.float8_linear import Float8Linear

    weights = converted_weights(raw)
    named = dict(raw.named_parameters())
    param_name = {id(p): n for n, p in named.items()}
    result = {
        "rank": rank,
        "world": world,
        "distributed_type": str(accelerator.distributed_type),
        "mixed_precision": accelerator.mixed_precision,
        "fp8_backend": str(accelerator.fp8_backend),
        "uses_hf_fp8": hf_fp8_accelerate.uses_hf_fp8(accelerator),
        "torchao_float8_linear": any(isinstance(m, Float8Linear) for m in raw.modules()),
        "converted": hf_fp8_accelerate.reports(accelerator)[0].converted,
        "optimizer_params_are_model_params": {id(p) for g in optimizer.optimizer.param_groups for p in g["params"]}
        == {id(p) for p in raw.parameters()},
        "real_steps": len(real_steps),
        # DDP must not broadcast the FP8 scaling buffers (update_scales keeps them in sync).
        "ddp_broadcasts_fp8_buffers": any(
            b is s.amax_history or b is s.pending_amax
            for b in getattr(model, "modules_buffers", [])
            for _, s in delayed_scale_states(raw)
        ),
        "losses": losses,
        "weight_checksum": {n: float(w.detach().double().sum()) for n, w in weights.items()},
        "weight_change": {
            n: float((w.detach() - initial[param_name[id(w)]]).abs().max()) for n, w in weights.items()
        },
        "scaling": scaling_state(raw),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    # Release the DDP wrapper (and its gloo reducer) before the process group goes: destroying
    # the group first left a rank hanging at exit now and then (torch 2.13 CPU, gloo).
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    del model, optimizer
    gc.collect()
    accelerator.end_training()
    if rank == 0:
        print(f"trained {len(losses)} micro-batches on {world} process(es): losses {losses}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
