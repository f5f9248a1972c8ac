"""Smoke test of benchmarks/quality.py: tiny CPU runs (llama bf16/fp8, fog-max fp8) and --plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"
RUNS = [("llama", "bf16"), ("llama", "fp8"), ("fog-max", "fp8")]


def _run(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    for model, mode in RUNS:
        proc = _run(["--tiny", "--steps", "6", "--eval-every", "3", "--stats-every", "3", "--log-every", "3",
                     "--model", model, "--mode", mode, "--tag", "smoke", "--device", "cpu", "--out-dir", str(out)])
        (out / f"{model}_{mode}_smoke.log").write_text(proc.stdout)
    return out


@pytest.mark.parametrize("model,mode", RUNS)
def test_result_json(results, model, mode):
    r = json.loads((results / f"{model}_{mode}_smoke.json").read_text())
    assert r["config"]["model"] == model and r["config"]["mode"] == mode
    assert r["completed_steps"] == 6 and r["diverged_at"] is None
    assert [row["step"] for row in r["log"]] == list(range(6))
    assert all(math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) for row in r["log"])
    assert [e["step"] for e in r["eval"]] == [3, 6]
    assert math.isfinite(r["final_eval_loss"]) and r["final_eval_loss"] == r["eval"][-1]["loss"]
    # ln(1024) ~ 6.93: a fresh tiny model starts near the uniform loss
    assert 5.0 < r["log"][0]["loss"] < 8.0
    assert r["wall_s"] > 0 and r["versions"]["torch"]
    assert r["data"]["heldout_blocks_used"] > 0 and r["data"]["tokenizer_vocab"] == 1024
    assert [s["step"] for s in r["stats"]] == [0, 3, 5]
    for s in r["stats"]:
        for key in ("fp8/kurtosis/qkv_mean", "fp8/kurtosis/qkv_max", "fp8/kurtosis/mlp_down_input_mean",
                    "fp8/kurtosis/block_output_mean", "fp8/kurtosis/block_output_max"):
            assert s[key] is not None and math.isfinite(s[key]) and s[key] > 0, key
        if mode == "fp8":
            assert 0.0 <= s["fp8/overflow_max"] <= 1.0 and 0.0 <= s["fp8/underflow_max"] <= 1.0
            assert 10 < s["fp8/sqnr_min_db"] <= s["fp8/sqnr_db/down_proj/input"] < 40
        else:
            assert "fp8/overflow_max" not in s
    if mode == "fp8":
        assert r["fp8_report"] and r["fp8_flop_fraction"] > 0
    else:
        assert r["fp8_report"] is None


def test_same_data_and_init_across_modes(results):
    bf16 = json.loads((results / "llama_bf16_smoke.json").read_text())
    fp8 = json.loads((results / "llama_fp8_smoke.json").read_text())
    assert bf16["data"]["tokenizer_sha256"] == fp8["data"]["tokenizer_sha256"]
    assert bf16["data"]["train_blocks"] == fp8["data"]["train_blocks"]
    # same initial weights and first batch: FP8 only perturbs the first loss slightly
    assert abs(bf16["log"][0]["loss"] - fp8["log"][0]["loss"]) < 0.05


def test_plot(results, tmp_path):
    plots = tmp_path / "plots"
    _run(["--plot", "--out-dir", str(results), "--plot-dir", str(plots)])
    for name in ("loss", "eval_loss", "kurtosis_qkv", "overflow", "sqnr"):
        png = plots / f"{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_import_log_rebuilds_the_printed_subset(results, tmp_path):
    """A run whose JSON was lost can be plotted from its console log: the rebuilt result holds the
    printed steps, evals and stats with the JSON's values (to the printed precision)."""
    _run(["--import-log", str(results / "llama_fp8_smoke.log"), "--out-dir", str(tmp_path)])
    rebuilt = json.loads((tmp_path / "llama_fp8_smoke.json").read_text())
    original = json.loads((results / "llama_fp8_smoke.json").read_text())
    assert rebuilt["reconstructed_from_log"].endswith("llama_fp8_smoke.log")
    assert rebuilt["completed_steps"] == 6
    assert [r["step"] for r in rebuilt["log"]] == [0, 3, 5]  # --log-every 3 and the last step
    by_step = {r["step"]: r for r in original["log"]}
    for r in rebuilt["log"]:
        assert r["loss"] == pytest.approx(by_step[r["step"]]["loss"], abs=1e-4)
    assert [(e["step"], round(e["loss"], 4)) for e in rebuilt["eval"]] == [(e["step"], round(e["loss"], 4)) for e in original["eval"]]
    stats = {s["step"]: s for s in original["stats"]}
    for s in rebuilt["stats"]:
        assert s["fp8/kurtosis/qkv_mean"] == pytest.approx(stats[s["step"]]["fp8/kurtosis/qkv_mean"], abs=0.006)
    _run(["--plot", "--plot-tag", "smoke", "--out-dir", str(tmp_path), "--plot-dir", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "smoke_loss.png").stat().st_size > 1000


def test_layers_option(tmp_path):
    _run(["--tiny", "--steps", "2", "--eval-every", "0", "--stats-every", "0", "--layers", "3", "--mode", "bf16",
          "--tag", "layers", "--device", "cpu", "--out-dir", str(tmp_path)])
    r = json.loads((tmp_path / "llama_bf16_layers.json").read_text())
    assert r["model_config"]["num_hidden_layers"] == 3 and r["completed_steps"] == 2
    bad = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--layers", "0"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--layers must be >= 1" in bad.stderr


def test_linears_only_option_and_its_runs_plot_with_their_tag(tmp_path):
    """--recipe FILE sets the FP8 recipe and --no-fp8-attention keeps attention in high precision (the
    report says so); --plot-tag TAG draws TAG's runs and their TAG_variant runs, not those of a tag
    that merely starts alike."""
    recipe = tmp_path / "e4m3.yaml"
    recipe.write_text("fp8_format: e4m3\namax_history_len: 16\nattention: true\n")
    _run(["--tiny", "--steps", "2", "--eval-every", "1", "--stats-every", "0", "--device", "cpu", "--out-dir",
          str(tmp_path), "--mode", "fp8", "--recipe", str(recipe), "--no-fp8-attention", "--tag", "p125_linears"])
    r = json.loads((tmp_path / "llama_fp8_p125_linears.json").read_text())
    assert "format=e4m3 history=16" in r["fp8_report"]  # the file's recipe, with attention turned off
    assert "attention=False" in r["fp8_report"] and "recipe.attention is False" in r["fp8_report"]
    assert r["completed_steps"] == 2
    _run(["--plot", "--plot-tag", "p125", "--out-dir", str(tmp_path), "--plot-dir", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "p125_eval_loss.png").stat().st_size > 1000

    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from quality import has_tag
    finally:
        sys.path.remove(str(SCRIPT.parent))
    assert has_tag("llama_fp8_parity125", "parity125") and has_tag("llama_fp8_parity125_linears", "parity125")
    assert not has_tag("llama_fp8_parity", "parity125") and not has_tag("llama_fp8_parity125", "parity")
