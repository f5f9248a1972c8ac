"""apply_attention_stability: keep FP8 attention stable, for a model trained from scratch or fine-tuned.

Two modes, for two situations:

"fog-guard"  (training from scratch; an ARCHITECTURE CHANGE: the model computes a different function
             from the one its weights were trained for, so use it before training, never on a
             pretrained checkpoint). The attention "entropy guard" of the paper's FOG block
             (fp8-background.md, section 1.1), applied to Llama-family attention:
               - RMSNorm per head on Q and K with a frozen gain of 1 (no parameter), so the attention
                 logits are bounded (|q.k| <= head_dim) and per-tensor delayed scales of Q, K and
                 the scores stay valid from one step to the next;
               - the softmax scale raised above 1/sqrt(head_dim) (module.scaling), since normalised
                 Q and K would otherwise give too flat an attention.
             The norms are forward hooks on q_proj/k_proj (reshape to heads, normalise each head,
             reshape back), so no parameter or state_dict key changes. In Llama the q_proj/k_proj
             outputs go through RoPE afterwards: the norm runs BEFORE RoPE, as in the FOG block
             (and in OLMo2/Qwen3). RoPE rotates pairs of features, so each head keeps unit RMS.
             The change is recorded in the config (`config.hf_fp8_attention_stability`), which
             `save_pretrained` writes to config.json: after `from_pretrained`, call
             `apply_attention_stability(model)` (mode read from the config) to get the same
             function back; transformers alone does not know the guard.
"preserve"   (fine-tuning pretrained weights; function-preserving only). Attention modules whose
             query/key amax history shows a spike the delayed scale could not follow run their
             attention in BF16 (`module.fp8_attention_fallback = reason`); every other module and
             every weight is left as it is. Not recorded in the config (a runtime choice).

Both return a `StabilityReport` (printable) of what was changed, per attention module.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import attention_modules
from .attention.register import FALLBACK_ATTR, STATE_ATTR
from .scaling import without_compile_wrapper

__all__ = ["MODES", "StabilityReport", "apply_attention_stability", "fog_softmax_scale"]

MODES = ("fog-guard", "preserve")
CONFIG_ATTR = "hf_fp8_attention_stability"
# Marks an attention module guarded by "fog-guard": {"softmax_scale", "eps"}.
_GUARD_ATTR = "_hf_fp8_fog_guard"
# Marks a q_proj/k_proj carrying the per-head norm hook.
_NORMED_ATTR = "_hf_fp8_per_head_rms_norm"
# Modules that already normalise Q and K (Qwen3, OLMo2, Gemma3, Cohere: q_norm/k_norm;
# Persimmon, StableLM: q_layernorm/k_layernorm; hf_fp8's own FOG model: q_guard/k_guard).
_QK_NORM_NAMES = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "q_guard", "k_guard")
_DEFAULT_EPS = 1e-6


@dataclass
class StabilityReport:
    """What `apply_attention_stability` did. `changed`: attention module name -> what was done;
    `unchanged`: name -> why it was left as it is. `fallback` (preserve) names the modules now
    running BF16 attention."""

    mode: str
    changed: dict[str, str] = field(default_factory=dict)
    unchanged: dict[str, str] = field(default_factory=dict)
    softmax_scale: float | None = None  # fog-guard

    @property
    def fallback(self) -> list[str]:
        return list(self.changed) if self.mode == "preserve" else []

    def __str__(self) -> str:
        head = f"hf_fp8 attention stability ({self.mode}): {len(self.changed)} attention module(s) changed"
        if self.softmax_scale is not None:
            head += f", softmax scale {self.softmax_scale:.6g}"
        lines = [head]
        lines += [f"  changed    {name}: {what}" for name, what in self.changed.items()]
        lines += [f"  unchanged  {name}: {why}" for name, why in self.unchanged.items()]
        return "\n".join(lines)


def apply_attention_stability(
    model: nn.Module,
    mode: str | None = None,
    *,
    softmax_scale: float | None = None,
    amax_growth_limit: float = 2.0,
    stats=None,
    max_overflow_fraction: float = 1e-3,
) -> StabilityReport:
    """Make `model`'s attention stable under FP8, in place. See the module docstring for the modes.

    mode: "fog-guard" or "preserve"; None reads the mode recorded in
        `model.config.hf_fp8_attention_stability` (how a reloaded fog-guard model is restored).
    softmax_scale (fog-guard): the attention softmax scale; default: the value recorded in the
        config if any, else `fog_softmax_scale(head_dim)`.
    preserve: an FP8 attention module falls back to BF16 attention when, for its query or key role,
        - the amax history shows a spike: the newest amax a_0 exceeds a_prev * 2**margin *
          amax_growth_limit, where a_prev is the rest of the history reduced with the recipe's
          algo (a_prev * 2**margin is the largest value the scale of the last step could
          represent); so with the default 2.0 the last step clipped its largest Q/K values to less
          than half their size; or
        - `stats` (an FP8StepStats, or its `.layers`) shows an overflow fraction above
          `max_overflow_fraction` for that role.
    Idempotent. Raises ValueError for an unknown mode (listing the modes) and for models fog-guard
    cannot be applied to (saying why).
    """
    model = without_compile_wrapper(model)
    if mode is None:
        recorded = getattr(getattr(model, "config", None), CONFIG_ATTR, None)
        if not recorded:
            raise ValueError(
                f"apply_attention_stability: no mode given and the model's config records none "
                f"(config.{CONFIG_ATTR}); pass one of {', '.join(map(repr, MODES))}"
            )
        mode = recorded["mode"]
    if mode not in MODES:
        raise ValueError(f"apply_attention_stability: unknown mode {mode!r}; modes: {', '.join(map(repr, MODES))}")
    if mode == "fog-guard":
        return _apply_fog_guard(model, softmax_scale)
    return _apply_preserve(model, amax_growth_limit, stats, max_overflow_fraction)


# ------------------------------------------------------------------------------------------------
# fog-guard
# ------------------------------------------------------------------------------------------------


def fog_softmax_scale(head_dim: int) -> float:
    """The default raised softmax scale: sqrt(2 / head_dim), i.e. sqrt(2) times the usual
    1/sqrt(head_dim). At the paper's head_dim 128 this is 0.125, the scale of its 1.5B FOG models.
    (The paper's 390M models used 2/sqrt(head_dim) = 0.17678 at the same head_dim, so the best
    value is a tuning choice; pass softmax_scale to pick another.) With unit-RMS heads a logit is
    at most scale * head_dim = sqrt(2 * head_dim) (16 at head_dim 128)."""
    return math.sqrt(2.0 / head_dim)


def _per_head_rms_norm(module, args, output, *, head_dim: int, eps: float):
    """Forward hook on q_proj/k_proj: (..., heads * head_dim) -> RMSNorm over each head's
    head_dim features, gain 1 (frozen: no parameter). Computed in float32 like HF's RMSNorm.
    Takes only numbers (via functools.partial), so deepcopy/pickle of the model stay correct."""
    shape = output.shape
    x = output.float().reshape(*shape[:-1], shape[-1] // head_dim, head_dim)
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return x.reshape(shape).to(output.dtype)


def _ensure_qk_norm_hooks(attn: nn.Module, args=None) -> None:
    """Forward pre-hook of a guarded attention module: make sure its current q_proj and k_proj
    carry the per-head norm. Needed because convert_model/revert_model replace q_proj/k_proj with
    new modules (FP8Linear <-> nn.Linear) that do not inherit forward hooks; so the guard holds in
    whatever order conversion and apply_attention_stability happen."""
    guard = getattr(attn, _GUARD_ATTR)
    for name in ("q_proj", "k_proj"):
        proj = getattr(attn, name)
        if not getattr(proj, _NORMED_ATTR, False):
            # prepend: the norm is part of the projection, so it runs before any other forward hook
            # (e.g. stats hooks) even when it is (re)attached after them.
            norm = functools.partial(_per_head_rms_norm, head_dim=attn.head_dim, eps=guard["eps"])
            proj.register_forward_hook(norm, prepend=True)
            setattr(proj, _NORMED_ATTR, True)


def _why_no_fog_guard(module: nn.Module) -> str | None:
    norms = [n for n in _QK_NORM_NAMES if getattr(module, n, None) is not None]
    if norms:
        return (
            f"it already normalises Q and K ({'/'.join(norms)}), i.e. it has its own entropy guard; a second, "
            "gain-free norm would change a working design. Train it as it is (use 'preserve' when fine-tuning)"
        )
    missing = [n for n in ("q_proj", "k_proj", "head_dim", "scaling") if not hasattr(module, n)]
    if missing:
        return (
            f"it has no {', '.join(missing)} (a fused QKV projection or a non-Llama attention): the guard "
            "normalises the separate q_proj/k_proj outputs per head"
        )
    return None


def _apply_fog_guard(model: nn.Module, softmax_scale: float | None) -> StabilityReport:
    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            "apply_attention_stability('fog-guard'): no attention module found "
            "(transformers *Attention modules with config and head_dim)"
        )
    refused = {name: why for name, m in modules if (why := _why_no_fog_guard(m))}
    if refused:
        name, why = next(iter(refused.items()))
        raise ValueError(
            f"apply_attention_stability('fog-guard') refuses {type(model).__name__}: {name} ({type(dict(modules)[name]).__name__}): "
            f"{why}." + (f" ({len(refused)} attention modules affected.)" if len(refused) > 1 else "")
        )
    config = getattr(model, "config", None)
    recorded = getattr(config, CONFIG_ATTR, None) or {}
    if recorded and recorded.get("mode") != "fog-guard":
        raise ValueError(f"apply_attention_stability('fog-guard'): config.{CONFIG_ATTR} records {recorded!r}")
    head_dims = {m.head_dim for _, m in modules}
    if softmax_scale is None:
        softmax_scale = recorded.get("softmax_scale")
    if softmax_scale is None:
        if len(head_dims) > 1:
            raise ValueError(f"apply_attention_stability: attention head dims differ ({sorted(head_dims)}); pass softmax_scale")
        softmax_scale = fog_softmax_scale(head_dims.pop())
    if not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0 and math.isfinite(softmax_scale)):
        raise ValueError(f"apply_attention_stability: softmax_scale must be a positive number, got {softmax_scale!r}")
    softmax_scale = float(softmax_scale)
    eps = float(recorded.get("eps", getattr(config, "rms_norm_eps", None) or _DEFAULT_EPS))

    report = StabilityReport(mode="fog-guard", softmax_scale=softmax_scale)
    for name, m in modules:
        guard = getattr(m, _GUARD_ATTR, None)
        old_scale = m.scaling
        m.scaling = softmax_scale
        if guard is None:
            setattr(m, _GUARD_ATTR, {"softmax_scale": softmax_scale, "eps": eps})
            m.register_forward_pre_hook(_ensure_qk_norm_hooks)
            _ensure_qk_norm_hooks(m)
            report.changed[name] = (
                f"per-head RMSNorm (frozen gain 1, eps {eps:g}) on q_proj/k_proj outputs before RoPE; "
                f"softmax scale {old_scale:.6g} -> {softmax_scale:.6g}"
            )
        else:
            guard["softmax_scale"] = softmax_scale
            _ensure_qk_norm_hooks(m)
            if old_scale != softmax_scale:
                report.changed[name] = f"already guarded; softmax scale {old_scale:.6g} -> {softmax_scale:.6g}"
            else:
                report.unchanged[name] = "already guarded (fog-guard applied before)"
    if config is not None:
        setattr(config, CONFIG_ATTR, {"mode": "fog-guard", "softmax_scale": softmax_scale, "eps": eps})
    return report


# ------------------------------------------------------------------------------------------------
# preserve
# ------------------------------------------------------------------------------------------------


def _history_spike(state, role: str, growth_limit: float) -> str | None:
    """Why role's amax history shows overflow risk, or None.

    Criterion: let a_0 be the newest amax (the last optimizer step) and a_prev the history before it
    reduced with the recipe's algo (max of a_1..a_{L-1}, or a_1 for "most_recent"). The scale the
    last step cast with was fp8_max / a_prev / 2**margin (up to the oldest entry, rolled out since),
    so it could represent values up to a_prev * 2**margin. Risk when a_0 > a_prev * 2**margin * growth_limit: the largest values of
    the last step were clipped to less than 1/growth_limit of their size, and amax is moving faster
    than a delayed scale follows. Needs two recorded steps (a_prev > 0)."""
    i = state.index(role)
    history = state.amax_history[i].float().cpu()
    if history.numel() < 2:
        return None
    newest = history[0].item()
    previous = (history[1:].max() if state.amax_compute_algo == "max" else history[1]).item()
    if not (previous > 0 and math.isfinite(newest)):
        return None
    representable = previous * 2.0**state.margin
    if newest > representable * growth_limit:
        return (
            f"{role} amax {newest:.4g} at the last step is {newest / representable:.3g}x what the delayed scale "
            f"could represent ({previous:.4g} x 2**margin {state.margin}), above the limit {growth_limit:g}x"
        )
    return None


def _stats_overflow(stats, name: str, role: str, limit: float) -> str | None:
    """Why a stats step shows `role` of attention module `name` overflowing, or None."""
    layers = stats.layers if hasattr(stats, "layers") else stats
    fraction = ((layers or {}).get(name, {}).get(role, {}) or {}).get("overflow_fraction")
    if fraction is not None and fraction > limit:
        return f"{role} overflow fraction {fraction:.3g} in the stats step, above {limit:g}"
    return None


def _apply_preserve(model: nn.Module, growth_limit: float, stats, max_overflow_fraction: float) -> StabilityReport:
    if not growth_limit >= 1.0:
        raise ValueError(f"apply_attention_stability('preserve'): amax_growth_limit must be >= 1, got {growth_limit!r}")
    report = StabilityReport(mode="preserve")
    for name, m in attention_modules(model):
        state = getattr(m, STATE_ATTR, None)
        if state is None:
            report.unchanged[name] = "no FP8 attention (convert with FP8Recipe(attention=True))"
            continue
        current = getattr(m, FALLBACK_ATTR, None)
        if current:
            report.unchanged[name] = f"already runs BF16 attention: {current}"
            continue
        reasons = []
        for role in ("query", "key"):
            why = _history_spike(state, role, growth_limit)
            if why is None and stats is not None:
                why = _stats_overflow(stats, name, role, max_overflow_fraction)
            if why is not None:
                reasons.append(why)
        if reasons:
            reason = "; ".join(reasons)
            setattr(m, FALLBACK_ATTR, reason)
            report.changed[name] = f"runs BF16 attention: {reason}"
        else:
            report.unchanged[name] = "query/key amax within limits: stays FP8"
    return report
