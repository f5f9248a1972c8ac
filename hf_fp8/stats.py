"""FP8 health statistics: the delayed-scaling state of every FP8 tensor, and, on a stats step,
how many values the current scales saturate or flush to zero, plus the paper's kurtosis.

Two entry points:

  fp8_stats(model)
      The scaling state only (scale, amax, last amax, nonfinite_skips per layer and role). Reads
      buffers; installs nothing. Syncs with the device, so call it on logging steps.

  with collect_fp8_stats(model) as stats:        # a "stats step"
      loss = model(**batch).loss
      loss.backward()
  stats.layers      # fp8_stats(model) + overflow/underflow fractions and cast SQNR of this step
  stats.kurtosis    # per decoder block and averaged over blocks
  stats.flat()      # {"fp8/kurtosis/qkv_mean": 3.1, "fp8/overflow_max": 0.0, ...} for Trainer logs
  stats.to_dict()   # everything, JSON-serializable

Hooks exist only between entering and leaving the `with` block (or `stats.start()` / `stats.stop()`
for loops that cannot wrap a step in a `with`, e.g. Trainer callbacks): forward hooks on the FP8
linears and the decoder blocks, a tensor hook on each FP8 output for its gradient, and a wrapper
around the `hf_fp8` attention function. Ordinary steps run with none of them and pay nothing.
Run the backward inside the block to get the gradient roles; a backward after the block is not
observed.

Definitions (all at the scale the step's casts actually used, i.e. `cast_scale`: the delayed scale,
or the tensor's own dynamic scale before the role's first update):
  overflow_fraction   share of elements the saturating cast clips to +-fp8_max: |x * scale| beyond
                      fp8_max's rounding interval (> 464 for E4M3, > 61440 for E5M2);
  underflow_fraction  share of elements with x != 0 whose cast `(x * scale).to(fp8 dtype)` is 0,
                      i.e. |x * scale| <= half the dtype's smallest subnormal (round-half-to-even
                      sends the exact half to 0): 2**-10 for E4M3, 2**-17 for E5M2;
  sqnr_db             signal-to-quantization-noise ratio of the cast in dB: 10 log10(sum (x*scale)**2
                      / sum (fp8(x*scale) - x*scale)**2), over all elements cast in the step. The
                      formats' relative precision sets it for a tensor within range: ~31.5 dB for
                      E4M3, ~25.6 dB for E5M2 (gaussian, uniform or laplace data alike); it drops
                      when values saturate (scale too large) or sink into the subnormals (scale far
                      too small), so a layer below its peers is where FP8 loses the most;
  kurtosis            `mean(x**4) / mean(x**2)**2` over the hidden dim of each token, averaged over
                      the tokens of the step (tokens whose activations are all zero are left out).
                      3 for a gaussian vector, hundreds with outlier features (paper, section 1.5).
Kurtosis is taken on (1) the QKV projection output of each decoder block (q/k/v outputs
concatenated per token, which equals the output of a fused QKV GEMM; the GEMM output itself, before
a QK norm, as in the paper, also for the hook-based norm of `apply_attention_stability("fog-guard")`),
(2) the input of the MLP down-projection, (3) the output of each decoder block.

Not observed: attention's output, grad_scores, grad_query/key/value roles (the fused kernel produces
them already in FP8; their amaxes and scales are in `fp8_stats`), and
attention modules running their BF16 fallback (`fp8_attention_fallback`: nothing is cast to FP8).
The `scale`/`amax` fields are read when the stats step ends, so if the optimizer step (and the
scale update) runs inside the block they show the updated state, while the fractions describe the
scales the step's casts used.
"""

from __future__ import annotations

import json
import math
import weakref

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from ._torchao import to_fp8_saturated
from .attention.register import ATTN_IMPLEMENTATION, FALLBACK_ATTR, STATE_ATTR
from .linear import LINEAR_ROLES, _autocast_input
from .scaling import DelayedScale, amax_of, cast_scale, delayed_scale_states, without_compile_wrapper

__all__ = ["FP8StepStats", "collect_fp8_stats", "fp8_stats"]

# Kurtosis sites. Module names (the last part of the dotted name) of QKV projections, separate or
# fused, and of the MLP down-projection across the HF families (Llama/Qwen/Mistral/Gemma/Phi3,
# GPT-NeoX, GPT-2, OPT/Phi, Mixtral-style experts). GPT-2's `c_proj` counts only under `mlp`
# (`attn.c_proj` is the attention output projection).
_QKV_NAMES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
_DOWN_NAMES = ("down_proj", "dense_4h_to_h", "fc2", "w2")
KURTOSIS_SITES = ("qkv", "mlp_down_input", "block_output")
# Models with a stats step in progress: one at a time per model (two would count every tensor twice
# and compete for its attention modules).
_COLLECTING: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


@torch.no_grad()
def fp8_stats(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """layer name -> role -> {scale, amax (history reduced with the recipe's algo), last_amax,
    initialized, nonfinite_skips}. Layer names are the FP8 modules' names in `model` ("<root>" for
    the model itself). Linears have roles input/weight/grad_output, FP8 attention modules
    the nine of `hf_fp8.attention.ATTENTION_ROLES`. Overflow/underflow and kurtosis need the tensors of a
    step: use `collect_fp8_stats`."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, state in delayed_scale_states(model):
        history = state.amax_history.float().cpu()
        reduced = history.amax(dim=1) if state.amax_compute_algo == "max" else history[:, 0]
        scale = state.scale.float().cpu()
        initialized = state.initialized.cpu()
        skips = state.nonfinite_skips.cpu()
        roles = {}
        for i, role in enumerate(state.roles):
            roles[role] = {
                "scale": scale[i].item(),
                "amax": reduced[i].item(),
                "last_amax": history[i, 0].item(),
                "initialized": bool(initialized[i].item()),
                "nonfinite_skips": int(skips[i].item()),
            }
        out[name] = roles
    return out


def collect_fp8_stats(model: nn.Module) -> "FP8StepStats":
    """A stats step over `model`: `with collect_fp8_stats(model) as stats: <forward + backward>`.
    Nothing is installed until the block is entered (or `.start()` is called)."""
    return FP8StepStats(model)


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's decoder blocks: the children of the first nn.ModuleList whose length is the
    config's num_hidden_layers (the text config's for multimodal models). Without a config: the
    longest ModuleList whose children all have one type. [] if none is found."""
    config = getattr(model, "config", None)
    n_layers = None
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = getattr(text, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        if n_layers is not None:
            if len(m) == n_layers:
                best = (name, m)
                break
        elif len({type(c) for c in m}) == 1 and (best is None or len(m) > len(best[1])):
            best = (name, m)
    if best is None:
        return []
    prefix = f"{best[0]}." if best[0] else ""
    return [(f"{prefix}{i}", block) for i, block in enumerate(best[1])]


def _kurtosis_site(relative_name: str, module: nn.Module) -> str | None:
    """'qkv', 'mlp_down_input' or None for a module inside a decoder block."""
    if not isinstance(module, (nn.Linear, Conv1D)):
        return None
    parts = relative_name.split(".")
    last = parts[-1]
    if last in _QKV_NAMES:
        return "qkv"
    if last in _DOWN_NAMES or (last == "c_proj" and len(parts) > 1 and parts[-2] == "mlp"):
        return "mlp_down_input"
    return None


def _token_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (all dims but the last): sum(x^2), sum(x^4) over the hidden dim, in float64 so
    x^4 of large activations cannot overflow (stats steps only)."""
    x = x.detach().reshape(-1, x.shape[-1]).double()
    x2 = x * x
    return x2.sum(dim=-1), (x2 * x2).sum(dim=-1)


def _kurtosis_sum(s2: torch.Tensor, s4: torch.Tensor, n: int) -> torch.Tensor:
    """(sum over tokens of mean(x^4)/mean(x^2)^2, number of tokens used) as a float64 (2,) tensor;
    tokens with all-zero activations have no kurtosis and are left out."""
    valid = s2 > 0
    k = (s4 / n) / (s2 / n).clamp(min=torch.finfo(torch.float64).tiny) ** 2
    return torch.stack([torch.where(valid, k, torch.zeros_like(k)).sum(), valid.sum().double()])


def overflow_threshold(dtype: torch.dtype) -> float:
    """The smallest |x * scale| the saturating cast clips: fp8_max plus half an ulp at fp8_max
    (464 for E4M3, 61440 for E5M2). Values between fp8_max and this round to fp8_max anyway."""
    info = torch.finfo(dtype)
    ulp_at_max = 2.0 ** math.floor(math.log2(info.max)) * info.eps
    return info.max + ulp_at_max / 2


def cast_counts(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(overflowing, underflowing, total, signal, noise) of casting `x` to `dtype` with `scale`
    (fp8 = x * scale, computed in float32 as the casts do) as a float64 (5,) tensor on x's device.

    Overflow: |x * scale| > overflow_threshold(dtype), i.e. the value lies beyond the rounding
    interval of fp8_max and the saturating cast clips it. (Not `> fp8_max`: the amax element of a
    dynamically scaled tensor lands within an fp32 rounding error above fp8_max, and is not clipped.)
    Underflow: x != 0 and torch's own cast of x * scale gives 0 (|x * scale| <= half the smallest
    subnormal: 2**-10 for E4M3, 2**-17 for E5M2).
    Signal and noise: sum of y**2 and of (fp8(y) - y)**2 with y = x * scale and fp8 the saturating
    cast; their ratio is the cast's SQNR (scale-free: both scale with scale**2)."""
    x = x.detach()
    y = x.float() * scale
    q = to_fp8_saturated(y, dtype)  # the saturating cast FP8Linear does (hf_fp8.cast.to_fp8)
    over = (y.abs() > overflow_threshold(dtype)).sum()
    under = ((q == 0) & (x != 0)).sum()
    # fp8(y) - y is exact in float32 (y has 24 significant bits, fp8(y) 4 or 3); summed in float32
    # (pairwise on CPU, tree-wise on GPU: ~1e-6 relative, 1e-5 dB), no float64 copy of the tensor.
    signal = y.square().sum()
    noise = (q.float() - y).square().sum()
    n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)  # counts: exact in float64
    return torch.stack([over.double(), under.double(), n, signal.double(), noise.double()])


def sqnr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise): None for an all-zero tensor, inf for an exact cast."""
    if signal <= 0:
        return None
    return math.inf if noise <= 0 else 10 * math.log10(signal / noise)


def _first_tensor(output) -> torch.Tensor | None:
    """A decoder block's hidden-state output: the tensor itself, or the first element of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


class FP8StepStats:
    """One stats step. Enter it (`with`) or `start()` it before the step's forwards, leave it or
    `stop()` it after the backward; then read `layers`, `kurtosis`, `flat()`, `to_dict()`.

    Several forwards inside one stats step (gradient accumulation) are pooled: fractions are over
    all elements cast, kurtosis over all tokens. With gradient checkpointing the recomputed
    forwards are counted again (same values, so fractions and averages do not change)."""

    def __init__(self, model: nn.Module):
        self.model = without_compile_wrapper(model)
        self.layers: dict[str, dict[str, dict[str, float]]] | None = None
        self.kurtosis: dict[str, dict[str, float | dict[str, float]]] | None = None
        self._active = False
        self._handles: list = []
        self._counts: dict[tuple[str, str], torch.Tensor] = {}  # (layer, role) -> cast_counts sums
        self._kurt: dict[tuple[str, str], torch.Tensor] = {}  # (site, block) -> (sum of k, tokens)
        self._qkv_pending: dict[str, list] = {}  # block -> [sum x^2, sum x^4, features] of this call
        self._attention: dict[int, tuple[str, DelayedScale]] = {}  # id(attention module) -> (name, state)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "FP8StepStats":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "FP8StepStats":
        """Install the hooks. Refused if this object or another one is collecting on the model."""
        if self._active:
            raise RuntimeError("collect_fp8_stats: this stats step is already running")
        if self.model in _COLLECTING:
            raise RuntimeError("collect_fp8_stats: another stats step is already running on this model")
        try:
            self._install()
        except Exception:
            self._remove()
            raise
        _COLLECTING.add(self.model)
        self._active = True
        return self

    def stop(self) -> "FP8StepStats":
        """Remove every hook and turn what was observed into host floats (one device sync)."""
        if not self._active:
            return self
        self._active = False
        self._remove()
        _COLLECTING.discard(self.model)
        self._finalize()
        return self

    def _install(self) -> None:
        for name, state in delayed_scale_states(self.model):
            owner = self.model if name == "<root>" else self.model.get_submodule(name)
            if state.roles == LINEAR_ROLES and getattr(owner, "fp8_scale", None) is state:
                self._handles.append(owner.register_forward_hook(self._make_linear_hook(name, state)))
            elif getattr(owner, STATE_ATTR, None) is state:
                self._attention[id(owner)] = (name, state)
        if self._attention:
            _observe_attention(self, list(self._attention))
        for block_name, block in decoder_blocks(self.model):
            for rel, m in block.named_modules():
                site = _kurtosis_site(rel, m)
                if site == "qkv":
                    # prepend: see the projection's own (GEMM) output, ahead of hooks that transform
                    # it, such as the per-head norm of apply_attention_stability("fog-guard").
                    self._handles.append(m.register_forward_hook(self._make_qkv_hook(block_name), prepend=True))
                elif site == "mlp_down_input":
                    self._handles.append(m.register_forward_pre_hook(self._make_down_hook(block_name)))
            self._handles.append(block.register_forward_hook(self._make_block_hook(block_name)))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        _stop_observing_attention(list(self._attention))

    # -- observation ----------------------------------------------------------------------------

    def _add(self, store: dict, key, value: torch.Tensor) -> None:
        store[key] = store[key] + value if key in store else value

    def _observe(self, layer: str, role: str, x: torch.Tensor, state: DelayedScale) -> None:
        """Count how x, cast with the scale role `role` uses right now, overflows/underflows."""
        i = state.index(role)
        with torch.no_grad():
            scale = cast_scale(state, i, amax_of(x))
            self._add(self._counts, (layer, role), cast_counts(x, scale, state.dtypes[i]))

    def _grad_hook(self, layer: str, role: str, state: DelayedScale):
        def hook(grad):
            if self._active:  # a backward after the stats step is not observed
                self._observe(layer, role, grad, state)
            return None

        return hook

    def _make_linear_hook(self, name: str, state: DelayedScale):
        def hook(module, args, output):
            # The operands exactly as FP8Linear/FP8Conv1D cast them (autocast dtype for the input).
            if args:  # with a shared input scale (FP8Recipe.share_input_scales) the sibling's state casts it
                shared = getattr(module, "_shared_input_scale", None)
                self._observe(name, "input", _autocast_input(args[0]), state if shared is None else shared)
            self._observe(name, "weight", module.weight, state)
            # FP8 layers compute `out = fp8_matmul(...) (+ bias)`: the gradient of the module output
            # is the grad-output the backward casts.
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(self._grad_hook(name, "grad_output", state))

        return hook

    def _attention_call(self, attention_fn, module, query, key, value, *args, **kwargs):
        """Run `attention_fn` (the `hf_fp8` attention function) on one of this model's FP8
        attention modules, observing Q/K/V now and dO in backward."""
        name, state = self._attention[id(module)]
        observe = self._active and not getattr(module, FALLBACK_ATTR, None)
        if observe:
            # Un-repeated GQA key/value: repeat_kv copies heads, which leaves the fractions unchanged.
            self._observe(name, "query", query, state)
            self._observe(name, "key", key, state)
            self._observe(name, "value", value, state)
        out, weights = attention_fn(module, query, key, value, *args, **kwargs)
        if observe and out.requires_grad:
            # The attention function returns out.transpose(1, 2): same values as the dO it casts.
            out.register_hook(self._grad_hook(name, "grad_output", state))
        return out, weights

    def _make_qkv_hook(self, block: str):
        def hook(module, args, output):
            s2, s4 = _token_moments(output)
            pending = self._qkv_pending.get(block)
            if pending is None:
                self._qkv_pending[block] = [s2, s4, output.shape[-1]]
            else:  # q, k, v of one call: concatenate per token by adding the moments
                pending[0] = pending[0] + s2
                pending[1] = pending[1] + s4
                pending[2] += output.shape[-1]

        return hook

    def _make_down_hook(self, block: str):
        def hook(module, args):
            x = args[0]
            s2, s4 = _token_moments(x)
            self._add(self._kurt, ("mlp_down_input", block), _kurtosis_sum(s2, s4, x.shape[-1]))

        return hook

    def _make_block_hook(self, block: str):
        def hook(module, args, output):
            # The q/k/v projections of this call ran inside the block: close their per-token sums.
            pending = self._qkv_pending.pop(block, None)
            if pending is not None:
                self._add(self._kurt, ("qkv", block), _kurtosis_sum(*pending))
            x = _first_tensor(output)
            if x is not None:
                s2, s4 = _token_moments(x)
                self._add(self._kurt, ("block_output", block), _kurtosis_sum(s2, s4, x.shape[-1]))

        return hook

    # -- results --------------------------------------------------------------------------------

    def _finalize(self) -> None:
        layers = fp8_stats(self.model)
        counts = {k: v.tolist() for k, v in self._counts.items()}  # host sync
        for (layer, role), (over, under, n, signal, noise) in counts.items():
            if n > 0:
                layers[layer][role]["overflow_fraction"] = over / n
                layers[layer][role]["underflow_fraction"] = under / n
                db = sqnr_db(signal, noise)
                if db is not None:
                    layers[layer][role]["sqnr_db"] = db
        kurtosis: dict[str, dict] = {}
        for site in KURTOSIS_SITES:
            per_layer = {}
            for (s, block), v in self._kurt.items():
                total, tokens = v.tolist()
                if s == site and tokens > 0:
                    per_layer[block] = total / tokens
            if per_layer:
                values = list(per_layer.values())
                kurtosis[site] = {"mean": sum(values) / len(values), "max": max(values), "per_layer": per_layer}
        self.layers, self.kurtosis = layers, kurtosis
        self._counts.clear()
        self._kurt.clear()
        self._qkv_pending.clear()

    def _check_done(self) -> None:
        if self.layers is None:
            raise RuntimeError("FP8StepStats: results exist once the stats step ended (leave the `with` block or call stop())")

    def to_dict(self) -> dict:
        """{"layers": layer -> role -> fields, "kurtosis": site -> {mean, max, per_layer}};
        plain Python numbers only (json.dumps works; a NaN/inf amax is stored as a string)."""
        self._check_done()
        return _json_safe({"layers": self.layers, "kurtosis": self.kurtosis})

    def flat(self, prefix: str = "fp8/") -> dict[str, float]:
        """One level of `prefix`-ed keys with float values, for `Trainer.log` / wandb:
          {prefix}kurtosis/{qkv,mlp_down_input,block_output}_{mean,max}
          {prefix}overflow_max, {prefix}underflow_max           worst fraction over all layers/roles
          {prefix}overflow_max/{linear,attention}/{role}, same for underflow
          {prefix}sqnr_min_db, {prefix}sqnr_min_db/{linear,attention}/{role}   lowest cast SQNR
          {prefix}sqnr_db/{module}/{role}      mean SQNR over the layers of one module name (the last
                                               part of the layer name: q_proj, down_proj, self_attn...)
          {prefix}nonfinite_skips                                 total over all layers and roles
        Roles with no observation this step (e.g. grad_output without a backward) are left out, and
        so are exact casts (infinite SQNR) from the SQNR keys."""
        self._check_done()
        out: dict[str, float] = {}
        for site, values in self.kurtosis.items():
            out[f"{prefix}kurtosis/{site}_mean"] = float(values["mean"])
            out[f"{prefix}kurtosis/{site}_max"] = float(values["max"])
        worst: dict[str, float] = {}
        sqnr_by_module: dict[str, list[float]] = {}
        skips = 0
        for layer, roles in self.layers.items():
            kind = "attention" if "query" in roles else "linear"
            module = layer.rpartition(".")[2]
            for role, fields in roles.items():
                skips += fields["nonfinite_skips"]
                for what in ("overflow", "underflow"):
                    value = fields.get(f"{what}_fraction")
                    if value is None:
                        continue
                    for key in (f"{prefix}{what}_max", f"{prefix}{what}_max/{kind}/{role}"):
                        worst[key] = max(worst.get(key, 0.0), value)
                db = fields.get("sqnr_db")
                if db is None or not math.isfinite(db):
                    continue
                for key in (f"{prefix}sqnr_min_db", f"{prefix}sqnr_min_db/{kind}/{role}"):
                    worst[key] = min(worst.get(key, math.inf), db)
                sqnr_by_module.setdefault(f"{prefix}sqnr_db/{module}/{role}", []).append(db)
        out.update(worst)
        out.update({key: sum(values) / len(values) for key, values in sqnr_by_module.items()})
        out[f"{prefix}nonfinite_skips"] = float(skips)
        return out

    def __repr__(self) -> str:
        if self.layers is None:
            return f"FP8StepStats({'collecting' if self._active else 'not started'})"
        return "FP8StepStats(" + json.dumps(self.flat(prefix=""), sort_keys=True) + ")"


# The `hf_fp8` attention function is looked up in transformers' shared registry
# (ALL_ATTENTION_FUNCTIONS) on every attention call. While any stats step observes attention, a local
# override there routes calls of observed modules through their FP8StepStats; all other calls go
# to the function that was registered before. One override for all stats steps at once, so they
# can start and stop in any order.
_ATTENTION_OBSERVERS: dict[int, FP8StepStats] = {}  # id(attention module) -> its stats step
_attention_before: list = []  # [the function the override replaced], while the override is installed


def _observing_attention(module, query, key, value, *args, **kwargs):
    stats = _ATTENTION_OBSERVERS.get(id(module))
    if stats is None:
        return _attention_before[0](module, query, key, value, *args, **kwargs)
    return stats._attention_call(_attention_before[0], module, query, key, value, *args, **kwargs)


def _observe_attention(stats: FP8StepStats, module_ids: list[int]) -> None:
    if not _attention_before:
        _attention_before.append(ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION])
        ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = _observing_attention
    for i in module_ids:
        _ATTENTION_OBSERVERS[i] = stats


def _stop_observing_attention(module_ids: list[int]) -> None:
    for i in module_ids:
        _ATTENTION_OBSERVERS.pop(i, None)
    if _attention_before and not _ATTENTION_OBSERVERS:
        before = _attention_before.pop()
        if ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is _observing_attention:
            del ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION]
        if ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is not before:
            ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] = before  # a local override that was there before


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
