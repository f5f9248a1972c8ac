"""FP8TrainerCallback: a Trainer with the callback trains exactly like a hand-written hf_fp8 loop."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, SequentialSampler
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

import hf_fp8
from hf_fp8.integrations.trainer import FP8TrainerCallback, raise_margin
from hf_fp8.scaling import delayed_scale_states

from helpers import structured_batches

ROOT = Path(__file__).resolve().parent.parent
LR = 1e-3
MAX_GRAD_NORM = 1.0


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class SequentialTrainer(Trainer):
    """Deterministic data order: a sequential sampler instead of the default random one."""

    def get_train_dataloader(self):
        ds = self.train_dataset
        return DataLoader(ds, batch_size=self.args.train_batch_size, sampler=SequentialSampler(ds),
                          collate_fn=default_data_collator, drop_last=True)


def make_trainer(model, rows, tmp_path, callbacks, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=len(rows) // 2,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", max_grad_norm=MAX_GRAD_NORM, bf16=True, use_cpu=True, seed=0,
        logging_steps=1, report_to="none", save_strategy="no", dataloader_drop_last=True,
        disable_tqdm=True,
    )
    kwargs.update(overrides)
    args = TrainingArguments(**kwargs)
    return SequentialTrainer(model=model, args=args, train_dataset=_ListDataset(rows), callbacks=callbacks)


def rows_of(batches):
    return [row for b in batches for row in b]


def hand_loop(model, batches) -> list[float]:
    """The same run written by hand: convert + attach, AdamW, clip, BF16 autocast."""
    model.train()
    hf_fp8.convert_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    hf_fp8.attach(model, opt)
    losses = []
    for x in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_trainer_matches_hand_written_loop(tmp_path):
    batches = structured_batches(8, batch=2, seq=32)
    base = tiny_llama()
    ref_model = copy.deepcopy(base)
    cb = FP8TrainerCallback(verbose=False)
    trainer = make_trainer(base, rows_of(batches), tmp_path, [cb])
    assert isinstance(base.model.layers[0].self_attn.q_proj, hf_fp8.FP8Linear)  # converted in Trainer.__init__
    trainer.train()
    trainer_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    ref_losses = hand_loop(ref_model, batches)
    assert len(trainer_losses) == len(ref_losses) == 8
    assert cb.scale_updates == 8
    # Same ops in the same order: the only difference is how the mean loss is formed
    # (the Trainer divides a sum by num_items_in_batch); tolerance 1e-4 relative.
    for a, b in zip(trainer_losses, ref_losses):
        assert a == pytest.approx(b, rel=1e-4), (trainer_losses, ref_losses)
    # ... and the weights and scales end the same.
    for (n, p), (_, q) in zip(base.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
    for (_, s), (_, t) in zip(delayed_scale_states(base), delayed_scale_states(ref_model)):
        torch.testing.assert_close(s.scale, t.scale, rtol=1e-4, atol=0)


def test_gradient_accumulation_updates_scales_once_per_optimizer_step(tmp_path):
    batches = structured_batches(12, batch=2, seq=32, seed=1)
    model = tiny_llama()
    cb = FP8TrainerCallback(verbose=False)
    micro = []

    class CountMicroBatches(TrainerCallback):
        def on_substep_end(self, args, state, control, **kw):
            micro.append(state.global_step)

    trainer = make_trainer(model, rows_of(batches), tmp_path, [cb, CountMicroBatches()],
                           gradient_accumulation_steps=4, max_steps=3)
    trainer.train()
    assert trainer.state.global_step == 3 and len(micro) == 9  # 12 micro-batches, 3 optimizer steps
    assert cb.scale_updates == 3
    for name, state in delayed_scale_states(model):
        rolls = int((state.amax_history > 0).sum(dim=1).max())
        assert rolls == 3, (name, state.amax_history[:, :5])


def test_health_metrics_reach_log_history_and_reporters(tmp_path):
    batches = structured_batches(6, batch=2, seq=32, seed=2)
    model = tiny_llama()
    seen = []

    class Reporter(TrainerCallback):  # stands for a report_to backend (listed before ours)
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    cb = FP8TrainerCallback(verbose=False)
    trainer = make_trainer(model, rows_of(batches), tmp_path, [Reporter(), cb], logging_steps=2, max_steps=6)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == [2, 4, 6]
    for h in logged:
        for key in ("fp8/kurtosis/qkv_max", "fp8/kurtosis/mlp_down_input_mean", "fp8/overflow_max",
                    "fp8/underflow_max", "fp8/nonfinite_skips", "fp8/scale_min/linear/input",
                    "fp8/amax_max/linear/grad_output", "fp8/anomalies"):
            assert key in h and math.isfinite(h[key]), (key, sorted(h))
    reported = [s for s in seen if "loss" in s]
    assert all("fp8/kurtosis/qkv_max" in s for s in reported) and len(reported) == 3


def test_anomaly_fallback_and_stop_on_kurtosis_spike(tmp_path):
    batches = structured_batches(10, batch=2, seq=32, seed=3)
    model = tiny_llama()
    spike = {"on": False}

    def outlier(module, args):  # a crafted outlier feature in block 1's MLP from step 5 on
        if not spike["on"]:
            return None
        x = args[0].clone()
        x[..., 0] = x[..., 0] * 1000.0
        return (x,)

    class Spike(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            spike["on"] = state.global_step + 1 >= 5

    cb = FP8TrainerCallback(verbose=False, on_anomaly=("fallback", "stop"), kurtosis_min_history=3)
    trainer = make_trainer(model, rows_of(batches), tmp_path, [cb, Spike()], max_steps=10)
    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(outlier)  # on the converted layer
    with pytest.warns(RuntimeWarning, match="kurtosis anomaly at step 5"):
        trainer.train()
    assert trainer.state.global_step == 5  # stopped at the spike
    kinds = {a["kind"] for a in cb.anomalies}
    assert "kurtosis" in kinds
    kurt = next(a for a in cb.anomalies if a["kind"] == "kurtosis")
    assert kurt["metric"] == "fp8/kurtosis/mlp_down_input_max"
    assert "model.layers.1.mlp.down_proj" in kurt["reverted"]
    layer1 = model.model.layers[1]
    assert type(layer1.mlp.down_proj) is torch.nn.Linear and type(layer1.self_attn.q_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, hf_fp8.FP8Linear)  # block 0 untouched
    assert trainer.state.log_history[-2 if "train_runtime" in trainer.state.log_history[-1] else -1]["fp8/anomalies"] >= 1


def test_raise_margin_halves_scales():
    model = tiny_llama()
    hf_fp8.convert_model(model)
    x = torch.randint(0, 256, (2, 32))
    model(input_ids=x, labels=x).loss.backward()
    hf_fp8.update_scales(model)
    before = [s.scale.clone() for _, s in delayed_scale_states(model)]
    raise_margin(model)
    for b, (_, s) in zip(before, delayed_scale_states(model)):
        torch.testing.assert_close(s.scale, b / 2)
        assert s.margin == 1
    model(input_ids=x, labels=x).loss.backward()
    hf_fp8.update_scales(model)  # the next update keeps the margin
    for _, s in delayed_scale_states(model):
        amax = s.amax_history.amax(dim=1)
        ok = amax > 0
        expected = torch.tensor([torch.finfo(d).max for d in s.dtypes]) / amax / 2
        torch.testing.assert_close(s.scale[ok], expected[ok], rtol=1e-6, atol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="on_anomaly"):
        FP8TrainerCallback(on_anomaly="explode")
    with pytest.raises(ValueError, match="stability"):
        FP8TrainerCallback(stability="nope")


def test_finetune_trainer_example_runs():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_trainer.py"), "--tiny"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "hf_fp8 coverage" in r.stdout
