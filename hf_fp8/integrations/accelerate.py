"""hf_fp8 as the FP8 backend of Hugging Face Accelerate (`Accelerator(mixed_precision="fp8")`).

Accelerate 1.x has three built-in FP8 backends (torchao "AO", Transformer Engine "TE", MS-AMP) and no
plugin mechanism for a fourth, so this module patches three members of `accelerate.Accelerator`
(class level, idempotent, undone by `disable()`):

- `Accelerator.fp8_backend` (property): for an accelerator hf_fp8 is selected for, returns
  `HF_FP8_BACKEND` (a str "HF_FP8" that equals none of AO/TE/MSAMP/NO). Every FP8 branch of
  Accelerate compares against those members, so none of them runs: no torchao `Float8Linear`
  conversion, no TE autowrap, no MS-AMP, and `__init__` neither auto-detects torchao nor creates an
  `AORecipeKwargs`. What Accelerate does for any FP8 run still happens: `native_amp` is on and the
  prepared model's forward runs under `torch.autocast(<device>, dtype=torch.bfloat16)` (CPU and GPU,
  single process, DDP, FSDP), so the non-FP8 ops run in BF16 with fp32 master weights.
- `Accelerator.__init__`: records, before Accelerate's own logic runs, whether the user asked for
  one of Accelerate's backends explicitly (see "selection").
- `Accelerator.prepare` / `prepare_model` / `prepare_optimizer`: before Accelerate wraps a model
  (DDP, ...), `hf_fp8.convert_model(model, recipe)` converts it in place (linears, and attention
  when the recipe says so) and the coverage report is printed (main process), so a run that is not
  in FP8 cannot go unnoticed; the FP8 scaling buffers are excluded from DDP's buffer broadcast
  (`update_scales` keeps them identical across ranks with its own all-reduce; DDP would otherwise
  re-send every amax history from rank 0 before each synchronised forward, and a forward run
  outside `no_sync` mid-accumulation would overwrite the amaxes this rank recorded so far). After
  Accelerate has wrapped the optimizer, `hf_fp8.attach(model, optimizer.optimizer)` registers the
  scale update as a step post-hook of the *underlying* torch optimizer. `AcceleratedOptimizer.step`
  calls the underlying `step` only when `accelerator.sync_gradients` is True, so with
  `gradient_accumulation_steps=N` the amax histories roll once per N micro-batches (once per real
  optimizer step), with the amaxes of all N micro-batches (and, under DDP, of all ranks) max-reduced.
  Conversion keeps the Parameter objects, so the optimizer built before `prepare` trains the FP8
  layers' weights (a converted weight missing from the optimizer is warned about).

Selection: hf_fp8 is used by an Accelerator when (1) the integration is enabled (`enable()`,
or `import hf_fp8` when hf_fp8's `__init__` enables it and `HF_FP8_ACCELERATE` is not "0"), (2) its
mixed precision is "fp8" (`Accelerator(mixed_precision="fp8")`, `accelerate launch
--mixed_precision fp8`, or a config file with `mixed_precision: fp8`), and (3) the user did not
choose one of Accelerate's backends explicitly: no `AORecipeKwargs`/`TERecipeKwargs`/
`MSAMPRecipeKwargs`/`FP8RecipeKwargs` in `kwargs_handlers`, no `ACCELERATE_FP8_BACKEND` (set by
`accelerate launch --fp8_backend` or a config's `fp8_config.backend`). When (1) and (2) hold but
(3) does not, `prepare` warns that hf_fp8 stays out. `uses_hf_fp8(accelerator)` tells.

Recipe: `enable(recipe=...)` (an `FP8Recipe` or a path), else the file named by `HF_FP8_RECIPE`,
else `FP8Recipe()`; resolved at each `prepare`.

FSDP2 FP8 weight all-gather (opt-in): `enable(fsdp_fp8_all_gather=True)` or
`HF_FP8_FSDP_FP8_ALL_GATHER=1`. When the Accelerator runs FSDP2, `prepare` then calls
`hf_fp8.distributed.enable_fp8_all_gather` on the converted model before Accelerate shards it, and
puts the wrapped weights (new Parameter objects over the same data) in place of the old ones in the
optimizers it prepares, so they train (the trap of Accelerate's torchao path, whose FP8 all-gather
leaves converted weights out of the optimizer). Other distributed types ignore the option.

Tested (CPU): single process, gradient accumulation, DDP over gloo with 2 processes
(`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2`), `torch.compile` through
`dynamo_backend` (prepare converts first, Accelerate then compiles the converted model). Not tested:
GPUs (the code has no CPU-specific path), FSDP/FSDP2 (conversion happens before sharding; FP8Linear
on DTensor weights is untested), DeepSpeed and Megatron-LM (their engines own the optimizer step;
whether the post-hook fires is untested); `prepare` warns for the last three.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..convert import FP8Report, convert_model
from ..recipe import FP8Recipe
from ..distributed import ddp_ignore_fp8_buffers, enable_fp8_all_gather
from ..scaling import attach, without_compile_wrapper

ENV_RECIPE = "HF_FP8_RECIPE"
ENV_AUTO = "HF_FP8_ACCELERATE"
ENV_FSDP_FP8_ALL_GATHER = "HF_FP8_FSDP_FP8_ALL_GATHER"


class _BackendName(str):
    """What `Accelerator.fp8_backend` returns for an accelerator hf_fp8 runs: a str equal to
    "HF_FP8" (so to no `FP8BackendType` member), with the enum's `.value`/`.name`."""

    @property
    def value(self) -> str:
        return str(self)

    @property
    def name(self) -> str:
        return str(self)


HF_FP8_BACKEND = _BackendName("HF_FP8")

# Class attributes of accelerate.Accelerator replaced by enable(), and their originals.
_PATCHED = ("__init__", "fp8_backend", "prepare", "prepare_model", "prepare_optimizer")
_originals: dict[str, object] = {}
_recipe: FP8Recipe | str | Path | None = None
_fsdp_fp8_all_gather: bool | None = None  # None: $HF_FP8_FSDP_FP8_ALL_GATHER decides

# Attributes kept on each Accelerator instance (in its __dict__).
_EXPLICIT = "_hf_fp8_explicit_backend"  # str | None: an Accelerate backend the user chose
_MODELS = "_hf_fp8_models"  # list of (model, report, recipe)
_NOTED = "_hf_fp8_noted"  # the "hf_fp8 stays out" warning was given
_SWAPS = "_hf_fp8_param_swaps"  # id(old Parameter) -> (old, new) from the FP8 all-gather wrapping


# --------------------------------------------------------------------------------------- public API


def enable(recipe: FP8Recipe | str | Path | None = None, fsdp_fp8_all_gather: bool | None = None) -> None:
    """Make hf_fp8 the FP8 backend of every `Accelerator` with `mixed_precision="fp8"` created
    after this call (see the module docstring). `recipe`: an FP8Recipe or the path of a recipe
    file; None: the file named by $HF_FP8_RECIPE, else `FP8Recipe()`. `fsdp_fp8_all_gather`: under
    FSDP2, all-gather FP8 weights (None: $HF_FP8_FSDP_FP8_ALL_GATHER, default off). Calling it again
    only replaces these settings."""
    global _recipe, _fsdp_fp8_all_gather
    if recipe is not None and not isinstance(recipe, (FP8Recipe, str, Path)):
        raise TypeError(f"enable: recipe must be an FP8Recipe or a path, got {type(recipe).__name__}")
    if fsdp_fp8_all_gather is not None and not isinstance(fsdp_fp8_all_gather, bool):
        raise TypeError(f"enable: fsdp_fp8_all_gather must be a bool or None, got {fsdp_fp8_all_gather!r}")
    if isinstance(recipe, (str, Path)):
        recipe = FP8Recipe.from_file(recipe)  # fail now, not at prepare time
    _recipe = recipe
    _fsdp_fp8_all_gather = fsdp_fp8_all_gather
    if _originals:
        return
    from accelerate import Accelerator

    for name in _PATCHED:
        _originals[name] = Accelerator.__dict__[name]
    Accelerator.__init__ = _make_init(_originals["__init__"])
    Accelerator.fp8_backend = property(_make_fp8_backend(_originals["fp8_backend"]))
    Accelerator.prepare = _make_prepare(_originals["prepare"])
    Accelerator.prepare_model = _make_prepare_model(_originals["prepare_model"])
    Accelerator.prepare_optimizer = _make_prepare_optimizer(_originals["prepare_optimizer"])


def disable() -> None:
    """Undo `enable()`: Accelerate's own FP8 backends again. Models already prepared stay converted
    and attached (their optimizers keep updating the scales)."""
    global _recipe, _fsdp_fp8_all_gather
    if not _originals:
        return
    from accelerate import Accelerator

    for name, original in _originals.items():
        setattr(Accelerator, name, original)
    _originals.clear()
    _recipe = None
    _fsdp_fp8_all_gather = None


def is_enabled() -> bool:
    return bool(_originals)


def resolve_recipe() -> FP8Recipe:
    """The recipe `prepare` converts with: enable(recipe=...), else $HF_FP8_RECIPE, else the default."""
    if _recipe is not None:
        return _recipe
    path = os.environ.get(ENV_RECIPE)
    if path:
        return FP8Recipe.from_file(path)
    return FP8Recipe()


def fsdp_fp8_all_gather_wanted(accelerator) -> bool:
    """Whether `prepare` gives this accelerator's FP8 weights the FP8 all-gather: asked for (enable()
    or $HF_FP8_FSDP_FP8_ALL_GATHER) and the accelerator runs FSDP2."""
    wanted = _fsdp_fp8_all_gather
    if wanted is None:
        value = os.environ.get(ENV_FSDP_FP8_ALL_GATHER, "0").strip().lower()
        if value not in ("0", "1", "true", "false", "yes", "no", "on", "off", ""):
            raise ValueError(f"{ENV_FSDP_FP8_ALL_GATHER}={value!r}: expected 1/0 (true/false)")
        wanted = value in ("1", "true", "yes", "on")
    return wanted and _runs_fsdp(accelerator) and bool(getattr(accelerator, "is_fsdp2", False))


def _runs_fsdp(accelerator) -> bool:
    """Whether `accelerator` shards the model with FSDP (1 or 2)."""
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def uses_hf_fp8(accelerator) -> bool:
    """Whether `accelerator` trains in FP8 with hf_fp8 (enabled, mixed precision fp8, no explicit
    Accelerate FP8 backend)."""
    return is_enabled() and bool(accelerator.__dict__.get("fp8_enabled")) and _explicit_backend(accelerator) is None


def reports(accelerator) -> list[FP8Report]:
    """The FP8Report of every model `accelerator.prepare` converted, in order."""
    return [report for _, report, _ in accelerator.__dict__.get(_MODELS, [])]


def _auto_enable() -> None:
    """What `import hf_fp8` calls: enable() when Accelerate is installed, unless HF_FP8_ACCELERATE=0."""
    if os.environ.get(ENV_AUTO, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        return
    if not _originals:
        enable()


# ------------------------------------------------------------------------------------ selection


_FP8_HANDLER_NAMES = ("AORecipeKwargs", "TERecipeKwargs", "MSAMPRecipeKwargs", "FP8RecipeKwargs")


def _explicit_from_handlers(handlers) -> str | None:
    for h in handlers or ():
        # Accelerate matches handlers by exact class; so do we.
        if type(h).__name__ in _FP8_HANDLER_NAMES and type(h).__module__.startswith("accelerate"):
            return f"kwargs_handlers has {type(h).__name__}"
    return None


def _explicit_from_env() -> str | None:
    value = os.environ.get("ACCELERATE_FP8_BACKEND", "").strip()
    if value and value.upper() not in ("NO", "HF_FP8"):
        return f"ACCELERATE_FP8_BACKEND={value}"
    return None


def _explicit_backend(accelerator) -> str | None:
    d = accelerator.__dict__
    explicit = d.get(_EXPLICIT)
    if explicit is None and _EXPLICIT not in d:
        # Created before enable(): its kwargs handlers are unknown, only the env can tell.
        explicit = _explicit_from_env()
    if explicit is None:
        plugin = getattr(d.get("state"), "deepspeed_plugin", None)
        if plugin is not None and getattr(plugin, "enable_msamp", False):
            explicit = "DeepSpeed plugin has enable_msamp"
    return explicit


# -------------------------------------------------------------------------------------- patches


def _make_init(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        try:
            handlers = signature.bind(self, *args, **kwargs).arguments.get("kwargs_handlers")
        except TypeError:
            handlers = None  # let Accelerate raise its own error
        self.__dict__[_EXPLICIT] = _explicit_from_handlers(handlers) or _explicit_from_env()
        original(self, *args, **kwargs)

    return __init__


def _make_fp8_backend(original_property: property):
    getter = original_property.fget

    @functools.wraps(getter)
    def fp8_backend(self):
        if uses_hf_fp8(self):
            return HF_FP8_BACKEND
        return getter(self)

    return fp8_backend


def _make_prepare(original):
    @functools.wraps(original)
    def prepare(self, *args, device_placement=None):
        if not uses_hf_fp8(self):
            _note_not_selected(self)
            return original(self, *args, device_placement=device_placement)
        _warn_untested(self)
        for obj in args:
            if isinstance(obj, nn.Module):
                _convert(self, obj)
        for obj in args:
            if isinstance(obj, torch.optim.Optimizer):
                _swap_optimizer_params(self, obj)
        result = original(self, *args, device_placement=device_placement)
        _attach_all(self)
        return result

    return prepare


def _make_prepare_model(original):
    @functools.wraps(original)
    def prepare_model(self, model, *args, **kwargs):
        if uses_hf_fp8(self):
            _convert(self, model)
        result = original(self, model, *args, **kwargs)
        if uses_hf_fp8(self):
            _attach_all(self)
        return result

    return prepare_model


def _make_prepare_optimizer(original):
    @functools.wraps(original)
    def prepare_optimizer(self, optimizer, *args, **kwargs):
        if uses_hf_fp8(self):
            _swap_optimizer_params(self, optimizer)
        result = original(self, optimizer, *args, **kwargs)
        if uses_hf_fp8(self):
            _attach_all(self)
        return result

    return prepare_optimizer


# ------------------------------------------------------------------------------------ the work


def _unwrap(model: nn.Module) -> nn.Module:
    from accelerate.utils import extract_model_from_parallel

    return without_compile_wrapper(extract_model_from_parallel(model, keep_fp32_wrapper=False))


def _convert(accelerator, model: nn.Module) -> None:
    raw = _unwrap(model)
    models = accelerator.__dict__.setdefault(_MODELS, [])
    if any(m is raw for m, _, _ in models):
        return
    recipe = resolve_recipe()
    all_gather_fp8 = fsdp_fp8_all_gather_wanted(accelerator)
    note = ""
    if _runs_fsdp(accelerator) and not all_gather_fp8 and recipe.cast_weights_once:
        # Kept for backward, the weights' FP8 copies would be of the unsharded weights, in every layer.
        recipe = recipe.replace(cast_weights_once=False)
        note = "; cast_weights_once off under FSDP (no FP8 all-gather)"
    # Idempotent: layers the user converted already are kept (and reported as FP8). Raises if no
    # layer can run in FP8, so there is no silent BF16 run.
    report = convert_model(raw, recipe)
    # update_scales keeps the FP8 buffers identical across ranks; DDP's broadcast would re-send them
    # and, between micro-batches outside no_sync, drop this rank's amaxes.
    ddp_ignore_fp8_buffers(raw)
    if all_gather_fp8:
        n = _enable_fp8_all_gather(accelerator, raw)
        note = f"; FSDP2 all-gathers {n} FP8 weights in FP8 with their delayed scales"
    models.append((raw, report, recipe))
    raw.hf_fp8_report = report
    if accelerator.is_local_main_process:
        print(
            f"hf_fp8: Accelerator.prepare converted {type(raw).__name__} to FP8 "
            f"(Accelerate's own FP8 backends bypassed; non-FP8 ops under bf16 autocast{note})\n{report}",
            flush=True,
        )


def _enable_fp8_all_gather(accelerator, raw: nn.Module) -> int:
    """Wrap raw's FP8 weights for the FP8 all-gather (before Accelerate shards it) and remember which
    Parameter replaced which, for the optimizers. Returns how many weights were wrapped."""
    before = dict(raw.named_parameters())
    enable_fp8_all_gather(raw)
    swaps = accelerator.__dict__.setdefault(_SWAPS, {})
    n = 0
    for name, p in raw.named_parameters():
        old = before.get(name)
        if old is not None and old is not p:
            swaps[id(old)] = (old, p)  # holds `old`, so its id cannot be reused meanwhile
            n += 1
    return n


def _swap_optimizer_params(accelerator, optimizer) -> None:
    """Put the FP8 all-gather Parameters in place of the ones they replaced in `optimizer` (its
    param groups and any state), so the optimizer steps the weights the model now uses."""
    swaps = accelerator.__dict__.get(_SWAPS)
    if not swaps:
        return
    opt = getattr(optimizer, "optimizer", optimizer)
    for group in opt.param_groups:
        group["params"] = [swaps[id(p)][1] if id(p) in swaps else p for p in group["params"]]
    for old, new in list(swaps.values()):
        if old in opt.state:
            opt.state[new] = opt.state.pop(old)


def _is_attached(model: nn.Module, optimizer) -> bool:
    handle = getattr(optimizer, "_hf_fp8_handles", {}).get(id(model))
    return handle is not None and handle.id in optimizer._optimizer_step_post_hooks


def _attach_all(accelerator) -> None:
    """Attach every converted model to the (underlying) optimizer that holds its parameters,
    once: the first such optimizer in preparation order."""
    optimizers = [getattr(o, "optimizer", o) for o in accelerator._optimizers]
    optimizers = [o for o in optimizers if isinstance(o, torch.optim.Optimizer)]
    for model, report, _ in accelerator.__dict__.get(_MODELS, []):
        param_ids = {id(p) for p in model.parameters()}
        holding = [o for o in optimizers if any(id(p) in param_ids for g in o.param_groups for p in g["params"])]
        if not holding or getattr(model, "_hf_fp8_accelerate_attached", False):
            continue
        if not any(_is_attached(model, o) for o in holding):
            attach(model, holding[0])
        model._hf_fp8_accelerate_attached = True
        optimized = {id(p) for o in holding for g in o.param_groups for p in g["params"]}
        missing = [
            name
            for name in report.converted
            for pname, p in model.get_submodule(name).named_parameters(recurse=False)
            if pname == "weight" and p.requires_grad and id(p) not in optimized
        ]
        if missing:
            warnings.warn(
                f"hf_fp8: {len(missing)} FP8 weight(s) are not in any prepared optimizer and will not train: "
                f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}",
                RuntimeWarning,
                stacklevel=4,
            )


def _warn_untested(accelerator) -> None:
    if accelerator.__dict__.get("_hf_fp8_warned_untested"):
        return
    accelerator.__dict__["_hf_fp8_warned_untested"] = True
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        warnings.warn(
            f"hf_fp8 with Accelerate's {kind} is untested (tested: single process and DDP); check that "
            "the FP8 weights train and that fp8_stats(model) shows the scales moving once per step.",
            RuntimeWarning,
            stacklevel=3,
        )


def _note_not_selected(accelerator) -> None:
    if not is_enabled() or not accelerator.__dict__.get("fp8_enabled") or accelerator.__dict__.get(_NOTED):
        return
    accelerator.__dict__[_NOTED] = True
    warnings.warn(
        f"hf_fp8 is enabled but this Accelerator uses Accelerate's own FP8 backend "
        f"({_explicit_backend(accelerator)}): hf_fp8 does not convert the model.",
        RuntimeWarning,
        stacklevel=3,
    )
