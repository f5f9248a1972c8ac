"""Delayed per-tensor scaling: the amax history and scale of every FP8 operand, and the update rule.

One training step with delayed scaling:
  forward/backward: each FP8 operand is cast with its *current* scale; its amax is max-reduced into
                    `pending_amax` (several micro-batches -> one max);
  optimizer step:   `update_scales(model)` pushes each pending amax into its history (one all-reduce
                    MAX for the whole model under torch.distributed), recomputes
                    scale = fp8_max / reduce(history) / 2**margin, and clears the pending amaxes.
So scales change exactly once per optimizer step. Scale convention (torchao's): fp8 = hp * scale.
"""

from __future__ import annotations

import itertools
import sys
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .recipe import FP8Recipe

# `pending_amax` holds this until a forward/backward records a real amax (amaxes are >= 0), so
# update_scales can tell "no pass ran through this tensor" apart from "the tensor was all zeros".
_NOT_RECORDED = -1.0
# Smallest amax a scale is computed from; below it the fp32 scale would overflow to inf.
_MIN_AMAX = 1e-30


class DelayedScale(nn.Module):
    """Delayed-scaling state for the FP8 operands ("roles") of one layer.

    Buffers (all in `state_dict`, so checkpoints carry them), R = number of roles, L = history length:
      amax_history  (R, L) float32  column 0 is the newest optimizer step
      scale         (R,)   float32  the scale every cast uses until the next update
      inv_scale_<role>  ()  float32   1 / scale[role], what the FP8 GEMMs multiply by (not saved: derived)
      pending_amax  (R,)   float32  max amax recorded since the last update (-1: none recorded)
      initialized   (R,)   bool     False until a first finite, non-zero amax was reduced into `scale`
      nonfinite_skips (R,) int64    how many updates were skipped because the amax was inf/NaN
    Before a role is initialized, casts scale from the tensor's own amax (dynamic scaling), so the
    first step is as accurate as a dynamically scaled one instead of using a placeholder scale.
    """

    def __init__(self, roles: tuple[str, ...], dtypes: tuple[torch.dtype, ...], recipe: FP8Recipe, device=None):
        super().__init__()
        if len(roles) != len(dtypes):
            raise ValueError(f"DelayedScale: {len(roles)} roles but {len(dtypes)} dtypes")
        self.roles = tuple(roles)
        self.dtypes = tuple(dtypes)
        self.amax_compute_algo = recipe.amax_compute_algo
        self.margin = recipe.margin
        self.on_nonfinite_amax = recipe.on_nonfinite_amax
        self._initialized_on_host: set[int] = set()
        # Known on the host (no device read in the step) that every role has a delayed scale: set
        # by update_scales from its copy of `initialized` (on CUDA an async copy read one update
        # later). Tells the first steps from the steady state. A bool that changes once (torch.compile
        # specializes on it), reset when a state is loaded.
        self.updated_on_host = False
        r, length = len(roles), recipe.amax_history_len
        self.register_buffer("amax_history", torch.zeros(r, length, device=device))
        self.register_buffer("scale", torch.ones(r, device=device))
        self.register_buffer("pending_amax", torch.full((r,), _NOT_RECORDED, device=device))
        self.register_buffer("initialized", torch.zeros(r, dtype=torch.bool, device=device))
        self.register_buffer("nonfinite_skips", torch.zeros(r, dtype=torch.int64, device=device))
        # fp8_max / 2**margin per role; derived from the margin, so not saved.
        self.register_buffer("scale_numerator", torch.empty(r, device=device), persistent=False)
        # 1 / scale, kept beside it so a compiled step does not launch one reciprocal kernel per
        # GEMM operand: under torch.compile each was a kernel of its own (18 per Llama layer, forward
        # and backward), a cost of host time in small micro-batches. One 0-dim tensor per role: a
        # GEMM's scale must be an allocation of its own (cuBLASLt refuses an FP8 scale pointer inside
        # a vector, and inductor's _scaled_mm lowering a view with an offset). Derived, so not saved.
        self.inv_scale_names = tuple(f"inv_scale_{role}" for role in self.roles)
        for name in self.inv_scale_names:
            self.register_buffer(name, torch.ones((), device=device), persistent=False)
        self.set_margin(recipe.margin)

    def index(self, role: str) -> int:
        return self.roles.index(role)

    def set_margin(self, margin: int) -> None:
        """Later updates compute scale = fp8_max / amax / 2**margin (the current scale is unchanged)."""
        self.margin = int(margin)
        with torch.no_grad():
            for i, dt in enumerate(self.dtypes):
                self.scale_numerator[i] = torch.finfo(dt).max / 2.0**self.margin

    def inverse(self, i: int) -> torch.Tensor:
        """Role i's stored 1 / scale (a 0-dim buffer)."""
        return getattr(self, self.inv_scale_names[i])

    @property
    def inv_scale(self) -> torch.Tensor:
        """(R,) copy of the stored inverse scales, for inspection."""
        return torch.stack([self.inverse(i) for i in range(len(self.roles))])

    def sync_inverse_scale(self) -> None:
        """Recompute the stored inverse scales from `scale`. load_state_dict, hub.load_fp8_state and
        raise_margin do it (update_scales writes them itself); code that writes `scale` itself must
        call this after."""
        with torch.no_grad():
            inverses = [self.inverse(i) for i in range(len(self.roles))]
            torch._foreach_copy_(inverses, list(self.scale.reciprocal().unbind()))

    def initialized_on_host(self, i: int) -> bool:
        """Whether role i has a delayed scale, for host-side decisions (FSDP2 FP8 all-gather). Read
        from the device until it is True, then remembered: a role never becomes uninitialized
        again except by loading a state, which forgets (see `forget_host_flags`). So on CUDA the
        device->host read happens only during the first step(s), not every step."""
        if i in self._initialized_on_host:
            return True
        if bool(self.initialized[i]):
            self._initialized_on_host.add(i)
            return True
        return False

    def forget_host_flags(self) -> None:
        self._initialized_on_host = set()
        self.updated_on_host = False

    def _load_from_state_dict(self, *args, **kwargs):
        self.forget_host_flags()
        super()._load_from_state_dict(*args, **kwargs)
        self.sync_inverse_scale()

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` cast every floating buffer; amax histories and
        # scales must stay float32 (a bf16 scale has 8 bits of mantissa, a bf16 history rounds
        # amaxes). Follow device moves, undo dtype casts.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, new in self._buffers.items():
            old = before[name]
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        names = ", ".join(f"{r}:{str(d).removeprefix('torch.float8_')}" for r, d in zip(self.roles, self.dtypes))
        return f"roles=({names}), history={self.amax_history.shape[1]}, algo={self.amax_compute_algo}, margin={self.margin}"


def in_memory_order(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous permuted view when one exists (else x itself), for work that does not care
    about element order, such as a max.

    Attention's (B, H, S, D) query/key/value are transposed views of (B, S, H, D) projections.
    Reduced in logical order under torch.compile, they were read with a stride: 82 us for the amax
    of Q at 2 x 8192 tokens on an H200. In memory order inductor fuses that amax with Q's cast into
    one 38 us kernel."""
    if x.is_contiguous():
        return x
    view = x.permute(memory_order(x))
    return view if view.is_contiguous() else x


def memory_order(x: torch.Tensor) -> list[int]:
    """x's dims from the largest stride to the smallest (its memory order when x is dense); dims of
    equal stride keep their order. An insertion sort written out, not sorted(key=...): under
    torch.compile with dynamic shapes the strides are symbolic, and dynamo breaks the graph on a
    sort with symbolic keys while it traces these comparisons (as guards)."""
    order: list[int] = []
    for d in range(x.dim()):
        i = len(order)
        while i > 0 and x.stride(order[i - 1]) < x.stride(d):
            i -= 1
        order.insert(i, d)
    return order


# amax_of reduces the last dim in pieces of this many elements when it divides the dim (see there).
AMAX_CHUNK = 1024


def amax_of(x: torch.Tensor) -> torch.Tensor:
    """max(|x|) as a float32 scalar (a NaN anywhere in x gives NaN).

    Reduced over pieces of the last dim in memory order (AMAX_CHUNK elements where that divides a
    longer dim, else whole rows), then over the pieces: a max is a max either way, but under
    torch.compile the order decides the kernels.
    - Per row or piece, the amax iterates like the FP8 cast that reads the same tensor, so inductor
      computes both in one kernel (one read of the input). A whole-tensor reduction is split into
      chunks that match no elementwise loop and costs a second full read: on an H200, SiLU(gate) * up
      with its amax and E4M3 cast at 16384 x 8192 took 581 us that way and 337 us per row.
    - Pieces of 1024 rather than whole rows: a row of 4096-14336 elements makes inductor loop over it
      inside each program (a `triton_red` kernel, 2.0-2.9 TB/s for these casts on the H200), 1024
      fit one program without a loop (`triton_per`, 3.2-3.9 TB/s). Measured in training steps
      (RESULTS (36)): 8B slice 0.8-1.0 ms and 1.5B with FP8 attention 2.9 ms less kernel time per
      step, mostly the SwiGLU backward's E5M2 casts (8B 0.76 -> 0.65 ms per layer); pieces of 512 or
      2048 did less. Where the producer reduces whole rows itself (RMSNorm), its kernel splits in
      two, which costs back ~0.1 ms of that per step."""
    x = in_memory_order(x.detach()).abs()
    if x.dim() >= 2:
        n = x.shape[-1]
        if n > AMAX_CHUNK and n % AMAX_CHUNK == 0:
            x = x.unflatten(-1, (n // AMAX_CHUNK, AMAX_CHUNK))  # (..., n) -> (..., n / 1024, 1024)
        x = x.amax(dim=-1)
    return x.amax().float()


def cast_scale(state: DelayedScale, i: int, amax_now: torch.Tensor) -> torch.Tensor:
    """The scale role `i` casts with: the delayed scale, or before the first update the dynamic
    scale of the tensor at hand (`amax_now`). `inverse_scale` gives its reciprocal.

    Once the host knows that all of the state's roles have a delayed scale (`updated_on_host`, set
    by `update_scales` without a sync in the step), it is `state.scale[i]` alone: the cast then does
    not depend on the tensor's own amax, so it can run in the same pass as the amax (torch.compile
    fuses them) instead of waiting for a reduction over the whole tensor, which is what makes
    delayed scaling faster than dynamic scaling. Before that: branch-free `where`, no host sync."""
    if state.updated_on_host:
        return state.scale[i]
    dynamic = state.scale_numerator[i] / amax_now.clamp(min=_MIN_AMAX)
    return torch.where(state.initialized[i], state.scale[i], dynamic)


def inverse_scale(state: DelayedScale, i: int, scale: torch.Tensor) -> torch.Tensor:
    """1 / `scale`, where `scale` is what `cast_scale(state, i, ...)` returned: the stored inverse
    in the steady state (no kernel), else computed."""
    return state.inverse(i) if state.updated_on_host else scale.reciprocal()


def record_amax(state: DelayedScale, i: int, amax_now: torch.Tensor) -> None:
    """Max-reduce `amax_now` into role i's pending amax (micro-batches of one step -> one amax).
    torch.maximum propagates NaN, so one non-finite micro-batch marks the whole step non-finite."""
    pending = state.pending_amax[i]
    pending.copy_(torch.maximum(pending, amax_now))


def record_amaxes(state: DelayedScale, amaxes: dict[int, torch.Tensor]) -> None:
    """`record_amax` for several roles at once (role index -> amax), as one update of
    `pending_amax`: under torch.compile one kernel per state instead of one or two per role."""
    if len(amaxes) == 1:  # eager: two launches instead of three
        ((i, amax),) = amaxes.items()
        record_amax(state, i, amax)
        return
    pending = state.pending_amax
    # A role not given contributes its own pending value, which the max leaves as it is.
    new = torch.stack([amaxes[i] if i in amaxes else pending[i] for i in range(len(state.roles))])
    pending.copy_(torch.maximum(pending, new))


def scale_buffers(model: nn.Module, *, persistent_only: bool = False, remove_duplicate: bool = True):
    """Yield (state_dict-style name, tensor) of every DelayedScale buffer of `model`: what checkpoints
    save (`persistent_only`), DDP must not broadcast, and save_pretrained leaves out.
    `remove_duplicate=False` also yields every alias of a module registered under several names."""
    for name, module in model.named_modules(remove_duplicate=remove_duplicate):
        if not isinstance(module, DelayedScale):
            continue
        for buffer, tensor in module._buffers.items():
            if tensor is None or (persistent_only and buffer in module._non_persistent_buffers_set):
                continue
            yield (f"{name}.{buffer}" if name else buffer), tensor


def without_compile_wrapper(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's wrapper, else `model`. `torch.compile(model)` returns an
    OptimizedModule holding `model` as `_orig_mod`: its module names start with "_orig_mod." and its
    type has no save_pretrained. hf_fp8's public functions work on the inner model, so that layer
    names (reports, stats, checkpoints) and the save hooks are the model's own, compiled or not."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    while eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        model = model._orig_mod
    return model


def delayed_scale_states(model: nn.Module) -> list[tuple[str, DelayedScale]]:
    """(name of the FP8 layer owning the state, state) for every DelayedScale in `model` (inside a
    torch.compile wrapper if any); the model itself is named "<root>"."""
    model = without_compile_wrapper(model)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, DelayedScale):
            owner = name.rpartition(".")[0] if "." in name else "<root>"
            out.append((owner, m))
    return out


def update_scales(model: nn.Module) -> None:
    """Roll every amax history of `model` once and recompute every scale. Call once per optimizer
    step, after the step (or use `attach(model, optimizer)`).

    - Tensors no forward/backward went through since the last update keep history and scale.
    - A non-finite amax is never pushed into the history: that tensor's update is skipped and
      counted in `nonfinite_skips` (visible in `fp8_stats`); the recipe's `on_nonfinite_amax`
      decides whether this also warns (default) or raises.
    - Under torch.distributed all pending amaxes go through one all-reduce (MAX), so every rank
      ends the step with identical histories and scales.
    - Raises RuntimeError if no FP8 forward pass ran since the last update (nothing to update).

    On CUDA the checks cost no host sync after the first call: their results are copied to the
    host asynchronously and read at the next call, so a "warn" comes one optimizer step late (and
    the "nothing recorded" error too). "raise" and CPU tensors check at once.
    """
    with torch.no_grad():
        _update_scales(without_compile_wrapper(model), require_recorded=True)


# Per model, what an update left for the next one to read (keys below): the async host copies of its
# checks and of which states were initialized, each with the CUDA event that marks the copy done. Kept
# beside the model, not in it: a CUDA event can be neither deep-copied nor pickled, and a copy of the
# model (an EMA twin, `torch.save(model)`) has no pending copies of its own, so it starts over.
_deferred: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_DEFERRED_CHECK = "check"  # the device-side check of the last update, read at the next one


def _update_scales(model: nn.Module, require_recorded: bool) -> None:
    states = delayed_scale_states(model)
    if not states:
        raise ValueError(
            "update_scales: the model has no FP8 layers (no DelayedScale state found). "
            "Call hf_fp8.convert_model(model) first."
        )
    plan = _plan_for(model, states)
    # (N,) all roles of all layers, one flat vector -> one collective.
    torch._foreach_copy_(plan.pending.views, plan.pending.buffers)
    pending = plan.pending.flat
    # NaN under a MAX all-reduce is backend-defined; +inf is not, and is just as non-finite.
    pending = torch.nan_to_num(pending, nan=float("inf"), posinf=float("inf"), neginf=float("inf"))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(pending, op=dist.ReduceOp.MAX)
    recorded = pending >= 0
    nonfinite = recorded & ~torch.isfinite(pending)
    _check(model, plan, recorded, nonfinite, require_recorded)

    valid = recorded & ~nonfinite
    for group in plan.groups:
        _update_group(group, pending[group.start : group.end], valid[group.start : group.end],
                      nonfinite[group.start : group.end])  # fmt: skip
    # Every pending amax back to "none recorded": one copy from a constant vector.
    torch._foreach_copy_(plan.pending.buffers, plan.cleared_views)
    _note_initialized(model, plan.modules)


_DEFERRED_PLAN = "plan"  # the _UpdatePlan of the last update, reused while it matches the model


@dataclass
class _Gathered:
    """One buffer of every state of a group (or of the model) and a flat work tensor holding them all:
    `flat` is their concatenation, `views[k]` the part of `flat` that is `buffers[k]`. Update copies
    buffers -> views (gather) and views -> buffers (write back) with foreach copies, so it creates no
    views per call."""

    buffers: list[torch.Tensor]
    flat: torch.Tensor
    views: list[torch.Tensor]

    @classmethod
    def of(cls, buffers: list[torch.Tensor]) -> "_Gathered":
        flat = torch.cat(buffers)
        return cls(buffers, flat, list(torch.split(flat, [len(b) for b in buffers])))


@dataclass
class _GroupPlan:
    """States sharing history length and algo: a contiguous run [start, end) of the model's roles,
    updated with one batch of kernels."""

    modules: list[DelayedScale]
    algo: str
    start: int
    end: int
    history: _Gathered  # (G, L)
    scale: _Gathered  # (G,)
    initialized: _Gathered
    numerator: _Gathered
    skips: _Gathered
    inverses: list[torch.Tensor]  # every role's 0-dim inverse-scale buffer, in order
    inverse_flat: torch.Tensor  # (G,) work tensor for 1 / scale
    inverse_views: list[torch.Tensor]  # its 0-dim elements


@dataclass
class _UpdatePlan:
    """What an update of one model reads and writes, gathered once and reused while the model holds
    the same scale states with the same buffers. Finding the buffers and splitting work tensors into
    per-state views (~1,000 views for a 1.5B Llama with FP8 attention) was ~40% of an update's host
    time on CUDA (benchmarks/RESULTS.md (33)); with the plan an update creates none."""

    found: list[tuple[str, DelayedScale]]  # as delayed_scale_states found them: the key
    layout: list[tuple]  # per state: its buffers and update settings when the plan was made
    modules: list[DelayedScale]  # update order: grouped by (history length, algo)
    names: list[str]  # "layer:role" for every role, in update order
    pending: _Gathered
    cleared_views: list[torch.Tensor]  # views of a constant _NOT_RECORDED vector, one per state
    groups: list[_GroupPlan]

    def matches(self, states: list[tuple[str, DelayedScale]]) -> bool:
        """The same states under the same names, with the same buffer objects (`.to()`, a reassigned
        buffer or a new layer make a new plan) and update settings."""
        return (
            len(states) == len(self.found)
            and all(n == fn and m is fm for (n, m), (fn, fm) in zip(states, self.found))
            and all(_same_layout(_layout(m), layout) for m, layout in zip(self.modules, self.layout))
        )


def _layout(m: DelayedScale) -> tuple[str, tuple[torch.Tensor, ...]]:
    return m.amax_compute_algo, tuple(m._buffers.values())


def _same_layout(a: tuple, b: tuple) -> bool:
    # Buffers by identity: `.to()` or an assignment replaces the object (the plan keeps the old one
    # alive, so its id cannot be reused); values are gathered at every update anyway.
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(x is y for x, y in zip(a[1], b[1]))


def _plan_for(model: nn.Module, states: list[tuple[str, DelayedScale]]) -> _UpdatePlan:
    deferred = _deferred.setdefault(model, {})
    plan = deferred.get(_DEFERRED_PLAN)
    if plan is None or not plan.matches(states):
        plan = deferred[_DEFERRED_PLAN] = _new_plan(states)
    return plan


def _new_plan(found: list[tuple[str, DelayedScale]]) -> _UpdatePlan:
    # Layers converted with one recipe share history length and algo: order states so each such
    # group is a contiguous run of the flat vectors, updated with one batch of kernels.
    ordered = sorted(found, key=lambda s: (s[1].amax_history.shape[1], s[1].amax_compute_algo))
    modules = [m for _, m in ordered]
    pending = _Gathered.of([m.pending_amax for m in modules])
    cleared = torch.full_like(pending.flat, _NOT_RECORDED)
    groups, start = [], 0
    for (_, algo), run in itertools.groupby(modules, key=lambda m: (m.amax_history.shape[1], m.amax_compute_algo)):
        run = list(run)
        end = start + sum(len(m.roles) for m in run)
        inverse_flat = torch.empty(end - start, device=pending.flat.device)
        groups.append(_GroupPlan(
            run, algo, start, end,
            *(_Gathered.of([getattr(m, name) for m in run])
              for name in ("amax_history", "scale", "initialized", "scale_numerator", "nonfinite_skips")),
            inverses=[m.inverse(i) for m in run for i in range(len(m.roles))],
            inverse_flat=inverse_flat,
            inverse_views=list(inverse_flat.unbind()),
        ))  # fmt: skip
        start = end
    return _UpdatePlan(
        found=list(found),
        layout=[_layout(m) for m in modules],
        modules=modules,
        names=[f"{name}:{role}" for name, m in ordered for role in m.roles],
        pending=pending,
        cleared_views=list(torch.split(cleared, [len(m.roles) for m in modules])),
        groups=groups,
    )


_DEFERRED_INITIALIZED = "initialized"  # the async host copy of which states were fully initialized


def _note_initialized(model: nn.Module, modules: list[DelayedScale]) -> None:
    """Set `updated_on_host` on each state whose roles are all initialized after this update: at
    once on CPU; on CUDA from an async copy read at the next update (no host sync in the step). A
    step without any forward, or a module no step has used yet, leaves it False, so their first
    casts still scale from their own amax."""
    previous = _deferred.setdefault(model, {}).pop(_DEFERRED_INITIALIZED, None)
    if previous is not None:
        done, prev_modules, flags = previous
        done.synchronize()  # recorded one optimizer step ago: long done, no stall
        for m, ready in zip(prev_modules, flags.tolist()):
            m.updated_on_host = m.updated_on_host or ready
    pending = [m for m in modules if not m.updated_on_host]
    if not pending:
        return
    flags = torch.stack([m.initialized.all() for m in pending])
    if flags.device.type != "cuda":
        for m, ready in zip(pending, flags.tolist()):
            m.updated_on_host = ready
        return
    done = torch.cuda.Event()
    flags = flags.to("cpu", non_blocking=True)
    done.record()
    _deferred[model][_DEFERRED_INITIALIZED] = (done, pending, flags)


def _update_group(group: _GroupPlan, pending, valid, nonfinite) -> None:
    gathered = (group.history, group.scale, group.initialized, group.numerator, group.skips)
    for g in gathered:
        torch._foreach_copy_(g.views, g.buffers)
    history, scale, initialized = group.history.flat, group.scale.flat, group.initialized.flat

    rolled = torch.roll(history, shifts=1, dims=1)
    rolled[:, 0] = pending.clamp(min=0)
    history = torch.where(valid[:, None], rolled, history)
    amax = history.amax(dim=1) if group.algo == "max" else history[:, 0]
    # An all-zero history (e.g. a tensor that was exactly zero) gives no information: keep the scale.
    usable = valid & (amax > 0)
    scale = torch.where(usable, group.numerator.flat / amax.clamp(min=_MIN_AMAX), scale)
    initialized = initialized | usable
    skips = group.skips.flat + nonfinite.to(group.skips.flat.dtype)

    for g, new in ((group.history, history), (group.scale, scale), (group.initialized, initialized), (group.skips, skips)):
        g.flat.copy_(new)
        torch._foreach_copy_(g.buffers, g.views)
    torch.reciprocal(group.scale.flat, out=group.inverse_flat)
    torch._foreach_copy_(group.inverses, group.inverse_views)


@dataclass
class _Check:
    """What update_scales needs on the host to report: whether anything was recorded, whether an
    amax was inf/NaN and where. On CUDA filled by an async copy, ready once `ready` has passed."""

    flags: torch.Tensor  # (2,) bool: any recorded, any non-finite
    nonfinite: torch.Tensor  # (N,) bool per role, in `names` order
    names: list[str]
    policy: str
    require_recorded: bool
    ready: torch.cuda.Event | None = None


def _check(model: nn.Module, plan: _UpdatePlan, recorded, nonfinite, require_recorded: bool) -> None:
    # Layers converted with different recipes: the strictest policy wins.
    policies = {m.on_nonfinite_amax for m in plan.modules}
    policy = next(p for p in ("raise", "warn", "skip") if p in policies)
    names = plan.names
    flags = torch.stack([recorded.any(), nonfinite.any()])
    deferred = _deferred.setdefault(model, {})
    previous = deferred.get(_DEFERRED_CHECK)
    if recorded.device.type != "cuda" or policy == "raise" or previous is None:
        # At once: CPU tensors (no sync to avoid), "raise" (must stop this step), the first call.
        deferred[_DEFERRED_CHECK] = False  # marks "first call done"
        _report(_Check(flags.cpu(), nonfinite.cpu(), names, policy, require_recorded))
        return
    if previous:
        previous.ready.synchronize()  # recorded one optimizer step ago: long done, no stall
        _report(previous, late=True)
    check = _Check(
        flags.to("cpu", non_blocking=True),
        nonfinite.to("cpu", non_blocking=True),
        names,
        policy,
        require_recorded,
        torch.cuda.Event(),
    )
    check.ready.record()
    deferred[_DEFERRED_CHECK] = check


def _report(check: _Check, late: bool = False) -> None:
    any_recorded, any_nonfinite = check.flags.tolist()
    when = "the previous " if late else ""
    if not any_recorded and check.require_recorded:
        raise RuntimeError(
            f"update_scales: {'at the previous call, ' if late else ''}no FP8 forward pass was recorded since "
            "the last update. Call it once per optimizer step, after forward/backward (amaxes are "
            "recorded only in train() mode)."
        )
    if not any_nonfinite or check.policy == "skip":
        return
    names = [n for n, bad in zip(check.names, check.nonfinite.tolist()) if bad]
    msg = (
        f"update_scales: non-finite (inf/NaN) amax in {len(names)} FP8 tensor(s) at {when or 'this '}"
        f"optimizer step: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}. Their scale updates "
        "were skipped (counted in fp8_stats as nonfinite_skips); the activations or gradients of these "
        "layers hold inf/NaN, usually a diverging run (lower the learning rate) or bad input data."
    )
    if check.policy == "raise":
        raise FloatingPointError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=5)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Update `model`'s FP8 scales after every `optimizer.step()` (an optimizer step post-hook).
    With gradient accumulation this is exactly once per real optimizer step. A step with no FP8
    forward pass since the last update (optimizer-state initialisation before a checkpoint load)
    leaves the scales as they are. Returns the hook
    handle (`handle.remove()` detaches). Attaching the same model to the same optimizer twice is
    refused, since it would roll the histories twice per step."""
    model = without_compile_wrapper(model)  # the same model compiled or not: one hook
    if not delayed_scale_states(model):
        raise ValueError("hf_fp8.attach: the model has no FP8 layers; call hf_fp8.convert_model(model) first")
    handles = getattr(optimizer, "_hf_fp8_handles", None)
    if handles is None:
        handles = optimizer._hf_fp8_handles = {}
    old = handles.get(id(model))
    if old is not None and old.id in optimizer._optimizer_step_post_hooks:
        raise RuntimeError(
            "hf_fp8.attach: this model is already attached to this optimizer (scales would update twice per step)"
        )

    def _hook(opt, args, kwargs):
        # An optimizer step with no FP8 pass before it is not a training step: e.g. the zero-gradient
        # step torch.distributed.checkpoint / Accelerate run to create optimizer state before loading
        # it. That update is a no-op (no history rolls); update_scales(model) called directly raises.
        with torch.no_grad():
            _update_scales(model, require_recorded=False)

    handles[id(model)] = handle = optimizer.register_step_post_hook(_hook)
    return handle
