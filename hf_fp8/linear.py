"""FP8Linear: nn.Linear whose three GEMMs run in FP8 with delayed per-tensor scaling.

  forward      out        = x_e4m3  @ w_e4m3.T      (input, weight: E4M3)
  backward     grad_input = go_e5m2 @ w_e4m3        (grad-output: E5M2 in the "hybrid" format)
               grad_weight= go_e5m2.T @ x_e4m3
Each operand is cast once with its delayed scale (hf_fp8.scaling, hf_fp8.cast); the GEMMs are
`torch._scaled_mm` with the inverse scales the scaling state keeps, fed each operand in the layout it reads
(the weight-gradient GEMM takes x and the grad-output transposed). In eager CUDA mode the Triton
cast writes those transposed copies in the same pass; elsewhere they are transposes of the FP8
tensors (under torch.compile from 4096-token batches by hf_fp8's own op, see
_TRANSPOSE_OP_MIN_TOKENS), but a compiled weight in the steady state is cast in both layouts by one
op (_weight_op_applies). What autograd keeps of x and w is FP8 (half the bytes of BF16). Bias stays
high precision.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import cast
from ._ops import define_op
from ._torchao import Float8TrainingTensor, LinearMMConfig, ScaledMMConfig
from .cast import cast_fp8_fused, cast_fp8_reference, cast_weight_fp8, fused_cast_applies, transpose_fp8
from .recipe import FP8Recipe
from .scaling import DelayedScale, amax_of, cast_scale, inverse_scale, record_amax, record_amaxes

LINEAR_ROLES = ("input", "weight", "grad_output")
_INPUT, _WEIGHT, _GRAD_OUTPUT = range(3)
# torch._scaled_mm needs the reduction dim to be a multiple of 16 on CUDA.
FP8_DIM_MULTIPLE = 16

# torchao's tensorwise defaults: fast accumulation in the forward GEMM only. Used to wrap FSDP2's
# all-gathered FP8 weights (hf_fp8.fsdp) in torchao Float8TrainingTensors.
_MM_CONFIG = LinearMMConfig(
    ScaledMMConfig(emulate=False, use_fast_accum=True),
    ScaledMMConfig(emulate=False, use_fast_accum=False),
    ScaledMMConfig(emulate=False, use_fast_accum=False),
)


def _cast_delayed(x: torch.Tensor, source: DelayedScale, i: int, transposed: bool = False, fused: bool | None = None,
                  record_in: tuple[DelayedScale, ...] = ()):  # fmt: skip
    """(x_fp8, x_fp8_t, inv_scale, amax): 2D `x` cast to FP8 with role i's delayed scale in state
    `source`, its transposed copy (None unless `transposed`), the inverse of the scale used
    (value = data * inv_scale, what the GEMM takes) and x's amax, which the caller records; None
    when the Triton cast ran and already recorded it into role i of the states in `record_in`.
    `fused`: the caller's `_fused_cast(x, source)` when it already asked (else it is asked here).

    Once the delayed scale is known on the host, eager CUDA casts run as one Triton kernel
    (hf_fp8.cast); the first steps, CPU and torch.compile use the reference expression."""
    x = x.detach()  # the casts are not differentiated: _FP8GEMMs routes the gradients
    if _fused_cast(x, source) if fused is None else fused:
        scale = source.scale[i]
        pending = tuple(state.pending_amax[i] for state in record_in)
        x_fp8, x_fp8_t, amax = cast_fp8_fused(x, scale, source.dtypes[i], transposed, record_into=pending)
    else:
        amax = amax_of(x)
        scale = cast_scale(source, i, amax)
        x_fp8, x_fp8_t = cast_fp8_reference(x, scale, source.dtypes[i], transposed)
    return x_fp8, x_fp8_t, inverse_scale(source, i, scale), amax


def _fused_cast(x: torch.Tensor, source: DelayedScale) -> bool:
    """Whether casting x with `source`'s scale runs the Triton kernel: it needs the delayed scale
    before the pass (known on the host after the first updates) and an eager CUDA tensor."""
    return source.updated_on_host and fused_cast_applies(x)


def _scaled_mm_without_onednn(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                              out_dtype: torch.dtype, use_fast_accum: bool) -> torch.Tensor:  # fmt: skip
    """torch._scaled_mm on the CPU with oneDNN switched off around it. torch sends E4M3 x E4M3
    `_scaled_mm` to oneDNN, which has no native FP8 on most CPUs and runs ~50x slower than torch's
    own kernel (identical results); the switch covers the FP8 GEMMs only, so the user's BF16 ops keep
    oneDNN. (Not `mkldnn.flags()`: it warns on each use.) An op (`scaled_mm_without_onednn`), so that
    torch.compile does not trace into it: traced, a switch of global state cannot stay in the graph
    (torch 2.13 moves it out, and the compiled GEMM ran in oneDNN, ~350 ms for 4096 x 64 x 128
    against 2 ms; torch 2.11 refuses it in a backward: "HOP: Unsafe side effect")."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=use_fast_accum)
    finally:
        torch.backends.mkldnn.enabled = enabled


scaled_mm_without_onednn = define_op(
    "scaled_mm_without_onednn(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, ScalarType out_dtype, "
    "bool use_fast_accum) -> Tensor",
    {"CPU": _scaled_mm_without_onednn},
    fake=lambda a, b, scale_a, scale_b, out_dtype, use_fast_accum: a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype),
)


def _gemm(a, a_inv, b, b_inv, out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
    """a (M, K) @ b (K, N) in FP8 -> out_dtype. a row-major and b column-major (both K-major, what
    torch._scaled_mm takes); a_inv / b_inv are inverse scales (value = data * inv), FP32 scalars.
    The same call as torchao's tensorwise GEMM (addmm_float8_unwrapped), which takes the scales and
    computes their reciprocals on every call instead."""
    if a.device.type == "cpu":
        return scaled_mm_without_onednn(a, b, a_inv, b_inv, out_dtype, fast_accum)
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype, use_fast_accum=fast_accum)


def _pad_tokens(t: torch.Tensor) -> torch.Tensor:
    """(rows, tokens) FP8 -> tokens zero-padded to a multiple of 16 (the grad-weight GEMM's inner dim)."""
    pad = -t.shape[1] % FP8_DIM_MULTIPLE
    if pad == 0:
        return t
    out = torch.zeros(t.shape[0], t.shape[1] + pad, dtype=t.dtype, device=t.device)
    out[:, : t.shape[1]] = t
    return out


# From this many tokens per batch, the FP8 copies that the grad-weight GEMM reads transposed (every
# linear's input, every grad-output) are made by the opaque cast.transpose_fp8 rather than by a
# transposed store that inductor fuses into the kernel producing the FP8 tensor. Inductor writes such
# a store from a row-wise reduction kernel (the amax, the RMSNorm backward, which from 4096 rows it
# may also make a mix-order reduction), one byte per token row, at a fraction of the bandwidth; a
# tiled byte copy afterwards costs less than the difference. Measured on the H200 (RESULTS (30),
# (31)): 1.5B shape, 4 x 4096-token micro-batches with CUDA graphs 231 -> 213 ms per step with the
# shared inputs' copies by the op, 204 with every copy (2 x 8192: 186 either way); 8B slice, 16k
# tokens: the cast kernels 24.5 -> 22.5 ms per step.
_TRANSPOSE_OP_MIN_TOKENS = 4096


def _weight_op_applies(state: DelayedScale, grad_input: bool, cast_weight_once: bool) -> bool:
    """Whether fp8_matmul casts the weight with the opaque cast.cast_weight_fp8 (both layouts and the
    amax in one pass; backward reuses the transposed copy) rather than by inductor (cast and amax in
    forward, cast again with a transposed store in backward): under torch.compile, once the delayed
    scale is known (the cast then does not wait for the weight's amax), when backward needs the
    transposed copy (`grad_input`), unless FP8Recipe.cast_weights_once (`cast_weight_once`) is
    False or HF_FP8_FUSED_CAST=0 asks for the reference casts.
    H200, kernel time per step (RESULTS (37)): 8B slice -0.7 ms, 1.5B with FP8 attention -1.3 ms;
    peak memory +0.8 / +1.0 GiB (the transposed copy is kept for backward), still under BF16's."""
    return (cast_weight_once and cast.FUSED_CAST_ENABLED and torch.compiler.is_compiling() and state.updated_on_host
            and grad_input)  # fmt: skip


class _FP8GEMMs(torch.autograd.Function):
    """out = x @ weight_t with its three GEMMs in FP8, on operands fp8_matmul has cast (x and
    weight_t, high precision, are inputs for autograd only). Backward casts the grad-output (E5M2 in
    the hybrid format) with its delayed scale, recording its amax, in both layouts:

      forward   out    (T, N) = x8    (T, K) @ w8_nk.T (K, N)    fast accumulation
      backward  grad_x (T, K) = go8   (T, N) @ w8_kn.T (N, K)
                grad_w (N, K) = go8_t (N, T) @ x8_t.T  (T, K)    T zero-padded to 16 if needed

    w8_nk is the weight in nn.Linear's (N, K) layout, w8_kn its transpose; the `.T` of a contiguous
    tensor is the column-major operand torch._scaled_mm wants. What backward keeps is FP8.

    Where the transposed copies come from: in eager CUDA mode the Triton cast writes them along
    with the cast (x8_t, w8_kn given, kept for backward; x8 and w8_nk are freed after forward). Else
    (x8_t / w8_kn None) backward transposes the kept x8 / w8_nk. Under torch.compile inductor fuses
    that copy, and its partitioner may re-cast in backward instead of keeping an FP8 copy. With
    transpose_op (batches of _TRANSPOSE_OP_MIN_TOKENS or more) the transposed copies of x8 (made in
    forward, given as x8_t) and go8 come from cast.transpose_fp8 instead, an opaque op, which
    torch.compile also makes once for siblings sharing one input cast (q/k/v, gate/up). Compiled
    weights in the steady state come with w8_kn from cast.cast_weight_fp8 (_weight_op_applies)."""

    @staticmethod
    def forward(ctx, x, weight_t, x8, x8_t, x_inv, w8_nk, w8_kn, w_inv, state: DelayedScale, linear_layout: bool,
                transpose_op: bool):  # fmt: skip
        ctx.state, ctx.linear_layout, ctx.transpose_op = state, linear_layout, transpose_op
        ctx.x_transposed, ctx.w_transposed = x8_t is not None, w8_kn is not None
        # Keep only what backward reads: x for the grad-weight GEMM, w for the grad-input GEMM (a
        # frozen LoRA base layer keeps no copy of its input).
        x_kept = (x8 if x8_t is None else x8_t) if ctx.needs_input_grad[1] else None
        w_kept = (w8_nk if w8_kn is None else w8_kn) if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(x_kept, x_inv, w_kept, w_inv)
        return _gemm(x8, x_inv, w8_nk.t(), w_inv, x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out):
        x_kept, x_inv, w_kept, w_inv = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Frozen weight (LoRA base layers): no transposed grad-output and no grad-weight GEMM. The
        # transposed copy comes from the cast's own pass when the Triton cast runs or transpose_op is
        # off, else from transpose_fp8 (see _TRANSPOSE_OP_MIN_TOKENS).
        grad_out = grad_out.contiguous()
        fused = _fused_cast(grad_out, ctx.state)
        go_t_in_cast = need_w and (fused or not ctx.transpose_op)
        go8, go8_t, go_inv, go_amax = _cast_delayed(
            grad_out, ctx.state, _GRAD_OUTPUT, go_t_in_cast, fused, record_in=(ctx.state,)
        )
        if need_w and go8_t is None:
            go8_t = transpose_fp8(go8)
        if go_amax is not None:
            record_amax(ctx.state, _GRAD_OUTPUT, go_amax)
        grad_x = grad_weight_t = None
        if need_x:
            w8_kn = w_kept if ctx.w_transposed else w_kept.t().contiguous()
            grad_x = _gemm(go8, go_inv, w8_kn.t(), w_inv, grad_out.dtype, fast_accum=False)
        if need_w:
            if ctx.x_transposed:
                x8_t = x_kept
            elif ctx.transpose_op:  # the opaque copy (made once for siblings sharing the input), see transpose_fp8
                x8_t = transpose_fp8(x_kept)
            else:
                x8_t = x_kept.t().contiguous()
            go8_t, x8_t = _pad_tokens(go8_t), _pad_tokens(x8_t)
            if ctx.linear_layout:  # weight_t is W.T: produce W's gradient in W's (N, K) layout
                grad_weight_t = _gemm(go8_t, go_inv, x8_t.t(), x_inv, grad_out.dtype, fast_accum=False).t()
            else:  # Conv1D: weight_t is the stored (K, N) weight
                grad_weight_t = _gemm(x8_t, x_inv, go8_t.t(), go_inv, grad_out.dtype, fast_accum=False)
        return grad_x, grad_weight_t, None, None, None, None, None, None, None, None, None


def fp8_matmul(x: torch.Tensor, weight_t: torch.Tensor, state: DelayedScale, record: bool,
               input_state: DelayedScale | None = None, cast_weight_once: bool = True) -> torch.Tensor:  # fmt: skip
    """x (..., K) @ weight_t (K, N) -> (..., N) in x's dtype, all three GEMMs in FP8.

    `weight_t` is nn.Linear's weight transposed (a view) or GPT-2 Conv1D's weight as stored.
    `record`: max-reduce this call's input/weight/grad-output amaxes into `state` (training).
    `input_state`: cast x with this state's input scale instead of `state`'s (shared input scales,
    see FP8Recipe.share_input_scales), and record x's amax there too, so the shared scale covers
    every sibling's input. All siblings' casts are then one expression, which torch.compile
    computes once.
    `cast_weight_once`: FP8Recipe.cast_weights_once (see _weight_op_applies).
    A `weight_t` that is already a torchao Float8TrainingTensor (hf_fp8.fsdp's FP8 all-gather) is
    used as is: not re-cast, and its amax is not recorded here."""
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).contiguous()
    grad = torch.is_grad_enabled()
    shared = input_state if input_state is not state else None
    fp8_weight = isinstance(weight_t, Float8TrainingTensor)
    # nn.Linear's weight_t is W.T: cast W (N, K) as stored. Conv1D stores weight_t (K, N): cast it,
    # and the forward GEMM takes its transpose.
    linear_layout = fp8_weight or weight_t.t().is_contiguous()
    w_stored = weight_t if fp8_weight else weight_t.t() if linear_layout else weight_t.contiguous()
    # Transposed copies for backward (x: grad-weight GEMM, w: grad-input GEMM): written by the fused
    # cast when it runs, else made in backward from the kept FP8 copy.
    x_fused = _fused_cast(x2d, shared or state)
    w_fused = not fp8_weight and _fused_cast(w_stored, state)
    x_t_now = grad and weight_t.requires_grad and x_fused
    w_t_now = grad and x.requires_grad and w_fused
    # The FP8 GEMMs choose their own precision; autocast must not re-cast the FP8 operands.
    with torch.autocast(x.device.type, enabled=False):
        # Who records the input's amax: this layer's state (its own history stays complete for stats and
        # checkpoints, also with a shared scale) and the shared one.
        x_record = ((state,) if shared is None else (state, shared)) if record else ()
        w_record = (state,) if record else ()
        x8, x8_t, x_inv, x_amax = _cast_delayed(x2d, shared or state, _INPUT, x_t_now, x_fused, x_record)
        w_amax = None
        if fp8_weight:
            # Already FP8 (FSDP2 FP8 all-gather, hf_fp8.fsdp): cast, and its amax recorded, before the
            # all-gather. Its data is the (K, N) transpose of the gathered (N, K) weight.
            w8_nk, w8_kn, w_inv = weight_t._data.t().contiguous(), None, weight_t._scale.reciprocal()
        elif linear_layout and _weight_op_applies(state, grad and x.requires_grad, cast_weight_once):
            w8_nk, w8_kn, w_amax = cast_weight_fp8(w_stored, state.scale[_WEIGHT], state.dtypes[_WEIGHT])
            w_inv = state.inverse(_WEIGHT)
        elif linear_layout:
            w8_nk, w8_kn, w_inv, w_amax = _cast_delayed(w_stored, state, _WEIGHT, w_t_now, w_fused, w_record)
        else:
            w8_kn, w8_nk, w_inv, w_amax = _cast_delayed(w_stored, state, _WEIGHT, True, w_fused, w_record)
        if record:  # what the Triton casts did not record already
            amaxes = {role: a for role, a in ((_INPUT, x_amax), (_WEIGHT, w_amax)) if a is not None}
            if amaxes:
                record_amaxes(state, amaxes)
            if shared is not None and x_amax is not None:
                record_amax(shared, _INPUT, x_amax)
        transpose_op = x2d.shape[0] >= _TRANSPOSE_OP_MIN_TOKENS
        if transpose_op and x8_t is None and grad and weight_t.requires_grad and torch.compiler.is_compiling():
            # The input's transposed copy, made here before the forward GEMM reads x8 rather than in
            # backward: the partitioner put it in the forward anyway, but after the GEMM, and then
            # inductor wrote x8 twice (see _transpose_fp8).
            x8_t = transpose_fp8(x8)
        out = _FP8GEMMs.apply(x2d, weight_t, x8, x8_t, x_inv, w8_nk, w8_kn, w_inv, state, linear_layout, transpose_op)
    return out.reshape(*shape[:-1], out.shape[-1])


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    # Same rule as F.linear under autocast: the GEMM runs in the autocast dtype and so does the output.
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


def new_linear_scale_state(recipe: FP8Recipe, device) -> DelayedScale:
    fwd, bwd = recipe.forward_dtype, recipe.backward_dtype
    return DelayedScale(LINEAR_ROLES, (fwd, fwd, bwd), recipe, device=device)


def check_fp8_dims(in_features: int, out_features: int) -> str | None:
    """Why a (in, out) GEMM cannot run in FP8, or None if it can."""
    bad = [f"{n}={v}" for n, v in (("in_features", in_features), ("out_features", out_features)) if v % FP8_DIM_MULTIPLE]
    if bad:
        return f"{', '.join(bad)} not a multiple of {FP8_DIM_MULTIPLE} (torch._scaled_mm needs it; pad the layer)"
    return None


class FP8Linear(nn.Linear):
    """Drop-in nn.Linear with FP8 GEMMs and delayed scaling. Prefer `hf_fp8.convert_model`, which
    swaps a model's eligible linears in place; `FP8Linear.from_linear` converts one layer and keeps
    its Parameter objects (an existing optimizer keeps training them).

    The delayed-scaling state is the `fp8_scale` submodule (buffers, in state_dict). Scales change
    only in `hf_fp8.update_scales(model)`, once per optimizer step.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *, recipe: FP8Recipe | None = None):
        problem = check_fp8_dims(in_features, out_features)
        if problem:
            raise ValueError(f"FP8Linear({in_features}, {out_features}): {problem}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe or FP8Recipe()
        self.fp8_scale = new_linear_scale_state(self.recipe, self.weight.device)

    # The sibling's state whose input scale this layer casts with (`share_input_scale`), or None.
    _shared_input_scale: DelayedScale | None = None

    def share_input_scale(self, source: DelayedScale | None) -> None:
        """Cast this layer's input with `source`'s input scale (a sibling reading the same input);
        None: its own again. Stored outside the module tree (object.__setattr__), so the sibling's
        state gets no second state_dict entry and no second scale update."""
        object.__setattr__(self, "_shared_input_scale", None if source is self.fp8_scale else source)

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: FP8Recipe | None = None) -> "FP8Linear":
        """An FP8Linear sharing `linear`'s weight and bias Parameters (no copy)."""
        problem = check_fp8_dims(linear.in_features, linear.out_features)
        if problem:
            raise ValueError(f"FP8Linear.from_linear: {problem}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, recipe=recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        new.fp8_scale = new_linear_scale_state(new.recipe, linear.weight.device)
        new.train(linear.training)
        return new

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's weight and bias Parameters."""
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=False)
        plain.weight = self.weight
        plain.bias = self.bias
        plain.train(self.training)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        out = fp8_matmul(x, self.weight.t(), self.fp8_scale, record=self.training, input_state=self._shared_input_scale,
                         cast_weight_once=self.recipe.cast_weights_once)  # fmt: skip
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.recipe.fp8_format}"


class FP8Conv1D(Conv1D):
    """GPT-2's transformers Conv1D (y = x @ W + b, W stored (in, out)) with FP8 GEMMs. W is used as
    stored (it already is nn.Linear's weight transposed), so Parameters, checkpoint keys and shapes
    stay those of Conv1D."""

    @classmethod
    def from_conv1d(cls, conv: Conv1D, recipe: FP8Recipe | None = None) -> "FP8Conv1D":
        problem = check_fp8_dims(conv.nx, conv.nf)
        if problem:
            raise ValueError(f"FP8Conv1D.from_conv1d: {problem}")
        with torch.device("meta"):
            new = cls(conv.nf, conv.nx)
        new.weight, new.bias = conv.weight, conv.bias
        new.recipe = recipe or FP8Recipe()
        new.fp8_scale = new_linear_scale_state(new.recipe, conv.weight.device)
        new.train(conv.training)
        return new

    def to_conv1d(self) -> Conv1D:
        with torch.device("meta"):
            plain = Conv1D(self.nf, self.nx)
        plain.weight, plain.bias = self.weight, self.bias
        plain.train(self.training)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _autocast_input(x)
        out = fp8_matmul(x, self.weight, self.fp8_scale, record=self.training)
        return out + self.bias.to(out.dtype)

    def __repr__(self) -> str:
        return f"FP8Conv1D(nf={self.nf}, nx={self.nx}, fp8={self.recipe.fp8_format})"
