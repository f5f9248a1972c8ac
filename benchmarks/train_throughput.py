"""Training throughput of a HF Llama: BF16 vs torchao tensorwise (dynamic) vs hf_fp8 (delayed), one GPU.

All modes run in one process on the same model shape, data and seed: forward + backward + fused
AdamW, per-decoder-layer torch.compile, use_cache=False, bf16 parameters, LM head in BF16.
Reports the median step time over the timed steps (after warm-up/compile), tokens/s, ratio to BF16,
peak memory and the loss after the timed steps.

  python benchmarks/train_throughput.py --shape 1.5b --modes bf16,torchao,hf_fp8,hf_fp8_attn --out results.json

Modes: bf16; torchao (tensorwise dynamic, the peer); hf_fp8 (linears in FP8, delayed scaling);
hf_fp8_attn (linears + attention in FP8); hf_fp8_nosync (hf_fp8 without the inf/NaN check).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # The paper's 1.5B Llama shape and an 8B-shape slice (4 of 32 layers), vocab 32768.
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8),
    "8b-slice": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}


# FOG shapes: the config files of recipes/models/ (FOG-flash at the paper's 1.5B shape).
FOG_SHAPES = {"fog-flash-1.5b": "fog-flash-1.5b.json", "fog-flash-tiny": "fog-flash-tiny.json"}


def build_model(shape: str, seq_len: int, device):
    torch.manual_seed(0)
    if shape in FOG_SHAPES:
        from pathlib import Path

        import hf_fp8

        path = Path(__file__).resolve().parent.parent / "recipes" / "models" / FOG_SHAPES[shape]
        config = hf_fp8.FOGConfig.from_json_file(str(path))
        config.max_position_embeddings = max(config.max_position_embeddings, seq_len)
        config.use_cache = False
        with torch.device(device):
            model = hf_fp8.FOGForCausalLM(config)
        return model.to(torch.bfloat16)
    config = LlamaConfig(vocab_size=32768, max_position_embeddings=seq_len, rope_theta=500000.0, **SHAPES[shape])
    config.use_cache = False
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def convert(model, mode: str):
    if mode == "bf16":
        return None
    if mode == "torchao":
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        # Same skip as hf_fp8: the LM head stays BF16. FSDP all-gather off (single GPU; on, it would
        # leave the converted weights out of the optimizer, reference doc section 2).
        config = Float8LinearConfig.from_recipe_name("tensorwise")
        convert_to_float8_training(model, config=config, module_filter_fn=lambda m, name: name != "lm_head")
        return None
    if mode.startswith("hf_fp8"):
        import hf_fp8

        # hf_fp8: linears only, default (paper) scaling; _attn: linears + FP8 attention (cuDNN's
        # fused kernel on sm_90); _nosync: no inf/NaN check, so update_scales makes no host sync.
        recipe = hf_fp8.FP8Recipe(attention=mode == "hf_fp8_attn", on_nonfinite_amax="skip" if mode == "hf_fp8_nosync" else "warn")
        report = hf_fp8.convert_model(model, recipe)
        print(report)
        return report
    raise ValueError(f"unknown mode {mode!r}")


def run_mode(args, mode: str) -> dict:
    device = torch.device(args.device)
    model = build_model(args.shape, args.seq_len, device)
    convert(model, mode)
    for layer in model.model.layers:
        layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
    if mode.startswith("hf_fp8"):
        import hf_fp8

        hf_fp8.attach(model, opt)
    gen = torch.Generator(device=device).manual_seed(1)
    batches = [torch.randint(0, 32768, (args.batch_size, args.seq_len), device=device, generator=gen) for _ in range(4)]
    torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    t_compile = time.perf_counter()
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step == args.warmup - 1:
            compile_s = time.perf_counter() - t_compile
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        loss = out.loss.item()
    if args.profile:
        profile_steps(args, mode, model, opt, batches)
    median = statistics.median(times)
    tokens = args.batch_size * args.seq_len
    result = {
        "tokens_per_s": tokens / median,
        "step_ms_median": 1000 * median,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "compile_and_warmup_s": compile_s,
        "loss": loss,
    }
    del model, opt, out
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return result


def profile_steps(args, mode, model, opt, batches) -> None:
    """Kernel time table of 3 training steps, written to <profile dir>/<shape>_<mode>.txt."""
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(3):
            ids = batches[step % len(batches)]
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    (out / f"{args.shape}_{mode}.txt").write_text(table)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES) + sorted(FOG_SHAPES), default="1.5b")
    p.add_argument("--modes", default="bf16,torchao,hf_fp8")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--profile", default=None, metavar="DIR", help="also write a kernel time table per mode here")
    args = p.parse_args()
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(args, mode)
        print(mode, json.dumps(results[mode]), flush=True)
    base = results.get("bf16", {}).get("tokens_per_s")
    print(f"\n{args.shape}  batch {args.batch_size}x{args.seq_len}  {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'mode':<10} {'tok/s':>10} {'vs bf16':>8} {'ms/step':>8} {'peak GiB':>9} {'compile s':>9} {'loss':>8}")
    for mode, r in results.items():
        r["ratio_vs_bf16"] = r["tokens_per_s"] / base if base else None
        ratio = f"{r['ratio_vs_bf16']:.3f}" if base else "-"
        print(
            f"{mode:<10} {r['tokens_per_s']:>10.0f} {ratio:>8} {r['step_ms_median']:>8.1f} "
            f"{r['peak_mem_gib']:>9.1f} {r['compile_and_warmup_s']:>9.1f} {r['loss']:>8.4f}"
        )
    if args.out:
        # One file for all shapes: shape -> mode -> numbers (a run replaces its shape's entry).
        from pathlib import Path

        path = Path(args.out)
        data = json.loads(path.read_text()) if path.exists() else {}
        data = data if "results" not in data else {}  # an old single-shape file is replaced
        data[args.shape] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                            "batch": f"{args.batch_size}x{args.seq_len}", **results}
        path.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
