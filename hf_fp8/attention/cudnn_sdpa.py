"""FP8 attention on cuDNN's fused FP8 SDPA (Hopper, sm_90), with the reference's delayed scales.

cuDNN's `sdpa_fp8` / `sdpa_fp8_backward` (through the optional `nvidia-cudnn-frontend` package; the
kernel Transformer Engine uses) take per-tensor descales of their FP8 inputs and scales of their FP8
outputs, and return the outputs' amaxes: exactly the delayed-scaling contract. On Hopper their
outputs (O, dQ, dK, dV) must be FP8, which the reference (`reference.py`) mirrors, so CPU runs
and GPU runs have the same numerics up to summation order.

What runs where:
- `_CudnnFP8Attention` (autograd): casts Q/K/V (and dO in backward) with their delayed scales in
  PyTorch, so under torch.compile the cast and its amax fuse into the op that produces the tensor
  (RoPE, the V projection, ...); calls the two kernels; records every amax; dequantizes O and dQ/dK/dV
  to the model dtype.
- `torch.ops.hf_fp8.cudnn_fp8_sdpa_fwd` / `_bwd`: ops with fake implementations, so
  torch.compile keeps them opaque. Graphs are built once per shape/stride/flag combination.
Covered: causal (top-left, as SDPA's is_causal) or no mask, GQA/MQA, head dim 128 (cuDNN 9.19's FP8
backward on Hopper declines any other), unless torch.use_deterministic_algorithms(True) is set (its
backward is not deterministic on Hopper). Other masks (padding, sliding window) and head dims run on
hf_fp8's Triton kernel or the reference; see `kernels.py`.
"""

from __future__ import annotations

import ctypes
import glob
import os
import warnings

import torch

from .._ops import define_op
from ..scaling import DelayedScale, cast_scale, inverse_scale, record_amaxes
from .reference import (
    _DK, _DO, _DQ, _DS, _DV, _K, _O, _Q, _V,
    P_SCALE, cast_input, first_step_bounds, forward_output_bound, measures_first,
)  # fmt: skip

_E4M3 = torch.float8_e4m3fn
_cudnn = None  # the imported `cudnn` module, once `status()` found it usable
_STATUS: dict[int, str | None] = {}  # CUDA device index -> why the cuDNN kernel cannot run there (None: it can)
KERNEL_ENV = "HF_FP8_ATTENTION_KERNEL"  # which FP8 attention kernel runs (see kernels.py)
KERNEL_CHOICES = ("auto", "cudnn", "triton", "reference")
# Why a call is not sent to cuDNN under torch.use_deterministic_algorithms(True) (see kernel_for).
DETERMINISTIC_REASON = ("torch.use_deterministic_algorithms(True) is set and cuDNN's FP8 attention backward has no "
                        "deterministic mode on Hopper")  # fmt: skip


def kernel_choice() -> str:
    """HF_FP8_ATTENTION_KERNEL, checked against KERNEL_CHOICES (default auto)."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV}={choice!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return choice


def _import_cudnn():
    """Import cudnn-frontend. It dlopens libcudnn by name; torch wheels ship it in nvidia/cudnn/lib,
    which is not on the loader path, so load that copy first (the one torch itself uses)."""
    global _cudnn
    if _cudnn is None:
        try:
            import nvidia.cudnn

            for lib_dir in (os.path.join(p, "lib") for p in nvidia.cudnn.__path__):
                for path in sorted(glob.glob(os.path.join(lib_dir, "libcudnn*.so.*"))):
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except (ImportError, OSError):
            pass  # a system-wide cuDNN may still be found by name
        import cudnn

        _cudnn = cudnn
    return _cudnn


def status(device: torch.device) -> str | None:
    """Why the cuDNN FP8 attention cannot run on `device`, or None when it can. Checked once per
    device (call it outside torch.compile first: `convert_model` does)."""
    if device.type != "cuda":
        return f"device {device.type} (the fused kernel needs an sm_90 GPU)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STATUS:
        _STATUS[index] = _check(index)
    return _STATUS[index]


def _check(index: int) -> str | None:
    choice = kernel_choice()
    if choice in ("triton", "reference"):
        return f"{KERNEL_ENV}={choice}"
    capability = torch.cuda.get_device_capability(index)
    reason = None
    if capability != (9, 0):
        reason = f"compute capability {capability[0]}.{capability[1]}: the cuDNN FP8 attention path is built for sm_90 (Hopper)"
    else:
        try:
            version = _import_cudnn().backend_version()
            if version < 90100:
                reason = f"cuDNN {version} is too old for FP8 SDPA training (needs >= 9.1)"
        except Exception as e:  # ImportError, or a cudnn-frontend that cannot load libcudnn
            reason = f"nvidia-cudnn-frontend unavailable ({type(e).__name__}: {e}); pip install 'hf_fp8[cudnn]'"
    if reason is not None and choice == "cudnn":
        raise RuntimeError(f"{KERNEL_ENV}=cudnn but {reason}")
    return reason


def backend_version() -> int:
    """The cuDNN version the frontend loaded (after `status` found it usable)."""
    return _cudnn.backend_version()


def kernel_for(query: torch.Tensor, key: torch.Tensor, attention_mask, is_causal: bool) -> tuple[str, str]:
    """("cudnn", "") when the fused kernel covers this call, else ("reference", why not)."""
    if not query.is_cuda:
        return "reference", f"{query.device.type} tensors"
    reason = status(query.device)
    if reason is not None:
        return "reference", reason
    q_len, kv_len, head_dim = query.shape[2], key.shape[2], query.shape[3]
    if attention_mask is not None:
        return "reference", "the batch has a padding or sliding-window mask (the fused kernel covers causal/unmasked attention)"
    if is_causal and q_len != kv_len:
        return "reference", f"causal attention of {q_len} queries over {kv_len} keys (the fused kernel needs equal lengths)"
    if head_dim != 128:  # cuDNN 9.19's FP8 backward on Hopper declines any other head dim
        return "reference", f"head dim {head_dim} (cuDNN's FP8 attention backward on Hopper takes head dim 128 only)"
    if torch.are_deterministic_algorithms_enabled():
        # cuDNN's FP8 backward reduces dQ across key blocks in no fixed order, and the frontend offers
        # its deterministic variant on Blackwell only; hf_fp8's Triton backward is deterministic.
        return "reference", DETERMINISTIC_REASON
    return "cudnn", ""


# ---- graphs ---------------------------------------------------------------------------------------

_HANDLES: dict[int, object] = {}
_GRAPHS: dict[tuple, tuple] = {}  # (direction, device, layouts, scale, causal) -> built graph
# Built graphs kept at most (oldest dropped first): one per shape; varying sequence lengths would
# otherwise grow the cache without bound (each graph holds cuDNN plans).
_MAX_GRAPHS = 64


def _remember(key: tuple, entry: tuple) -> tuple:
    if len(_GRAPHS) >= _MAX_GRAPHS:
        _GRAPHS.pop(next(iter(_GRAPHS)))
    _GRAPHS[key] = entry
    return entry


def _handle(device: torch.device):
    if device.index not in _HANDLES:
        with torch.cuda.device(device):
            _HANDLES[device.index] = _cudnn.create_handle()
    handle = _HANDLES[device.index]
    _cudnn.set_stream(handle, torch.cuda.current_stream(device).cuda_stream)
    return handle


def _data_type(dtype: torch.dtype):
    dt = _cudnn.data_type
    return {torch.float8_e4m3fn: dt.FP8_E4M3, torch.float8_e5m2: dt.FP8_E5M2, torch.float32: dt.FLOAT}[dtype]


def _build(graph, tensors: dict) -> tuple:
    """-> (built graph, operand names, their uids in the same order, workspace bytes)."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([_cudnn.heur_mode.A, _cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    names = tuple(tensors)
    return graph, names, tuple(tensors[n].get_uid() for n in names), graph.get_workspace_size()


def _new_graph(device: torch.device):
    dt = _cudnn.data_type
    return _cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                          handle=_handle(device))  # fmt: skip


def _tensor(graph, name: str, t: torch.Tensor):
    return graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=_data_type(t.dtype))


def _scalar(graph, name: str):
    return graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=_cudnn.data_type.FLOAT)


def _set_output(t, like: torch.Tensor):
    t.set_output(True).set_dim(list(like.shape)).set_stride(list(like.stride())).set_data_type(_data_type(like.dtype))


def _layout(*tensors: torch.Tensor) -> tuple:
    return tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)


def _fwd_graph(q8, k8, v8, o8, stats, softmax_scale: float, causal: bool):
    key = ("fwd", q8.device.index, _layout(q8, k8, v8, o8), softmax_scale, causal)
    if key not in _GRAPHS:
        g = _new_graph(q8.device)
        ins = {n: _tensor(g, n, t) for n, t in (("q", q8), ("k", k8), ("v", v8))}
        ins.update({n: _scalar(g, n) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")})
        o, st, amax_s, amax_o = g.sdpa_fp8(
            q=ins["q"], k=ins["k"], v=ins["v"], descale_q=ins["descale_q"], descale_k=ins["descale_k"],
            descale_v=ins["descale_v"], descale_s=ins["descale_s"], scale_s=ins["scale_s"], scale_o=ins["scale_o"],
            generate_stats=True, attn_scale=softmax_scale, use_causal_mask=causal, name="hf_fp8_sdpa_fp8",
        )  # fmt: skip
        _set_output(o, o8)
        _set_output(st, stats)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(_cudnn.data_type.FLOAT)
        return _remember(key, _build(g, {**ins, "o": o, "stats": st, "amax_s": amax_s, "amax_o": amax_o}))
    return _GRAPHS[key]


def _bwd_graph(q8, k8, v8, o8, do8, stats, dq8, dk8, dv8, softmax_scale: float, causal: bool):
    key = ("bwd", q8.device.index, _layout(q8, k8, v8, o8, do8, stats, dq8, dk8, dv8), softmax_scale, causal)
    if key not in _GRAPHS:
        g = _new_graph(q8.device)
        ins = {n: _tensor(g, n, t) for n, t in (("q", q8), ("k", k8), ("v", v8), ("o", o8), ("do", do8), ("stats", stats))}
        scalars = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_do", "descale_s", "descale_dp",
                   "scale_s", "scale_dq", "scale_dk", "scale_dv", "scale_dp")  # fmt: skip
        ins.update({n: _scalar(g, n) for n in scalars})
        dq, dk, dv, amax_dq, amax_dk, amax_dv, amax_dp = g.sdpa_fp8_backward(
            q=ins["q"], k=ins["k"], v=ins["v"], o=ins["o"], dO=ins["do"], stats=ins["stats"],
            descale_q=ins["descale_q"], descale_k=ins["descale_k"], descale_v=ins["descale_v"],
            descale_o=ins["descale_o"], descale_dO=ins["descale_do"], descale_s=ins["descale_s"],
            descale_dP=ins["descale_dp"], scale_s=ins["scale_s"], scale_dQ=ins["scale_dq"], scale_dK=ins["scale_dk"],
            scale_dV=ins["scale_dv"], scale_dP=ins["scale_dp"], attn_scale=softmax_scale, use_causal_mask=causal,
            name="hf_fp8_sdpa_fp8_backward",
        )  # fmt: skip
        for t, like in ((dq, dq8), (dk, dk8), (dv, dv8)):
            _set_output(t, like)
        amaxes = {"amax_dq": amax_dq, "amax_dk": amax_dk, "amax_dv": amax_dv, "amax_dp": amax_dp}
        for amax in amaxes.values():
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(_cudnn.data_type.FLOAT)
        return _remember(key, _build(g, {**ins, "dq": dq, "dk": dk, "dv": dv, **amaxes}))
    return _GRAPHS[key]


def _execute(graph_entry, data: dict[str, torch.Tensor], device: torch.device) -> None:
    graph, names, uids, workspace_size = graph_entry
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=device)
    # The ordered form (buffers plus their uids, fixed per graph) is the frontend's documented fast
    # path: it reads the operands in one native call instead of normalizing a dict per call. On the
    # H200 each op still spends ~0.4-0.6 ms of host time in the frontend; queued behind GPU work
    # (a training step) that time is hidden.
    graph.execute(tuple(data[n] for n in names), workspace, handle=_handle(device), tensor_uids=uids)


def _bshd_like(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized (B, H, S, D) tensor laid out as (B, S, H, D) in memory: what the model's
    projections read after `transpose(1, 2)`, without a copy (the Triton kernels' outputs too)."""
    b, h, s, d = q.shape
    return torch.empty(b, s, h, d, dtype=dtype, device=q.device).transpose(1, 2)


# The scalars the cuDNN graphs read are (1, 1, 1, 1) fp32 tensors made by the autograd function,
# where torch.compile computes them in its scale kernel, not in the ops: each small op there costs
# host time per call, and a tensor kept across calls would come from the CUDA-graph pool of the
# first graph to run the op and outlive it, which inductor's CUDA graphs refuse.


def _scalars_4d(*xs: torch.Tensor) -> list[torch.Tensor]:
    return [x.reshape(1, 1, 1, 1).float() for x in xs]


def _p_scales(like: torch.Tensor) -> list[torch.Tensor]:
    """(scale, descale) of the softmax operand P."""
    return [torch.full((1, 1, 1, 1), v, dtype=torch.float32, device=like.device) for v in (P_SCALE, 1 / P_SCALE)]


# ---- ops ------------------------------------------------------------------------------------------
# Defined on a torch.library.Library (`_ops.define_op`), not with custom_op: ~20 us less host time
# per call, and the compiled forward of a layer with FP8 attention waits for the host (RESULTS (35)).
# CUDA only; the autograd function routes the gradients, so the ops need no autograd formula.

_FWD_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
_BWD_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_do", "descale_s", "descale_dp",
                "scale_s", "scale_dq", "scale_dk", "scale_dv", "scale_dp")  # fmt: skip


def _fwd_op(q8, k8, v8, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, softmax_scale: float, causal: bool):
    """q8 (B, Hq, S, D), k8/v8 (B, Hkv, S, D) E4M3, scalars (1, 1, 1, 1) fp32 -> O (B, Hq, S, D) E4M3
    (BSHD memory), softmax log-sum-exp stats (B, Hq, S, 1) fp32, amax of O before rounding (fp32 scalar)."""
    o8 = _bshd_like(q8, _E4M3)
    stats = torch.empty(*q8.shape[:3], 1, dtype=torch.float32, device=q8.device)
    # amax(O), amax(S): the returned amax(O) first, at the start of the buffer (inductor expects an
    # op's outputs 16-byte aligned)
    amaxes = torch.empty(2, 1, 1, 1, 1, dtype=torch.float32, device=q8.device)
    with torch.cuda.device(q8.device):
        entry = _fwd_graph(q8, k8, v8, o8, stats, softmax_scale, causal)
        data = dict(zip(_FWD_SCALARS, (descale_q, descale_k, descale_v, descale_s, scale_s, scale_o)))
        data.update(q=q8, k=k8, v=v8, o=o8, stats=stats, amax_o=amaxes[0], amax_s=amaxes[1])
        _execute(entry, data, q8.device)
    return o8, stats, amaxes[0].reshape(())


def _fwd_fake(q8, k8, v8, *scalars_and_flags):
    return _bshd_like(q8, _E4M3), q8.new_empty(*q8.shape[:3], 1, dtype=torch.float32), q8.new_empty((), dtype=torch.float32)


cudnn_fp8_sdpa_fwd = define_op(
    "cudnn_fp8_sdpa_fwd(Tensor q8, Tensor k8, Tensor v8, " + ", ".join(f"Tensor {n}" for n in _FWD_SCALARS)
    + ", float softmax_scale, bool causal) -> (Tensor, Tensor, Tensor)",
    {"CUDA": _fwd_op},
    fake=_fwd_fake,
)


def _bwd_op(q8, k8, v8, o8, do8, stats, descale_q, descale_k, descale_v, descale_o, descale_do, descale_s, descale_dp,
            scale_s, scale_dq, scale_dk, scale_dv, scale_dp, softmax_scale: float, causal: bool):  # fmt: skip
    """-> dQ, dK, dV (E4M3, BSHD memory) and their amaxes plus dS's before rounding (fp32 (4,))."""
    dq8, dk8, dv8 = _bshd_like(q8, _E4M3), _bshd_like(k8, _E4M3), _bshd_like(v8, _E4M3)
    amaxes = torch.empty(4, 1, 1, 1, 1, dtype=torch.float32, device=q8.device)
    scalars = (descale_q, descale_k, descale_v, descale_o, descale_do, descale_s, descale_dp,
               scale_s, scale_dq, scale_dk, scale_dv, scale_dp)  # fmt: skip
    with torch.cuda.device(q8.device):
        entry = _bwd_graph(q8, k8, v8, o8, do8, stats, dq8, dk8, dv8, softmax_scale, causal)
        data = dict(zip(_BWD_SCALARS, scalars))
        data.update(q=q8, k=k8, v=v8, o=o8, do=do8, stats=stats, dq=dq8, dk=dk8, dv=dv8,
                    amax_dq=amaxes[0], amax_dk=amaxes[1], amax_dv=amaxes[2], amax_dp=amaxes[3])  # fmt: skip
        _execute(entry, data, q8.device)
    return dq8, dk8, dv8, amaxes.reshape(4)


def _bwd_fake(q8, k8, v8, *rest):
    return _bshd_like(q8, _E4M3), _bshd_like(k8, _E4M3), _bshd_like(v8, _E4M3), q8.new_empty(4, dtype=torch.float32)


cudnn_fp8_sdpa_bwd = define_op(
    "cudnn_fp8_sdpa_bwd(Tensor q8, Tensor k8, Tensor v8, Tensor o8, Tensor do8, Tensor stats, "
    + ", ".join(f"Tensor {n}" for n in _BWD_SCALARS) + ", float softmax_scale, bool causal) -> (Tensor, Tensor, Tensor, Tensor)",
    {"CUDA": _bwd_op},
    fake=_bwd_fake,
)


# ---- autograd -------------------------------------------------------------------------------------


class _CudnnFP8Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, softmax_scale: float, causal: bool, state: DelayedScale, record: bool, out_dtype):
        # q (B, Hq, S, D); k, v (B, Hkv, S, D): any float dtype, any strides.
        (q8, sq, amax_q), (k8, sk, amax_k), (v8, sv, amax_v) = (
            cast_input(t, state, i, record=False) for t, i in ((q, _Q), (k, _K), (v, _V))
        )
        # Inverse scales (descales): the stored ones once the delayed scales are known, so a compiled
        # step launches no reciprocal kernels for them.
        iq, ik, iv = (inverse_scale(state, i, s) for i, s in ((_Q, sq), (_K, sk), (_V, sv)))
        so = cast_scale(state, _O, forward_output_bound(amax_v))
        p_scale, p_descale = _p_scales(q8)
        descales_in = _scalars_4d(iq, ik, iv)

        def run(so):
            return cudnn_fp8_sdpa_fwd(q8, k8, v8, *descales_in, p_descale, p_scale, *_scalars_4d(so), softmax_scale, causal)

        o8, stats, amax_o = run(so)
        if measures_first(state, record):  # first training step: that pass measured amax(O); now cast with it
            so = cast_scale(state, _O, amax_o)
            o8, stats, amax_o = run(so)
        if record:
            record_amaxes(state, {_Q: amax_q, _K: amax_k, _V: amax_v, _O: amax_o})
        descales = torch.stack([iq, ik, iv, inverse_scale(state, _O, so)])
        ctx.save_for_backward(q8, k8, v8, o8, stats, descales, torch.stack([amax_q, amax_k, amax_v]))
        ctx.softmax_scale, ctx.causal, ctx.state = softmax_scale, causal, state
        ctx.in_dtypes = (q.dtype, k.dtype, v.dtype)
        return (o8.float() / so).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q8, k8, v8, o8, stats, descales, amaxes = ctx.saved_tensors
        state, softmax_scale = ctx.state, ctx.softmax_scale
        iq, ik, iv, io = descales.unbind()
        do8, sdo, amax_do = cast_input(grad_out, state, _DO, record=False)
        ido = inverse_scale(state, _DO, sdo)
        groups = q8.shape[1] // k8.shape[1]
        bound_ds, bound_dq, bound_dk, bound_dv = first_step_bounds(
            *amaxes.unbind(), amax_do, q8.shape[-1], q8.shape[2], groups, softmax_scale
        )
        # cuDNN's amax order: dQ, dK, dV, dP (= our dS)
        bounds = torch.stack([bound_dq, bound_dk, bound_dv, bound_ds])
        roles = (_DQ, _DK, _DV, _DS)

        p_scale, p_descale = _p_scales(q8)
        descales_in = _scalars_4d(iq, ik, iv, io, ido)

        def run(amax_or_bound):
            s_dq, s_dk, s_dv, s_ds = (cast_scale(state, i, a) for i, a in zip(roles, amax_or_bound.unbind()))
            out = cudnn_fp8_sdpa_bwd(
                q8, k8, v8, o8, do8, stats, *descales_in, p_descale, *_scalars_4d(1 / s_ds), p_scale,
                *_scalars_4d(s_dq, s_dk, s_dv, s_ds), softmax_scale, ctx.causal,
            )  # fmt: skip
            return out, (s_dq, s_dk, s_dv)

        (dq8, dk8, dv8, grad_amaxes), grad_scales = run(bounds)
        if measures_first(state, True):  # first step: that pass measured the amaxes; now cast with them
            (dq8, dk8, dv8, grad_amaxes), grad_scales = run(grad_amaxes)
        record_amaxes(state, {_DO: amax_do, **dict(zip(roles, grad_amaxes.unbind()))})
        grads = [(g8.float() / s).to(dt) for g8, s, dt in zip((dq8, dk8, dv8), grad_scales, ctx.in_dtypes)]
        return *grads, None, None, None, None, None


def fp8_attention_cudnn(query, key, value, softmax_scale: float, causal: bool, state: DelayedScale, record: bool,
                        out_dtype: torch.dtype | None = None):  # fmt: skip
    """cuDNN FP8 SDPA with `state`'s delayed scales: query (B, Hq, S, D), key/value (B, Hkv, S, D)
    -> (B, Hq, S, D) in `out_dtype` (default query's; a transposed view of BSHD memory). See the module doc."""
    return _CudnnFP8Attention.apply(query, key, value, softmax_scale, causal, state, record, out_dtype or query.dtype)


def warn_reference_fallback(name: str, why: str) -> None:
    warnings.warn(f"hf_fp8 attention in {name} runs the slow pure-PyTorch reference on the GPU: {why}", stacklevel=3)
