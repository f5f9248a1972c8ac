"""FP8Recipe: every knob of hf_fp8's FP8 training in one frozen, validated dataclass.

The defaults are the paper's recipe (and Transformer Engine's `DelayedScaling` defaults):
E4M3 forward / E5M2 backward ("hybrid"), amax history of 1024 steps reduced with "max", margin 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# fp8_format -> (dtype of forward operands: inputs, weights, Q/K/V; dtype of gradients)
_FORMATS = {
    "hybrid": (torch.float8_e4m3fn, torch.float8_e5m2),
    "e4m3": (torch.float8_e4m3fn, torch.float8_e4m3fn),
}
_ALGOS = ("max", "most_recent")
_ON_NONFINITE = ("warn", "raise", "skip")

# The LM head stays in high precision in the paper (its main stated limitation); embeddings are
# lookups, not GEMMs, but models like GPT-NeoX name their head `embed_out`.
DEFAULT_SKIP = ("lm_head", "*embed*", "score", "classifier")


@dataclass(frozen=True)
class FP8Recipe:
    """How a model trains in FP8. All fields are validated on construction.

    fp8_format: "hybrid" (E4M3 forward, E5M2 gradients; the paper's choice) or "e4m3" (E4M3 everywhere).
    amax_history_len: how many optimizer steps of amax each delayed scale remembers (>= 1).
    amax_compute_algo: "max" (max over the history) or "most_recent" (the last step's amax only).
    margin: scale = fp8_max / amax / 2**margin; each unit halves the scale, leaving headroom.
    attention: also run attention's QK^T and P.V in FP8 (the `hf_fp8` attention implementation).
    skip: fnmatch patterns on module names (full dotted name or its last part) kept in high precision.
    on_nonfinite_amax: what `update_scales` does when an inf/NaN amax was recorded: the update of that
        tensor's scale is always skipped and counted; "warn" also warns naming the layer, "raise"
        raises, "skip" stays silent (and avoids the one host sync per optimizer step this check costs).
    share_input_scales: linears of one module that read the same input (q/k/v_proj, gate/up_proj)
        cast it with one shared input scale, so under torch.compile it is cast, and saved for
        backward, once instead of per linear. Same numerics when they read the same tensor (their
        amax histories are identical anyway). Siblings are found by name; in cross-attention
        (q reads the decoder) only k/v share. Set False for a model whose same-named siblings
        read different tensors, to keep one scale per linear.
    cast_weights_once: under torch.compile, once the delayed scales are known, cast each linear's
        weight in one pass into both FP8 layouts (and its amax) and keep the transposed copy for
        backward, instead of casting the BF16 weight again there: less GPU work (H200: 0.7 ms per
        8B-slice step, 1.3 ms at 1.5B), 1 byte per parameter more memory until backward. Set False
        where that memory counts, and with FSDP unless its weights are all-gathered in FP8 (the kept
        copies are of the unsharded weights; Accelerate's FSDP preparation sets False itself).
    """

    fp8_format: str = "hybrid"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0
    attention: bool = False
    skip: tuple[str, ...] = DEFAULT_SKIP
    on_nonfinite_amax: str = "warn"
    share_input_scales: bool = True
    cast_weights_once: bool = True

    def __post_init__(self):
        # YAML/JSON give lists; a frozen dataclass needs a hashable tuple.
        if isinstance(self.skip, list):
            object.__setattr__(self, "skip", tuple(self.skip))
        _check_choice("fp8_format", self.fp8_format, tuple(_FORMATS))
        _check_type("amax_history_len", self.amax_history_len, int)
        if self.amax_history_len < 1:
            raise ValueError(f"FP8Recipe.amax_history_len must be >= 1, got {self.amax_history_len}")
        _check_choice("amax_compute_algo", self.amax_compute_algo, _ALGOS)
        _check_type("margin", self.margin, int)
        if self.margin < 0:
            raise ValueError(f"FP8Recipe.margin must be >= 0, got {self.margin}")
        _check_type("attention", self.attention, bool)
        _check_type("skip", self.skip, tuple)
        for pattern in self.skip:
            if not isinstance(pattern, str) or not pattern:
                raise TypeError(f"FP8Recipe.skip must hold non-empty strings (module-name patterns), got {pattern!r}")
        _check_choice("on_nonfinite_amax", self.on_nonfinite_amax, _ON_NONFINITE)
        _check_type("share_input_scales", self.share_input_scales, bool)
        _check_type("cast_weights_once", self.cast_weights_once, bool)

    @property
    def forward_dtype(self) -> torch.dtype:
        """FP8 dtype of forward operands (activations, weights)."""
        return _FORMATS[self.fp8_format][0]

    @property
    def backward_dtype(self) -> torch.dtype:
        """FP8 dtype of gradients (grad-output of linears, dO/dS of attention)."""
        return _FORMATS[self.fp8_format][1]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> "FP8Recipe":
        if not isinstance(data, dict):
            raise TypeError(f"{source}: an FP8 recipe must be a mapping of field -> value, got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{source}: unknown FP8Recipe field {key!r}.{hint} Allowed fields: {', '.join(allowed)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "FP8Recipe":
        """Read a recipe from YAML (.yaml/.yml) or JSON (.json); unknown or ill-typed fields raise."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FP8 recipe file not found: {path}")
        text = path.read_text()
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"FP8 recipe file must end in .yaml, .yml or .json, got {path.name}")
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d

    def replace(self, **changes) -> "FP8Recipe":
        return self.from_dict({**self.to_dict(), **changes})


def _check_type(field: str, value: Any, expected: type) -> None:
    # bool is a subclass of int: `margin: true` in YAML must not pass as 1.
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise TypeError(f"FP8Recipe.{field} must be {expected.__name__}, got {type(value).__name__} ({value!r})")


def _check_choice(field: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"FP8Recipe.{field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
