"""benchmarks/make_local_model.py --shape tiny, then examples/finetune_trainer.py and examples/lora_fp8.py
with --model on that directory (CPU, a few steps): the path a real-size GPU run takes, without network."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # PYTHONPATH: the scripts import hf_fp8 from this checkout whatever is installed; no GPU, no hub.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _summary(stdout: str) -> dict:
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3
    assert math.isfinite(summary["first_loss"]) and math.isfinite(summary["last_loss"])
    assert summary["tokens_per_s"] > 0 and summary["peak_cuda_mem_gib"] is None
    assert summary["fp8_layers"] == 14 and 0 < summary["fp8_flop_fraction"] < 1  # 2 layers x 7 linears
    return summary


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("local_model")
    text = tmp / "corpus.txt"
    # ~100 KB of this repository's own Python: enough for BPE merges and a few dozen 64-token blocks.
    sources = sorted((ROOT / "hf_fp8").rglob("*.py"))
    text.write_text("".join(p.read_text(encoding="utf-8") for p in sources)[:100_000], encoding="utf-8")
    out = tmp / "tiny"
    r = _run("benchmarks/make_local_model.py", "--shape", "tiny", "--out", str(out), "--text", str(text),
             "--vocab-size", "400")
    assert f"--model {out}" in r.stdout
    return out


def test_model_dir_loads_offline(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "train.txt"):
        assert (model_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert model.dtype == torch.bfloat16 and not config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size) == (64, 2, 4, 2, 128)
    assert config.vocab_size % 16 == 0 and len(tok) <= config.vocab_size < len(tok) + 16
    assert config.eos_token_id == tok.eos_token_id and config.pad_token_id == tok.pad_token_id
    w = model.model.layers[0].mlp.up_proj.weight.float()
    assert 0.015 < w.std().item() < 0.025 and torch.equal(model.model.norm.weight.float(), torch.ones(64))
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: round trip
    ids = torch.tensor([tok((model_dir / "train.txt").read_text(encoding="utf-8")[:2000])["input_ids"][:64]])
    loss = model(input_ids=ids, labels=ids).loss
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(config.vocab_size)) < 1.0


def test_finetune_trainer_on_local_model(model_dir, tmp_path):
    r = _run("examples/finetune_trainer.py", "--model", str(model_dir), "--text", str(model_dir / "train.txt"),
             "--bf16", "--steps", "3", "--seq-len", "64", "--batch-size", "2", "--grad-accum", "2",
             "--log-every", "2", "--output-dir", str(tmp_path / "ft"))
    assert "hf_fp8 coverage" in r.stdout
    s = _summary(r.stdout)
    assert s["example"] == "finetune_trainer" and s["device"] == "cpu" and s["dtype"] == "float32"
    assert s["tokens_per_step"] == 2 * 2 * 64 and s["fp8_scale_updates"] == 3


def test_lora_on_local_model(model_dir, tmp_path):
    r = _run("examples/lora_fp8.py", "--model", str(model_dir), "--text", str(model_dir / "train.txt"),
             "--steps", "3", "--seq-len", "64", "--batch-size", "2", "--output-dir", str(tmp_path / "lora"))
    s = _summary(r.stdout)
    assert s["example"] == "lora_fp8" and s["device"] == "cpu" and s["base_dtype"] == "bfloat16"
    assert (tmp_path / "lora" / "config.json").is_file()
