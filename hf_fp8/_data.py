"""The text `hf-fp8 train` learns from, and its byte-level tokenizer. No network, no tokenizer files.

Tokenizer: a token is one byte of UTF-8 text (ids 0..255). 256 is already a multiple of 16, so the
embedding and LM-head GEMM dimensions stay FP8-friendly, and any text encodes without unknown tokens.

Corpus: the Python standard library's own `*.py` sources, read from this machine at run time (real
English docstrings and comments mixed with code, a few MB, the same on every machine with the same
Python version). Files are read in sorted path order until `max_bytes`; every 10th file is held out
for evaluation, so the eval loss measures text from files the model never saw. If no stdlib sources
are found (e.g. a stripped, .pyc-only install), a small text bundled in `hf_fp8/data/` is used
instead, split by paragraphs the same way.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

VOCAB_SIZE = 256
DEFAULT_MAX_BYTES = 4_000_000
# Every HELDOUT_EVERY-th document (file or paragraph) goes to the held-out split.
HELDOUT_EVERY = 10
# Directories of the stdlib tree that are not the standard library's own modules (installed
# packages), or that are mostly generated tables (encodings) or test fixtures.
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__"}
FALLBACK_CORPUS = "fallback_corpus.txt"


@dataclass
class Corpus:
    """Byte ids of the training and held-out text (uint8 tensors), and where they came from."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str
    documents: int

    def describe(self) -> str:
        return (
            f"corpus: {self.source}, {self.documents} documents, "
            f"{len(self.train):,} train / {len(self.heldout):,} held-out byte tokens"
        )


def encode(text: str) -> torch.Tensor:
    """Text -> byte ids (uint8)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).clone()


def decode(ids) -> str:
    """Byte ids -> text (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def python_source_files(root: str | os.PathLike, skip_dirs: set[str] = frozenset({"__pycache__"})) -> list[Path]:
    """The .py files under `root`, sorted by path relative to it, without descending into `skip_dirs`.
    _sysconfigdata* is generated per machine; leaving it out keeps a corpus portable."""
    files = []
    for directory, subdirs, names in os.walk(root):
        # Pruning in place keeps os.walk out of skipped trees (site-packages is often far larger).
        subdirs[:] = sorted(d for d in subdirs if d not in skip_dirs)
        files.extend(Path(directory, n) for n in names if n.endswith(".py") and not n.startswith("_sysconfigdata"))
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def stdlib_source_files(skip_dirs: set[str] = _SKIPPED_STDLIB_DIRS) -> list[Path]:
    """The standard library's .py files on this machine, sorted by path relative to the stdlib root."""
    root = sysconfig.get_paths().get("stdlib")
    if not root or not os.path.isdir(root):
        return []
    return python_source_files(root, skip_dirs)


def read_stdlib_documents(max_bytes: int) -> list[bytes]:
    """Contents of the stdlib sources in sorted order, stopping once `max_bytes` are read."""
    documents, total = [], 0
    for path in stdlib_source_files():
        if total >= max_bytes:
            break
        try:
            data = path.read_bytes()[: max_bytes - total]
        except OSError:
            continue
        if data.strip():
            documents.append(data)
            total += len(data)
    return documents


def read_fallback_documents() -> list[bytes]:
    """Paragraphs of the text bundled with the package."""
    text = (resources.files("hf_fp8") / "data" / FALLBACK_CORPUS).read_bytes()
    return [paragraph + b"\n\n" for paragraph in text.split(b"\n\n") if paragraph.strip()]


def load_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """The stdlib sources (or the bundled fallback text) as train / held-out byte ids."""
    documents = read_stdlib_documents(max_bytes)
    source = f"Python {sysconfig.get_python_version()} standard library sources ({sysconfig.get_paths()['stdlib']})"
    if len(documents) < 2 * HELDOUT_EVERY:
        documents = read_fallback_documents()
        source = f"bundled fallback text (hf_fp8/data/{FALLBACK_CORPUS}; no stdlib sources found)"
    train = b"".join(doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1)
    heldout = b"".join(doc for i, doc in enumerate(documents) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1)
    as_ids = lambda data: torch.frombuffer(bytearray(data), dtype=torch.uint8)  # noqa: E731
    return Corpus(train=as_ids(train), heldout=as_ids(heldout), source=source, documents=len(documents))


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` windows of `seq_len` tokens at random offsets (int64, for the embedding lookup).
    The offsets come from `generator` only, so two runs seeded alike see the same batches."""
    starts = torch.randint(0, len(tokens) - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()


def evaluation_windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """Up to `count` windows of `seq_len` tokens spread evenly over `tokens` (the same every run)."""
    last_start = len(tokens) - seq_len
    count = min(count, last_start // seq_len + 1)
    starts = torch.linspace(0, last_start, count).long().tolist()
    return torch.stack([tokens[s : s + seq_len] for s in starts]).long()
