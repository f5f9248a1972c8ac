"""Benchmark runs recorded in benchmarks/RESULTS.md: one Markdown section per run, newest first, with
the exact command, the machine and package versions, the date and the numbers (`hf-fp8 bench
--results-md`, `benchmarks/attention.py --results-md`)."""

from __future__ import annotations

import datetime
import importlib.metadata
import shlex
import subprocess
from pathlib import Path

import torch

_PACKAGES = ("transformers", "accelerate", "torchao", "triton", "nvidia-cudnn-frontend")
_HEADER = "# Benchmark results\n\nEvery number here comes from a run on the project's GPU machine. Newest first.\n\n"


def command_line(argv: list[str], program: str) -> str:
    """The shell command that reproduces a run: `program` (e.g. "python3 -m hf_fp8 bench") + argv, quoted."""
    return " ".join([program, *(shlex.quote(a) for a in argv)])


def environment(device: torch.device) -> str:
    """One line: the device and the versions that decide the numbers, hf_fp8's git commit included."""
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}; torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {_cudnn()})"
    else:
        where = f"{device.type}; torch {torch.__version__}"
    versions = []
    for name in _PACKAGES:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    from . import __version__

    return f"{where}, {', '.join(versions)}, hf_fp8 {__version__}{_git_commit()}"


def _cudnn() -> str:
    v = torch.backends.cudnn.version()  # e.g. 91900
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}" if v else "none"


def _git_commit() -> str:
    """" (git abc1234)" / " (git abc1234, modified)" when hf_fp8 runs from a git checkout, else ""."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "hf_fp8"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {commit.stdout.strip()}{', modified' if dirty.stdout.strip() else ''})"


def missing_output_directory(paths: dict[str, str | None]) -> str | None:
    """The error for the first of `paths` (option -> path or None) whose directory does not exist, or
    None: checked before a benchmark runs, not after it."""
    for option, path in paths.items():
        if path and not Path(path).parent.is_dir():
            return f"{option} {path}: directory {Path(path).parent} does not exist"
    return None


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def record(path: str | Path, title: str, command: str, environment_line: str, body: list[str], note: str | None) -> str:
    """Insert a section for this run into the Markdown file at `path` (created if missing) above the
    newest existing section ("## " line), so the file stays newest first. Returns the section."""
    lines = [f"## {datetime.date.today().isoformat()} — {title}", "", f"    {command}", "", environment_line + "."]
    if note:
        lines += ["", f"What changed since the last run: {note}"]
    section = "\n".join(lines + [""] + body) + "\n\n"
    path = Path(path)
    text = path.read_text() if path.exists() else _HEADER
    if text.startswith("## "):
        text = section + text
    elif "\n## " in text:  # above the newest section, below the file's introduction
        at = text.index("\n## ") + 1
        text = text[:at] + section + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return section
