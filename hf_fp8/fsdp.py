"""FP8 weight all-gather for FSDP2 with the *delayed* weight scale (opt-in).

`hf_fp8.distributed.enable_fp8_all_gather(model)` (after `convert_model`, before `fully_shard`) wraps
the weight of every FP8Linear / FP8Conv1D in `DelayedFloat8AllGatherWeight`. FSDP2 then calls its
all-gather extension hooks instead of all-gathering the high-precision shards:

  fsdp_pre_all_gather   casts this rank's LOCAL shard to the layer's weight FP8 dtype (E4M3) with the
                        layer's delayed weight scale and all-gathers the 1-byte FP8 data (half the
                        bytes of a BF16 all-gather, a quarter of FP32). In train() mode it records the
                        shard's amax into the pending weight amax; `update_scales`' one all-reduce
                        (MAX) per step turns the shard amaxes into the full weight's amax.
  fsdp_post_all_gather  wraps the gathered FP8 data in a torchao `Float8TrainingTensor` (the scale,
                        role WEIGHT, hf_fp8's LinearMMConfig); `fp8_matmul` uses an already-FP8 weight
                        as is (no re-cast, no amax recording there).

The scale is identical on every rank, as it must be for the gathered shards to form one tensor:
after the first `update_scales` it is the delayed scale (replicated by that all-reduce). Before it
(role not `initialized`), pre_all_gather all-reduces (MAX, over the FSDP shard group) the shard
amaxes and uses the dynamic scale of the full weight: exactly the scale the high-precision
all-gather path would compute from the unsharded weight. So with fp32 parameters the FP8 weights,
and the whole training run, are bitwise those of the high-precision all-gather. That extra scalar
all-reduce runs only while the weight role is uninitialized (the first step); deciding it reads
`initialized` on the host only until it is True (`DelayedScale.initialized_on_host`), so steady
state has no device->host copy.

The parameter stays a high-precision (fp32) shard wrapped in the subclass: the optimizer steps the
fp32 shard in place (ops other than the few FSDP needs to keep the subclass, see
`_OPS_PRESERVING_SUBCLASS`, return plain tensors, so optimizer states are plain), and
`state_dict()` of a wrapped layer holds the plain shard (a state-dict post-hook unwraps it), so
checkpoints (DCP included) never see the subclass. Modelled on torchao's
`torchao.float8.fsdp_utils.WeightWithDynamicFloat8CastTensor`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn
from torch._prims_common import suggest_memory_format

from ._torchao import Float8TrainingTensor, GemmInputRole, hp_tensor_and_scale_to_float8
from .linear import _MM_CONFIG, _WEIGHT
from .scaling import amax_of, cast_scale, record_amax

# FSDP2 chunks/pads/copies the parameter when sharding: these keep the subclass (as torchao's list).
_OPS_PRESERVING_SUBCLASS = {
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.copy_.default,
    torch.ops.aten.view.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten._pin_memory.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.clone.default,
}


class DelayedFloat8AllGatherWeight(torch.Tensor):
    """A high-precision weight (shard) whose FSDP2 all-gather sends FP8 cast with the owning
    layer's delayed weight scale. Everything else behaves as the wrapped tensor."""

    @staticmethod
    def __new__(cls, tensor: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls,
            tensor.size(),
            strides=tensor.stride(),
            storage_offset=tensor.storage_offset(),
            memory_format=suggest_memory_format(tensor),
            dtype=tensor.dtype,
            layout=tensor.layout,
            device=tensor.device,
            pin_memory=tensor.is_pinned(),
            requires_grad=tensor.requires_grad,
        )

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        if func == torch.ops.aten.detach.default:
            return cls(args[0]._tensor)
        args, kwargs = pytree.tree_map_only(cls, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _OPS_PRESERVING_SUBCLASS:
            return out
        return pytree.tree_map_only(torch.Tensor, cls, out)

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, flatten_spec, outer_size, outer_stride):
        return DelayedFloat8AllGatherWeight(inner_tensors["_tensor"])

    def __repr__(self):
        return f"DelayedFloat8AllGatherWeight({self._tensor})"

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        state = getattr(module, "fp8_scale", None)
        if state is None:
            raise RuntimeError(
                f"DelayedFloat8AllGatherWeight: the owning module {type(module).__name__} has no FP8 "
                "scaling state (fp8_scale); enable_fp8_all_gather only wraps FP8Linear/FP8Conv1D weights"
            )
        shard = self._tensor
        with torch.no_grad():
            if shard.numel():
                amax = amax_of(shard)
            else:  # a rank holding no rows of an unevenly sharded weight
                amax = torch.zeros((), dtype=torch.float32, device=shard.device)
            if state.training:
                record_amax(state, _WEIGHT, amax)
            if not state.initialized_on_host(_WEIGHT):
                # Before the first update: dynamic scale of the FULL weight, identical on all ranks.
                amax = amax.clone()
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
            scale = cast_scale(state, _WEIGHT, amax)
            fp8 = hp_tensor_and_scale_to_float8(
                shard, scale, state.dtypes[_WEIGHT], _MM_CONFIG, GemmInputRole.WEIGHT
            )._data
            padded_rows = -(-outer_size[0] // mesh.size())
            if fp8.shape[0] != padded_rows:  # uneven sharding: FSDP all-gathers padded shards
                padded = torch.zeros((padded_rows, *fp8.shape[1:]), dtype=fp8.dtype, device=fp8.device)
                padded[: fp8.shape[0]].copy_(fp8)
                fp8 = padded
        return (fp8,), (scale,)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (data,) = all_gather_outputs
        (scale,) = metadata
        if out is not None:  # re-unshard into the storage of the previous unsharded parameter
            from torch.distributed.tensor import DTensor

            inner = out._local_tensor if isinstance(out, DTensor) else out
            if not isinstance(inner, Float8TrainingTensor):
                raise RuntimeError(f"fsdp_post_all_gather: expected a Float8TrainingTensor out, got {type(inner)}")
            inner._scale = scale
            return
        return Float8TrainingTensor(data, scale, param_dtype, _MM_CONFIG, gemm_input_role=GemmInputRole.WEIGHT), (data,)


def _unwrap_state_dict_hook(module, state_dict, prefix, local_metadata):
    """state_dict holds the plain high-precision shard (DTensor or tensor), never the subclass."""
    from torch.distributed.tensor import DTensor

    key = prefix + "weight"
    t = state_dict.get(key)
    if isinstance(t, DTensor) and isinstance(t._local_tensor, DelayedFloat8AllGatherWeight):
        state_dict[key] = DTensor(t._local_tensor._tensor, t._spec, requires_grad=t.requires_grad)
    elif isinstance(t, DelayedFloat8AllGatherWeight):
        state_dict[key] = t._tensor


def wrap_weight(module: nn.Module) -> bool:
    """Wrap `module.weight` (an FP8 layer's) in DelayedFloat8AllGatherWeight; False if already wrapped."""
    from torch.distributed.tensor import DTensor

    w = module.weight
    if isinstance(w, DTensor):
        raise RuntimeError("enable_fp8_all_gather: call it before fully_shard (the weight is already a DTensor)")
    if isinstance(w, DelayedFloat8AllGatherWeight):
        return False
    module.weight = nn.Parameter(DelayedFloat8AllGatherWeight(w.data), requires_grad=w.requires_grad)
    module.register_state_dict_post_hook(_unwrap_state_dict_hook)
    return True


torch.serialization.add_safe_globals([DelayedFloat8AllGatherWeight])
