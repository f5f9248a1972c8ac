"""convert_model / revert_model, and FP8Report: what runs in FP8, what does not, and why.

Conversion is in place and keeps every Parameter object, so an optimizer built before or after it
trains the same weights, and the checkpoint keys of the model do not change.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import attention, cast
from .linear import FP8Conv1D, FP8Linear, check_fp8_dims
from .recipe import FP8Recipe
from .scaling import without_compile_wrapper

# Attention GEMM FLOPs depend on the context length; counted at this many tokens at most.
_MAX_REPORT_CONTEXT = 4096


@dataclass
class _Row:
    name: str  # module name, or a description for rows that are not modules (attention)
    kind: str  # "Linear 2048->8192", "attention QK^T + P.V"
    flops_per_token: int  # forward GEMM FLOPs per token (backward is 2x, the same for every GEMM)
    fp8: bool
    reason: str = ""  # why not FP8


@dataclass
class FP8Report:
    """What `convert_model` did. `converted`: module names now running FP8 GEMMs; `skipped`: module
    name -> why it stays in high precision; `fp8_flop_fraction`: share of the model's GEMM FLOPs per
    token that run in FP8 (attention QK^T/P.V counted at `context` tokens, PaLM-MFU style).
    `attention_modules`: attention modules running `hf_fp8` FP8 attention (recipe.attention=True);
    when the recipe asks for FP8 attention and the model cannot have it, `skipped["attention"]` says why.
    `shared_input_scales`: groups of sibling linears casting their common input once
    ("model.layers.0.self_attn: q_proj, k_proj, v_proj"; recipe.share_input_scales).
    `str(report)` is a readable table (layers of a stack grouped as `layers.*`)."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fp8_flop_fraction: float = 0.0
    context: int | None = None
    recipe: FP8Recipe | None = None
    attention_modules: list[str] = field(default_factory=list)
    attention_kernel: str = ""  # which FP8 attention kernel runs (cuDNN fused or the reference), and why
    cast_kernel: str = ""  # which FP8 cast runs (Triton in eager CUDA mode, or the reference), and why
    shared_input_scales: list[str] = field(default_factory=list)
    rows: list[_Row] = field(default_factory=list, repr=False)

    @property
    def gemm_layers(self) -> int:
        """GEMM layers of the model (converted or not), attention not counted."""
        return len(self.converted) + len([r for r in self.rows if not r.fp8 and r.kind != "attention"])

    def summary(self) -> dict:
        """The coverage as a JSON-ready dict, for logs and run summaries."""
        return {
            "fp8_layers": len(self.converted),
            "gemm_layers": self.gemm_layers,
            "fp8_flop_fraction": round(self.fp8_flop_fraction, 4),
            "fp8_flops_context": self.context,
            "fp8_attention": bool(self.attention_modules),
            "attention_kernel": self.attention_kernel or None,
            "cast_kernel": self.cast_kernel or None,
            "skipped": self.skipped_by_pattern(),
        }

    def skipped_by_pattern(self) -> dict[str, str]:
        """`skipped` with per-layer names folded as in the table: "model.layers.*.mlp.x (x16)" -> reason,
        so a 16-layer LoRA model lists its adapters in 14 entries rather than 224."""
        groups: dict[tuple[str, str], int] = {}
        for name, reason in self.skipped.items():
            key = (_layer_pattern(name), reason)
            groups[key] = groups.get(key, 0) + 1
        return {f"{pattern} (x{n})" if n > 1 else pattern: reason for (pattern, reason), n in groups.items()}

    def __str__(self) -> str:
        total_layers = self.gemm_layers
        lines = [
            f"hf_fp8 coverage: {len(self.converted)}/{total_layers} GEMM layers in FP8, "
            f"{100 * self.fp8_flop_fraction:.1f}% of GEMM FLOPs per token"
            + (f" (attention counted at context {self.context})" if self.context else "")
        ]
        if self.recipe is not None:
            r = self.recipe
            lines.append(
                f"recipe: format={r.fp8_format} history={r.amax_history_len} algo={r.amax_compute_algo} "
                f"margin={r.margin} attention={r.attention}"
            )
        if self.cast_kernel:
            lines.append(f"FP8 casts: {self.cast_kernel}")
        if self.attention_kernel:
            lines.append(f"FP8 attention kernel: {self.attention_kernel}")
        groups: dict[tuple, list[_Row]] = {}
        for row in self.rows:
            key = (_layer_pattern(row.name), row.kind, row.fp8, row.reason)
            groups.setdefault(key, []).append(row)
        total = sum(r.flops_per_token for r in self.rows) or 1
        labels = {key: f"{key[0]} (x{len(rows)})" if len(rows) > 1 else key[0] for key, rows in groups.items()}
        width = max((len(label) for label in labels.values()), default=10)
        lines.append(f"  {'precision':<9} {'module':<{width}}  {'GEMM':<24} {'FLOPs':>6}  reason")
        for key, rows in groups.items():
            _, kind, fp8, reason = key
            share = 100 * sum(r.flops_per_token for r in rows) / total
            lines.append(f"  {'FP8' if fp8 else 'high':<9} {labels[key]:<{width}}  {kind:<24} {share:5.1f}%  {reason}".rstrip())
        if self.shared_input_scales:
            shared: dict[str, int] = {}
            for group in self.shared_input_scales:
                parent, names = group.split(": ", 1)
                key = f"{_layer_pattern(parent + '.').rstrip('.')}: {names}"  # model.layers.*.self_attn: q_proj, k_proj
                shared[key] = shared.get(key, 0) + 1
            lines.append("one input cast shared by: " + "; ".join(f"{g} (x{n})" if n > 1 else g for g, n in shared.items()))
        return "\n".join(lines)


def _layer_pattern(name: str) -> str:
    """model.layers.3.mlp.up_proj -> model.layers.*.mlp.up_proj"""
    return re.sub(r"\.\d+\.", ".*.", name)


def _matches(name: str, patterns: tuple[str, ...]) -> str | None:
    last = name.rsplit(".", 1)[-1]
    for p in patterns:
        if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(last, p):
            return p
    return None


def _gemm_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a module that is one GEMM, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return None


def _why_not_fp8(name: str, module: nn.Module, recipe: FP8Recipe) -> str | None:
    if any(part.startswith("lora_") for part in name.split(".")):
        # PEFT adapters are the only weights that train in a LoRA run and are tiny: FP8 would
        # cost their precision and save nothing.
        return "PEFT LoRA adapter (kept in high precision; see hf_fp8.integrations.peft)"
    pattern = _matches(name, recipe.skip)
    if pattern is not None:
        return f"skip pattern {pattern!r} (recipe.skip)"
    weight = module.weight
    if not weight.dtype.is_floating_point or weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return f"weight dtype {weight.dtype} (needs float32/bfloat16/float16 master weights)"
    in_f, out_f = _gemm_shape(module)
    return check_fp8_dims(in_f, out_f)


def _kernel_line(model: nn.Module, describe) -> str:
    """describe(device) for where `model`'s parameters are and, for a model still on the CPU, for
    this machine's current GPU too (where it will likely train): which kernel runs, for reports."""
    device = next(model.parameters()).device
    here = describe(device)
    if device.type == "cpu" and torch.cuda.is_available():
        gpu = torch.device("cuda", torch.cuda.current_device())
        return f"{here}; on {gpu}: {describe(gpu)}"
    return here


def _convert_attention(model: nn.Module, recipe: FP8Recipe, report: FP8Report, row: _Row | None) -> None:
    """Switch the model to FP8 attention, or say in the report why its attention stays high precision."""
    reason = attention.why_attention_stays_high_precision(model)
    if reason is None:
        report.attention_modules = attention.convert_attention(model, recipe)
        report.attention_kernel = _kernel_line(model, attention.attention_kernel)
        if row is not None:
            row.fp8, row.reason = True, ""
    else:
        report.skipped["attention"] = reason
        if row is not None:
            row.reason = reason


def _attention_row(model: nn.Module, context: int | None) -> tuple[_Row | None, int | None]:
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not (layers and heads and hidden):
        return None, None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    if context is None:
        context = min(getattr(config, "max_position_embeddings", None) or _MAX_REPORT_CONTEXT, _MAX_REPORT_CONTEXT)
    # Per token and layer: QK^T and P.V are each 2 * heads * head_dim * context FLOPs.
    flops = layers * 2 * (2 * heads * head_dim * context)
    reason = "recipe.attention is False (softmax(QK^T)V in high precision)"
    return _Row(f"attention ({layers} layer{'s' if layers > 1 else ''})", "attention", flops, fp8=False, reason=reason), context


def _unsupported_weight_modules(model: nn.Module) -> list[tuple[str, str]]:
    """Modules holding matrix weights hf_fp8 does not convert (their GEMMs, if any, stay high precision)."""
    known = (nn.Linear, Conv1D, nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, known) or "Norm" in type(m).__name__:
            continue
        mats = [n for n, p in m.named_parameters(recurse=False) if p.dim() >= 2]
        if mats:
            out.append((name, f"{type(m).__name__} holds matrix parameters ({', '.join(mats)}) hf_fp8 does not convert"))
    return out


# Linears of one module that read the same input in HF models: attention projections, gated MLPs.
_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"), ("q", "k", "v"),
             ("w1", "w3"), ("wi_0", "wi_1"))  # fmt: skip


def _fp8_child(parent: nn.Module, name: str) -> FP8Linear | None:
    child = getattr(parent, name, None)
    base = getattr(child, "base_layer", None)  # PEFT's LoRA wrapper hands its input to base_layer
    if isinstance(base, FP8Linear):
        return base
    return child if isinstance(child, FP8Linear) else None


def _is_cross_attention(name: str, module: nn.Module) -> bool:
    """Attention whose queries read the decoder and keys/values the encoder (BART/Whisper
    `encoder_attn`, T5 `EncDecAttention`, GPT-2 `crossattention`)."""
    last = name.rsplit(".", 1)[-1].lower()
    return bool(getattr(module, "is_cross_attention", False)) or last in ("encoder_attn", "encdecattention") or "cross" in last


def _share_input_scales(model: nn.Module, recipe: FP8Recipe) -> list[str]:
    """Let each group of sibling FP8 linears (`_SIBLINGS`, same recipe and input width) cast with
    the first one's input scale when `recipe.share_input_scales`, else each with its own. In
    cross-attention only k/v share (q reads another tensor). Returns the shared groups as
    "parent: a, b, c"."""
    shared = []
    for parent_name, parent in model.named_modules():
        cross = _is_cross_attention(parent_name, parent)
        for group in _SIBLINGS:
            if cross and group[0] in ("q_proj", "query", "q"):
                group = group[1:]
            layers = [(n, _fp8_child(parent, n)) for n in group]
            layers = [(n, m) for n, m in layers if m is not None]
            if len(layers) < 2:
                continue
            leader = layers[0][1]
            tie = [(n, m) for n, m in layers if m.recipe == leader.recipe and m.in_features == leader.in_features]
            for _, m in layers:
                m.share_input_scale(None)
            if recipe.share_input_scales and len(tie) > 1:
                for _, m in tie:
                    m.share_input_scale(leader.fp8_scale)
                shared.append(f"{parent_name}: {', '.join(n for n, _ in tie)}")
    return shared


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_model(model: nn.Module, recipe: FP8Recipe | None = None, *, context: int | None = None) -> FP8Report:
    """Swap every eligible nn.Linear (and GPT-2 Conv1D) of `model` for its FP8 version, in place.

    Eligible: not matched by `recipe.skip`, floating-point weight, in/out features multiples of 16.
    Idempotent (converted layers are left as they are and reported as FP8). Parameters are shared,
    not copied. Returns an FP8Report; raises ValueError if no layer can run in FP8 (with the reasons).
    `context`: tokens per sequence used to weigh attention FLOPs in the report (default: the
    config's max_position_embeddings, at most 4096).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model expects a torch.nn.Module, got {type(model).__name__}")
    model = without_compile_wrapper(model)  # torch.compile(model): convert the model inside (names, save hooks)
    recipe = recipe or FP8Recipe()
    if not isinstance(recipe, FP8Recipe):
        raise TypeError(f"convert_model: recipe must be an hf_fp8.FP8Recipe, got {type(recipe).__name__}")
    if _gemm_shape(model) is not None:
        raise TypeError(
            f"convert_model swaps the layers inside a model, and {type(model).__name__} is itself one layer; "
            "use hf_fp8.FP8Linear.from_linear(layer) (or wrap it in a module)"
        )

    report = FP8Report(recipe=recipe)
    swaps: list[tuple[str, nn.Module]] = []
    # id(module) -> its FP8 replacement, so a layer registered under several names (shared blocks)
    # gets one FP8 module under all of them, with one scaling state.
    replacements: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        shape = _gemm_shape(module)
        if shape is None:
            continue
        in_f, out_f = shape
        kind = f"{'Conv1D' if isinstance(module, Conv1D) else 'Linear'} {in_f}->{out_f}"
        flops = 2 * in_f * out_f
        if isinstance(module, (FP8Linear, FP8Conv1D)):
            report.rows.append(_Row(name, kind, flops, fp8=True))
            report.converted.append(name)
            continue
        reason = _why_not_fp8(name, module, recipe)
        if reason is not None:
            report.rows.append(_Row(name, kind, flops, fp8=False, reason=reason))
            report.skipped[name] = reason
            continue
        if id(module) not in replacements:
            is_conv = isinstance(module, Conv1D)
            replacements[id(module)] = FP8Conv1D.from_conv1d(module, recipe) if is_conv else FP8Linear.from_linear(module, recipe)
        swaps.append((name, replacements[id(module)]))
        report.rows.append(_Row(name, kind, flops, fp8=True))
        report.converted.append(name)

    for name, reason in _unsupported_weight_modules(model):
        report.skipped[name] = reason
        report.rows.append(_Row(name, "unknown", 0, fp8=False, reason=reason))

    if not report.converted:
        reasons = "\n".join(f"  {n}: {r}" for n, r in report.skipped.items()) or "  (no nn.Linear or Conv1D layers)"
        raise ValueError(f"convert_model: no layer of {type(model).__name__} can run in FP8:\n{reasons}")

    for name, new in swaps:
        _set_submodule(model, name, new)
    report.shared_input_scales = _share_input_scales(model, recipe)
    report.cast_kernel = _kernel_line(model, cast.describe)

    attention_row, report.context = _attention_row(model, context)
    if attention_row is not None:
        report.rows.append(attention_row)
    if recipe.attention:
        _convert_attention(model, recipe, report, attention_row)
    if getattr(getattr(model, "config", None), "hf_fp8_attention_stability", None):
        # A model saved after apply_attention_stability("fog-guard") carries the architecture
        # change in its config; re-apply it so the converted model computes the same function.
        from .stability import apply_attention_stability

        apply_attention_stability(model)
    total = sum(r.flops_per_token for r in report.rows)
    fp8 = sum(r.flops_per_token for r in report.rows if r.fp8)
    report.fp8_flop_fraction = fp8 / total if total else 0.0
    # save_pretrained keeps the FP8 buffers out of model.safetensors and writes them beside it
    # (fp8_state.safetensors, fp8_recipe.json); see hf_fp8/hub.py.
    from .hub import install_save_hooks

    install_save_hooks(model, report)
    return report


def revert_model(model: nn.Module) -> list[str]:
    """Turn every FP8Linear/FP8Conv1D of `model` back into nn.Linear/Conv1D sharing the same
    Parameters, and FP8 attention back to the attention implementation used before (the FP8 scaling
    state is dropped). Returns the reverted module names."""
    model = without_compile_wrapper(model)
    if isinstance(model, (FP8Linear, FP8Conv1D)):
        raise TypeError("revert_model reverts the layers inside a model; for one layer use layer.to_linear() / layer.to_conv1d()")
    reverted = attention.revert_attention(model)
    plain: dict[int, nn.Module] = {}  # a layer shared under several names stays shared
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, (FP8Linear, FP8Conv1D)):
            continue
        if id(module) not in plain:
            plain[id(module)] = module.to_linear() if isinstance(module, FP8Linear) else module.to_conv1d()
        _set_submodule(model, name, plain[id(module)])
        reverted.append(name)
    return reverted
