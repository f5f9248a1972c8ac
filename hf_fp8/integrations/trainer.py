"""FP8TrainerCallback: hf_fp8 in an existing transformers `Trainer` script with one line.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[hf_fp8.FP8TrainerCallback()])

Events used (transformers' Trainer):
  on_init_end       (in Trainer.__init__, before the optimizer exists) convert the model in place,
                    apply the attention stability mode. Conversion keeps every Parameter object, so
                    an optimizer created earlier (the `optimizers=` argument) trains the same weights.
                    A callback added later with `trainer.add_callback` converts in on_train_begin.
  on_train_begin    print the coverage report (main process); on `resume_from_checkpoint`, load the
                    checkpoint's fp8_state.safetensors (scales, amax histories) into the model.
  on_step_begin     on a stats step: start `collect_fp8_stats` (hooks for this step only).
  on_pre_optimizer_step  stop the stats step (after the backward of every micro-batch).
  on_optimizer_step `update_scales(model)`, then the anomaly check of a stats step.
  on_log            add the FP8 health metrics of the last stats step to the logs.

Why `on_optimizer_step` rather than `attach(model, optimizer)`: the Trainer fires it exactly once per
real optimizer step, right after `optimizer.step()`, and never on the accumulation micro-batches
(it sits in the loop's `do_sync_step` branch), whatever wraps the optimizer (accelerate's
AcceleratedOptimizer, DeepSpeed, a user optimizer passed in `optimizers=`) and whether the optimizer
is created before or after conversion. An optimizer step hook would also fire once per step, but
only on the optimizer object it is registered on; with accelerate's fp16 GradScaler a skipped step
never calls the inner optimizer, while on_optimizer_step still fires (update_scales then skips the
inf/NaN amaxes of that step and counts them). If the model was also `attach`ed to the Trainer's
optimizer by hand, the callback does not update (scales would roll twice per step).

Stats steps: with `log_every=None` (default) the optimizer steps the Trainer logs (logging_steps,
logging_first_step); with an int N, every N-th optimizer step. Metrics of a stats step are added to
the next `on_log` logs dict (and the matching `state.log_history` entry), so they reach every
report_to backend: the callback moves itself ahead of the reporting callbacks at init.

Anomaly rule, checked on stats steps only:
  kurtosis: for each site (qkv, mlp_down_input, block_output) the max over layers,
      k_t > kurtosis_factor * median(last `kurtosis_window` logged values of that site),
      checked once at least `kurtosis_min_history` values were logged;
  overflow: the worst overflow fraction of any FP8 tensor (layer x role) > `overflow_threshold`;
  non-finite: an inf/NaN amax skipped a scale update since the last stats step.
Actions (`on_anomaly`, a name or a sequence of names; a warning is always issued):
  "warn"          warn only;
  "raise_margin"  margin + 1 for every FP8 tensor: every scale halves now and after each update;
  "fallback"      the FP8 layers behind the anomaly return to high precision: FP8Linear -> nn.Linear
                  (same Parameters), FP8 attention -> its BF16 fallback; for kurtosis the FP8 layers
                  of the decoder block with the highest value, for overflow the layers that overflowed;
  "stop"          `control.should_training_stop = True`.
Every anomaly is recorded in `callback.anomalies` and logged as `fp8/anomalies` (count so far).
"""

from __future__ import annotations

import collections
import inspect
import os
import statistics
import warnings

from torch import nn
from transformers import TrainerCallback

from ..attention.register import FALLBACK_ATTR, STATE_ATTR
from ..convert import FP8Report, _set_submodule, convert_model
from ..hub import FP8_STATE_NAME, load_fp8_state
from ..linear import FP8Conv1D, FP8Linear
from ..recipe import FP8Recipe
from ..scaling import DelayedScale, delayed_scale_states, update_scales, without_compile_wrapper
from ..stability import apply_attention_stability
from ..stats import FP8StepStats, collect_fp8_stats

__all__ = ["ACTIONS", "FP8Anomaly", "FP8TrainerCallback"]

ACTIONS = ("warn", "raise_margin", "fallback", "stop")
_TRAINER_FRAME_DEPTH = 8


class FP8Anomaly(dict):
    """One detected anomaly: {"step", "kind" ("kurtosis"|"overflow"|"nonfinite"), "metric", "value",
    "limit", "layers" (names the fallback would revert), "actions"}."""


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / torch.compile wrappers, nested either way; the Trainer passes its unwrapped `self.model`, but be safe.
    while True:
        model = without_compile_wrapper(model)
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class FP8TrainerCallback(TrainerCallback):
    """Train a `Trainer`'s model in FP8 with delayed scaling (see the module docstring).

    recipe: FP8Recipe (default FP8Recipe()); for a PEFT model, `*lora_*` is added to its skip list.
    stability: None, "fog-guard" or "preserve" (`apply_attention_stability`); "preserve" is applied
        again on every stats step, with that step's statistics.
    log_every: None (stats on the Trainer's logging steps) or N (every N-th optimizer step).
    on_anomaly: "warn" | "raise_margin" | "fallback" | "stop", or a sequence of them.
    kurtosis_factor, kurtosis_window, kurtosis_min_history, overflow_threshold: the anomaly rule.
    verbose: print the coverage (and stability) report at train start on the main process.
    """

    def __init__(
        self,
        recipe: FP8Recipe | None = None,
        stability: str | None = None,
        log_every: int | None = None,
        *,
        on_anomaly: str | tuple[str, ...] | list[str] = "warn",
        kurtosis_factor: float = 5.0,
        kurtosis_window: int = 8,
        kurtosis_min_history: int = 3,
        overflow_threshold: float = 0.01,
        verbose: bool = True,
    ):
        if recipe is not None and not isinstance(recipe, FP8Recipe):
            raise TypeError(f"FP8TrainerCallback: recipe must be an hf_fp8.FP8Recipe, got {type(recipe).__name__}")
        if stability not in (None, "fog-guard", "preserve"):
            raise ValueError(f"FP8TrainerCallback: stability must be None, 'fog-guard' or 'preserve', got {stability!r}")
        if log_every is not None and (not isinstance(log_every, int) or log_every < 1):
            raise ValueError(f"FP8TrainerCallback: log_every must be None or an int >= 1, got {log_every!r}")
        actions = (on_anomaly,) if isinstance(on_anomaly, str) else tuple(on_anomaly)
        bad = [a for a in actions if a not in ACTIONS]
        if bad or not actions:
            raise ValueError(f"FP8TrainerCallback: on_anomaly must be one or more of {ACTIONS}, got {on_anomaly!r}")
        if kurtosis_window < 1 or kurtosis_min_history < 1 or kurtosis_factor <= 1 or overflow_threshold < 0:
            raise ValueError("FP8TrainerCallback: need kurtosis_window, kurtosis_min_history >= 1, kurtosis_factor > 1, overflow_threshold >= 0")
        self.recipe = recipe
        self.stability = stability
        self.log_every = log_every
        self.actions = actions
        self.kurtosis_factor = kurtosis_factor
        self.kurtosis_window = kurtosis_window
        self.kurtosis_min_history = kurtosis_min_history
        self.overflow_threshold = overflow_threshold
        self.verbose = verbose

        self.report: FP8Report | None = None
        self.stability_report = None
        self.anomalies: list[FP8Anomaly] = []
        self.scale_updates = 0  # update_scales calls made by this callback
        self.last_stats: FP8StepStats | None = None
        self._model: nn.Module | None = None
        self._stats: FP8StepStats | None = None
        self._done_stats: FP8StepStats | None = None
        self._pending_logs: dict[str, float] = {}
        self._kurtosis_history: dict[str, collections.deque] = {}
        self._last_skips = 0.0
        self._printed = False
        self.resumed_fp8_state_from: str | None = None  # checkpoint whose FP8 state on_train_begin loaded

    # -- setup ------------------------------------------------------------------------------------

    def convert(self, model: nn.Module) -> FP8Report:
        """Convert `model` (idempotent; what on_init_end / on_train_begin call)."""
        model = _unwrap(model)
        if self._model is model and self.report is not None:
            return self.report
        from .peft import is_peft_model, peft_recipe

        recipe = peft_recipe(self.recipe) if is_peft_model(model) else (self.recipe or FP8Recipe())
        self.report = convert_model(model, recipe)
        if self.stability is not None:
            self.stability_report = apply_attention_stability(model, self.stability)
        self._model = model
        return self.report

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.convert(model)
        self._move_ahead_of_reporters()

    def _move_ahead_of_reporters(self) -> None:
        """Put this callback first in the Trainer's callback list, so the metrics it adds in on_log
        reach the report_to callbacks (added before user callbacks). The Trainer is not passed to
        callbacks: found as `self` of the Trainer.__init__ frame that fired on_init_end."""
        frame = inspect.currentframe()
        try:
            for _ in range(_TRAINER_FRAME_DEPTH):
                frame = frame.f_back if frame is not None else None
                if frame is None:
                    return
                handler = getattr(frame.f_locals.get("self"), "callback_handler", None)
                callbacks = getattr(handler, "callbacks", None)
                if isinstance(callbacks, list) and any(c is self for c in callbacks):
                    callbacks[:] = [self] + [c for c in callbacks if c is not self]
                    return
        finally:
            del frame

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.convert(model)
        self._load_resumed_fp8_state(args, state)
        if self.verbose and not self._printed and state.is_world_process_zero and self.report is not None:
            print(self.report)
            if self.stability_report is not None:
                print(self.stability_report)
            self._printed = True

    def _resume_checkpoint(self, args, state) -> str | None:
        """The checkpoint `trainer.train(resume_from_checkpoint=...)` resumes from, or None.
        The Trainer does not pass it to callbacks: it is the `resume_from_checkpoint` local of the
        training-loop frame that fired on_train_begin (already resolved from True to a path, and the
        weights, optimizer and TrainerState already loaded from it). Without that frame: on a resumed
        run (state.global_step > 0), args.resume_from_checkpoint or output_dir/checkpoint-<step>."""
        frame = inspect.currentframe()
        try:
            for _ in range(_TRAINER_FRAME_DEPTH):
                frame = frame.f_back if frame is not None else None
                if frame is None:
                    break
                handler = getattr(frame.f_locals.get("self"), "callback_handler", None)
                if "resume_from_checkpoint" in frame.f_locals and any(c is self for c in getattr(handler, "callbacks", ())):
                    path = frame.f_locals["resume_from_checkpoint"]
                    return str(path) if isinstance(path, (str, os.PathLike)) else None
        finally:
            del frame
        if not state.global_step:
            return None
        for path in (args.resume_from_checkpoint, os.path.join(args.output_dir or "", f"checkpoint-{state.global_step}")):
            if isinstance(path, str) and os.path.isdir(path):
                return path
        return None

    def _load_resumed_fp8_state(self, args, state) -> None:
        """On resume_from_checkpoint, load the checkpoint's fp8_state.safetensors (written there by
        save_pretrained) into the converted model, so scales and amax histories continue exactly."""
        if self._model is None or not delayed_scale_states(self._model):
            return
        path = self._resume_checkpoint(args, state)
        if path is None:
            return
        if not os.path.isfile(os.path.join(path, FP8_STATE_NAME)):
            warnings.warn(
                f"hf_fp8: resuming from {path}, which has no {FP8_STATE_NAME}: the FP8 scales and amax histories "
                "restart from scratch (the checkpoint was not written by a converted model's save_pretrained)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        load_fp8_state(self._model, path)
        self.resumed_fp8_state_from = path

    # -- per step ---------------------------------------------------------------------------------

    def _is_stats_step(self, args, state) -> bool:
        step = state.global_step + 1  # the optimizer step about to run
        if self.log_every is not None:
            return step % self.log_every == 0
        if step == 1 and args.logging_first_step:
            return True
        every = getattr(state, "logging_steps", None) or args.logging_steps
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        return strategy == "steps" and every > 0 and step % int(every) == 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self._model is None or self._stats is not None:
            return
        if self._is_stats_step(args, state) and delayed_scale_states(self._model):
            self._stats = collect_fp8_stats(self._model).start()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._finish_stats()

    def _finish_stats(self) -> None:
        """Stop a running stats step; its results wait in `_done_stats` for on_optimizer_step."""
        stats, self._stats = self._stats, None
        if stats is not None:
            stats.stop()
            self._done_stats = stats

    def _attached_by_hand(self, optimizer) -> bool:
        for opt in (optimizer, getattr(optimizer, "optimizer", None)):
            handles = getattr(opt, "_hf_fp8_handles", None) or {}
            handle = handles.get(id(self._model))
            if handle is not None and handle.id in opt._optimizer_step_post_hooks:
                return True
        return False

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._model is None:
            return control
        self._finish_stats()  # normally done in on_pre_optimizer_step
        stats, self._done_stats = self._done_stats, None
        if delayed_scale_states(self._model) and not self._attached_by_hand(optimizer):
            update_scales(self._model)
            self.scale_updates += 1
        if stats is not None:
            step = state.global_step + 1
            self.last_stats = stats
            self._pending_logs = self.health_metrics(stats)
            if self.stability == "preserve":
                apply_attention_stability(self._model, "preserve", stats=stats)
            for anomaly in self.check(stats, step):
                self._act(anomaly, control)
            self._pending_logs["fp8/anomalies"] = float(len(self.anomalies))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending_logs or logs is None:
            return
        logs.update(self._pending_logs)
        # Trainer.log appended a copy of `logs` to the history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending_logs)
        self._pending_logs = {}

    def on_train_end(self, args, state, control, **kwargs):
        self._finish_stats()
        self._done_stats = None

    # -- metrics and anomalies --------------------------------------------------------------------

    @staticmethod
    def health_metrics(stats: FP8StepStats) -> dict[str, float]:
        """stats.flat() plus min/max of the scale and amax of each role kind over all FP8 layers
        (`fp8/scale_min/linear/input`, `fp8/amax_max/linear/grad_output`, ...; roles not yet
        initialized are left out)."""
        out = dict(stats.flat())
        ranges: dict[str, float] = {}
        for roles in stats.layers.values():
            kind = "attention" if "query" in roles else "linear"
            for role, fields in roles.items():
                if not fields.get("initialized"):
                    continue
                for what in ("scale", "amax"):
                    v = float(fields[what])
                    lo, hi = f"fp8/{what}_min/{kind}/{role}", f"fp8/{what}_max/{kind}/{role}"
                    ranges[lo] = min(ranges.get(lo, v), v)
                    ranges[hi] = max(ranges.get(hi, v), v)
        out.update(ranges)
        return out

    def check(self, stats: FP8StepStats, step: int) -> list[FP8Anomaly]:
        """Apply the anomaly rule (module docstring) to one stats step; updates the kurtosis history."""
        found: list[FP8Anomaly] = []
        for site, values in (stats.kurtosis or {}).items():
            value = float(values["max"])
            history = self._kurtosis_history.setdefault(site, collections.deque(maxlen=self.kurtosis_window))
            if len(history) >= self.kurtosis_min_history:
                limit = self.kurtosis_factor * statistics.median(history)
                if value > limit:
                    block = max(values["per_layer"], key=values["per_layer"].get)
                    found.append(FP8Anomaly(step=step, kind="kurtosis", metric=f"fp8/kurtosis/{site}_max",
                                            value=value, limit=limit, layers=self._fp8_layers_under(block)))
            history.append(value)
        overflowing = []
        worst = 0.0
        for layer, roles in stats.layers.items():
            for role, fields in roles.items():
                frac = fields.get("overflow_fraction", 0.0)
                worst = max(worst, frac)
                if frac > self.overflow_threshold and layer not in overflowing:
                    overflowing.append(layer)
        if overflowing:
            found.append(FP8Anomaly(step=step, kind="overflow", metric="fp8/overflow_max", value=worst,
                                    limit=self.overflow_threshold, layers=overflowing))
        skips = stats.flat().get("fp8/nonfinite_skips", 0.0)
        if skips > self._last_skips:
            bad = [n for n, roles in stats.layers.items() if any(f["nonfinite_skips"] for f in roles.values())]
            found.append(FP8Anomaly(step=step, kind="nonfinite", metric="fp8/nonfinite_skips", value=skips,
                                    limit=self._last_skips, layers=bad))
        self._last_skips = skips
        return found

    def _fp8_layers_under(self, prefix: str) -> list[str]:
        return [name for name, _ in delayed_scale_states(self._model) if name == prefix or name.startswith(prefix + ".")]

    def _act(self, anomaly: FP8Anomaly, control) -> None:
        anomaly["actions"] = list(self.actions)
        self.anomalies.append(anomaly)
        warnings.warn(
            f"hf_fp8: FP8 {anomaly['kind']} anomaly at step {anomaly['step']}: {anomaly['metric']} = "
            f"{anomaly['value']:.4g} > {anomaly['limit']:.4g} (layers: {', '.join(anomaly['layers'][:6]) or '-'}"
            f"{' ...' if len(anomaly['layers']) > 6 else ''}); actions: {', '.join(self.actions)}",
            RuntimeWarning,
            stacklevel=2,
        )
        if "raise_margin" in self.actions:
            raise_margin(self._model)
        if "fallback" in self.actions:
            anomaly["reverted"] = fallback_layers(self._model, anomaly["layers"], reason=f"{anomaly['kind']} anomaly at step {anomaly['step']}")
        if "stop" in self.actions:
            control.should_training_stop = True


def raise_margin(model: nn.Module, by: int = 1) -> None:
    """Margin + `by` for every FP8 tensor of `model`: each scale is divided by 2**by at once, and every
    later update computes scale = fp8_max / amax / 2**margin with the new margin."""
    for _, state in delayed_scale_states(model):
        state.set_margin(state.margin + by)
        state.scale.div_(2.0**by)
        state.sync_inverse_scale()


def fallback_layers(model: nn.Module, names: list[str], reason: str = "hf_fp8 fallback") -> list[str]:
    """Return the named FP8 layers of `model` to high precision: an FP8Linear/FP8Conv1D becomes
    nn.Linear/Conv1D with the same Parameters (an optimizer keeps training them); an FP8 attention
    module gets its BF16 fallback (`fp8_attention_fallback = reason`). Returns what was changed."""
    changed = []
    for name in names:
        module = model if name == "<root>" else model.get_submodule(name)
        if isinstance(module, FP8Linear):
            _set_submodule(model, name, module.to_linear())
        elif isinstance(module, FP8Conv1D):
            _set_submodule(model, name, module.to_conv1d())
        elif isinstance(getattr(module, STATE_ATTR, None), DelayedScale):
            setattr(module, FALLBACK_ATTR, reason)
        else:
            continue
        changed.append(name)
    return changed
