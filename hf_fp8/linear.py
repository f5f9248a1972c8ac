"""FP8Linear: nn.Linear whose three GEMMs run in FP8 with delayed per-tensor scaling.

  forward      out        = x_e4m3  @ w_e4m3.T      (input, weight: E4M3)
  backward     grad_input = go_e5m2 @ w_e4m3        (grad-output: E5M2 in the "hybrid" format)
               grad_weight= go_e5m2.T @ x_e4m3
Each operand is cast once with its delayed scale (hf_fp8.scaling) into a torchao
`Float8TrainingTensor`; torchao's `matmul_with_hp_or_float8_args` (the Float8Linear matmul) sees
already-cast operands, skips its own dynamic casts, and runs `torch._scaled_mm`. The FP8 copies of
x and w are what autograd saves for backward (half the bytes of BF16). Bias stays high precision.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._torchao import (
    Float8LinearConfig,
    Float8TrainingTensor,
    GemmInputRole,
    LinearMMConfig,
    ScaledMMConfig,
    hp_tensor_and_scale_to_float8,
    matmul_with_hp_or_float8_args,
)
from .recipe import FP8Recipe
from .scaling import DelayedScale, amax_of, cast_scale, record_amax

LINEAR_ROLES = ("input", "weight", "grad_output")
_INPUT, _WEIGHT, _GRAD_OUTPUT = range(3)
# torch._scaled_mm needs the reduction dim to be a multiple of 16 on CUDA.
FP8_DIM_MULTIPLE = 16

# torchao's defaults for its tensorwise recipe: fast accumulation in the forward GEMM only.
# The grad-weight GEMM reduces over tokens; its inner dim is padded to 16 when the token count
# is not a multiple of 16 (a second config, chosen per call, so aligned calls never pad).
_MM_CONFIG = LinearMMConfig(
    ScaledMMConfig(emulate=False, use_fast_accum=True),
    ScaledMMConfig(emulate=False, use_fast_accum=False),
    ScaledMMConfig(emulate=False, use_fast_accum=False),
)
_MM_CONFIG_PAD_TOKENS = _MM_CONFIG._replace(grad_weight=ScaledMMConfig(emulate=False, pad_inner_dim=True))
# Only read by torchao for operands that are not cast yet; ours always are.
_TORCHAO_CONFIG = Float8LinearConfig()


def _cast_delayed(x, state: DelayedScale, i: int, mm_config, gemm_role, record: bool, shared: DelayedScale | None = None):
    """Cast x to FP8 with role i's delayed scale, recording its amax when `record`.

    `shared`: cast with this state's scale instead (a sibling linear reading the same input), and
    record the amax there too, so the shared scale covers every sibling's input. All siblings'
    casts are then one expression, which torch.compile computes, and saves for backward, once."""
    amax = amax_of(x)
    if record:
        record_amax(state, i, amax)  # this layer's own history stays complete (stats, checkpoints)
        if shared is not None:
            record_amax(shared, i, amax)
    source = shared if shared is not None else state
    scale = cast_scale(source, i, amax)
    return hp_tensor_and_scale_to_float8(x, scale, source.dtypes[i], mm_config, gemm_role)


class _CastGradOutputDelayed(torch.autograd.Function):
    """Identity in forward; in backward casts the incoming gradient to FP8 (E5M2 in the hybrid
    format) with the grad-output delayed scale and records its amax, so torchao's matmul backward
    receives an already-cast grad-output and runs both backward GEMMs in FP8."""

    @staticmethod
    def forward(ctx, y, state: DelayedScale, mm_config):
        ctx.state = state
        ctx.mm_config = mm_config
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        grad_fp8 = _cast_delayed(grad, ctx.state, _GRAD_OUTPUT, ctx.mm_config, GemmInputRole.GRAD_OUTPUT, True)
        return grad_fp8, None, None


@contextlib.contextmanager
def _cpu_fp8_gemm_context(t: torch.Tensor):
    """On CPU, torch sends E4M3 x E4M3 `_scaled_mm` to oneDNN, which has no native FP8 on most
    CPUs and runs ~50x slower than torch's own kernel (identical results); switch oneDNN off for
    the FP8 GEMMs only, so the user's BF16 ops keep it. (Not `mkldnn.flags()`: it warns on each use.)"""
    if t.device.type != "cpu" or not torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


@torch._dynamo.allow_in_graph
class _FP8Matmul(matmul_with_hp_or_float8_args):
    """torchao's Float8Linear matmul, with the CPU oneDNN switch around both passes."""

    @staticmethod
    def forward(ctx, input_fp8, weight_t_fp8, linear_mm_config, config):
        with _cpu_fp8_gemm_context(input_fp8):
            return matmul_with_hp_or_float8_args.forward(ctx, input_fp8, weight_t_fp8, linear_mm_config, config)

    @staticmethod
    def backward(ctx, grad_output):
        with _cpu_fp8_gemm_context(grad_output):
            if ctx.needs_input_grad[1]:
                return matmul_with_hp_or_float8_args.backward(ctx, grad_output)
            # Frozen weight (LoRA base layers, frozen towers): only the grad-input GEMM runs; the
            # grad-weight GEMM, whose result autograd would discard, is skipped.
            return _grad_input_only(ctx, grad_output), None, None, None


def _grad_input_only(ctx, grad_output):
    """grad_input = grad_output @ W in FP8, as torchao's backward computes it (both operands
    already cast: fp8_matmul casts the weight in forward and grad-output in _CastGradOutputDelayed)."""
    if not ctx.needs_input_grad[0]:
        return None
    _, weight_t = ctx.saved_tensors
    shape = grad_output.shape
    grad_input = torch.mm(grad_output.reshape(-1, shape[-1]), weight_t.t())
    return grad_input.reshape(*shape[:-1], grad_input.shape[-1])


def fp8_matmul(x: torch.Tensor, weight_t: torch.Tensor, state: DelayedScale, record: bool,
               input_state: DelayedScale | None = None) -> torch.Tensor:  # fmt: skip
    """x (..., K) @ weight_t (K, N) -> (..., N) in x's dtype, all three GEMMs in FP8.

    `weight_t` is nn.Linear's weight transposed (a view) or GPT-2 Conv1D's weight as stored.
    `record`: max-reduce this call's input/weight/grad-output amaxes into `state` (training).
    `input_state`: cast x with this state's input scale instead of `state`'s (shared input scales,
    see FP8Recipe.share_input_scales).
    A `weight_t` that is already a torchao Float8TrainingTensor (hf_fp8.fsdp's FP8 all-gather) is
    used as is: not re-cast, and its amax is not recorded here."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    mm_config = _MM_CONFIG if tokens % FP8_DIM_MULTIPLE == 0 else _MM_CONFIG_PAD_TOKENS
    # The FP8 GEMMs choose their own precision; autocast must not re-cast the FP8 operands.
    with torch.autocast(x.device.type, enabled=False):
        shared = input_state if input_state is not state else None
        x_fp8 = _cast_delayed(x, state, _INPUT, mm_config, GemmInputRole.INPUT, record, shared)
        if isinstance(weight_t, Float8TrainingTensor):
            # Already FP8 (FSDP2 FP8 all-gather, hf_fp8.fsdp): cast, and its amax recorded, before the
            # all-gather. It carries _MM_CONFIG, whose output/grad_input configs (the two GEMMs the
            # weight enters) equal _MM_CONFIG_PAD_TOKENS'.
            w_fp8 = weight_t
        else:
            w_fp8 = _cast_delayed(weight_t, state, _WEIGHT, mm_config, GemmInputRole.WEIGHT, record)
        out = _FP8Matmul.apply(x_fp8, w_fp8, mm_config, _TORCHAO_CONFIG)
        if torch.is_grad_enabled() and out.requires_grad:
            out = _CastGradOutputDelayed.apply(out, state, mm_config)
    return out


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
        out = fp8_matmul(x, self.weight.t(), self.fp8_scale, record=self.training, input_state=self._shared_input_scale)
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
