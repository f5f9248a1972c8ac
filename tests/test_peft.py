"""LoRA (PEFT) on an FP8 base: frozen base in FP8 without the grad-weight GEMM, adapters in high
precision, conversion before or after get_peft_model, merged checkpoints stock transformers loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_fp8
from hf_fp8.integrations.peft import convert_peft_model, merge_and_revert, peft_recipe

from helpers import final_loss, run_steps, structured_batches

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def lora_model(fp8: str | None, seed: int = 0):
    """fp8: None (BF16 LoRA), "before" or "after" get_peft_model."""
    model = tiny_llama(seed)
    if fp8 == "before":
        convert_peft_model(model)
    torch.manual_seed(1)  # same LoRA init whatever the order
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    if fp8 == "after":
        convert_peft_model(peft_model)
    return peft_model


def train(model, batches, lr=3e-3):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if any(isinstance(m, hf_fp8.FP8Linear) for m in model.modules()):
        hf_fp8.attach(model, opt)
    return run_steps(model, opt, batches)


def test_frozen_fp8_linear_skips_grad_weight_gemm():
    torch.manual_seed(0)
    calls, grads = {}, {}
    for frozen in (False, True):
        lin = hf_fp8.FP8Linear(32, 64, bias=False)
        torch.manual_seed(0)
        torch.nn.init.normal_(lin.weight)
        lin.weight.requires_grad_(not frozen)
        x = torch.randn(4, 16, 32, requires_grad=True)
        y = lin(x)
        with mock.patch.object(torch, "_scaled_mm", wraps=torch._scaled_mm) as mm:
            y.square().sum().backward()
        calls[frozen], grads[frozen] = mm.call_count, x.grad
        assert (lin.weight.grad is None) == frozen
    assert calls == {False: 2, True: 1}  # grad-input + grad-weight vs grad-input only
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)


@pytest.mark.parametrize("order", ["before", "after"])
def test_lora_layers_stay_high_precision(order):
    model = lora_model(order)
    fp8 = {n for n, m in model.named_modules() if isinstance(m, hf_fp8.FP8Linear)}
    assert fp8 and all(n.endswith("base_layer") for n in fp8)  # every target is wrapped by PEFT
    assert len(fp8) == 2 * len(TARGETS)
    assert not any("lora_" in n for n in fp8)
    lora = [m for n, m in model.named_modules() if n.endswith(("lora_A.default", "lora_B.default"))]
    assert lora and all(type(m) is torch.nn.Linear for m in lora)  # rank 16: convertible, kept out by name
    assert "*lora_*" in peft_recipe().skip


def test_lora_fp8_finetune_trains_only_lora_and_matches_bf16():
    batches = structured_batches(40, batch=4, seq=32)
    fp8_model = lora_model("after")
    before = {n: p.detach().clone() for n, p in fp8_model.named_parameters()}
    fp8_losses = train(fp8_model, batches)
    for n, p in fp8_model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("lora_" in n), n
    bf16_losses = train(lora_model(None), batches)
    assert final_loss(fp8_losses) < fp8_losses[0] - 0.3, fp8_losses
    assert final_loss(fp8_losses) == pytest.approx(final_loss(bf16_losses), rel=0.03), (fp8_losses[-5:], bf16_losses[-5:])


def test_convert_before_and_after_get_peft_model_agree():
    batches = structured_batches(6, batch=2, seq=32, seed=4)
    a = train(lora_model("before"), batches)
    b = train(lora_model("after"), batches)
    assert a == pytest.approx(b, rel=1e-5)


def test_merge_and_revert_saves_a_stock_checkpoint(tmp_path):
    model = lora_model("after")
    train(model, structured_batches(5, batch=2, seq=32, seed=5))
    merged = merge_and_revert(model)
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, hf_fp8.FP8Linear) or "lora" in n for n, m in merged.named_modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    merged.save_pretrained(tmp_path / "ckpt")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert set(loaded.state_dict()) == set(merged.state_dict())
    merged.eval()
    loaded.eval()
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, merged(input_ids=x).logits, rtol=0, atol=0)


def test_lora_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "lora_fp8.py"), "--tiny", "--output-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "o" / "config.json").exists()


def test_trainer_callback_on_a_peft_model(tmp_path):
    from test_trainer import make_trainer, rows_of

    from hf_fp8.integrations.trainer import FP8TrainerCallback

    model = lora_model(None)
    cb = FP8TrainerCallback(verbose=False)
    trainer = make_trainer(model, rows_of(structured_batches(4, batch=2, seq=32)), tmp_path, [cb], learning_rate=3e-3)
    assert any("lora_" in p for p in cb.report.recipe.skip)
    assert not any("lora_" in n for n in cb.report.converted) and len(cb.report.converted) == 2 * len(TARGETS)
    trainer.train()
    assert cb.scale_updates == 4


def test_plain_convert_model_never_converts_lora_adapters():
    """convert_model on a PEFT model without convert_peft_model still keeps adapters (rank 16,
    dims multiples of 16: otherwise eligible) in high precision, with the reason in the report."""
    import peft
    import transformers

    import hf_fp8

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    report = hf_fp8.convert_model(model)
    adapters = [n for n in report.skipped if ".lora_" in n]
    assert len(adapters) == 4 and all("PEFT LoRA adapter" in report.skipped[n] for n in adapters)
    assert any(n.endswith("q_proj.base_layer") for n in report.converted)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]) is torch.nn.Linear


def test_summary_folds_per_layer_adapter_names():
    """summary() (the examples' JSON line, the model card) lists the adapters of every layer under one
    pattern with a count: before, a 16-layer LoRA run printed 225 entries."""
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    report = convert_peft_model(model)  # 2 layers x 7 targets x (A, B) adapters skipped
    summary = report.summary()["skipped"]
    assert len(report.skipped) == 2 * 2 * len(TARGETS) + 1  # + lm_head
    pattern = "base_model.model.model.layers.*.self_attn.q_proj.lora_A.default (x2)"
    assert summary[pattern] == report.skipped["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"]
    assert len(summary) == 2 * len(TARGETS) + 1
