"""Benchmark runs recorded in RESULTS.md (`hf-fp8 bench --results-md`, `benchmarks/attention.py
--results-md`): newest section first, with the exact command, versions, date and table."""

import datetime
import importlib.util
from pathlib import Path

import pytest
import torch

from hf_fp8 import _results
from hf_fp8.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_bench_records_each_run_as_the_newest_section(tmp_path, capsys):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\nIntro line.\n\n## 2026-01-01 (1) — an older run\n\nold numbers\n")
    common = ["bench", "--device", "cpu", "--no-compile", "--shape", "tiny", "--warmup", "1", "--steps", "1",
              "--seq-len", "32", "--batch-size", "2", "--quiet", "--results-md", str(results_md)]  # fmt: skip
    main([*common, "--modes", "bf16,hf_fp8", "--note", "first run"])
    main([*common, "--modes", "bf16", "--note", "second run"])
    text = results_md.read_text()
    assert text.startswith("# Benchmark results\n\nIntro line.\n\n## ")
    second, first, older = text.index("second run"), text.index("first run"), text.index("an older run")
    assert second < first < older  # newest first, below the introduction
    section = text[text.index("\n## ") + 1 : text.index("\n## ", text.index("\n## ") + 1)]
    today = datetime.date.today().isoformat()
    assert section.startswith(f"## {today} — hf-fp8 bench: tiny (cpu)")
    # the command reproduces the run, quoted for a shell
    assert f"    python3 -m hf_fp8 {' '.join(common)} --modes bf16 --note 'second run'" in section
    assert f"cpu; torch {torch.__version__}, transformers " in section and "hf_fp8 0." in section
    assert "| mode | tok/s | vs BF16 | ms/step | GPU ms | host ms | peak GiB | compile + warm-up s | loss |" in section
    assert "| bf16 |" in section and "| 1.000 |" in section
    first_section = text[first:older]
    assert "| hf_fp8 |" in first_section and "batch 2 x 32, eager, AdamW" in first_section


def test_record_creates_the_file_and_handles_a_file_without_introduction(tmp_path):
    path = tmp_path / "new" / "RESULTS.md"
    path.parent.mkdir()
    _results.record(path, "a run", "cmd --x", "cpu; torch", ["| a |"], None)
    text = path.read_text()
    assert text.startswith("# Benchmark results\n") and "## " in text and "    cmd --x" in text
    assert "What changed" not in text
    bare = tmp_path / "bare.md"
    bare.write_text("## old section\n")
    _results.record(bare, "new run", "cmd", "env", [], "note")
    assert bare.read_text().index("new run") < bare.read_text().index("old section")


def test_command_line_quotes_arguments():
    assert _results.command_line(["--note", "two words", "--x"], "prog") == "prog --note 'two words' --x"


def test_attention_benchmark_rows():
    spec = importlib.util.spec_from_file_location("attention_bench", ROOT / "benchmarks" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = {"4x16x4096x128": {
        "sdpa_bf16": {"latency_ms": 2.13, "throughput_ms": 1.9, "host_ms": 0.88},
        "hf_fp8": {"latency_ms": 4.01, "throughput_ms": 2.6, "host_ms": 3.14, "kernel": "cudnn",
                   "speedup_latency": 0.531, "speedup_throughput": 0.732},
    }}  # fmt: skip
    rows = module.markdown_rows(results)
    assert rows == [
        ["4x16x4096x128", "sdpa_bf16", "2.13", "1.90", "0.88", ""],
        ["4x16x4096x128", "hf_fp8 (cudnn)", "4.01", "2.60", "3.14", "0.531 / 0.732"],
    ]
    table = _results.markdown_table(["case", "function (kernel)", "latency", "throughput", "host", "vs SDPA lat / thru"], rows)
    assert table[1] == "|---|---|---|---|---|---|" and table[3].startswith("| 4x16x4096x128 | hf_fp8 (cudnn) |")


def test_a_missing_results_directory_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    from hf_fp8 import bench

    monkeypatch.setattr(bench, "run_mode", lambda *a: pytest.fail("the benchmark ran"))
    for option in ("--results-md", "--out"):
        with pytest.raises(SystemExit) as e:
            main(["bench", "--device", "cpu", "--shape", "tiny", option, str(tmp_path / "missing" / "file")])
        assert e.value.code == 2 and f"{option} {tmp_path / 'missing' / 'file'}: directory" in capsys.readouterr().err
