"""Helpers for hf_fp8 under torch.distributed (DDP, FSDP2).

The FP8 delayed-scaling state (every `DelayedScale` buffer: amax histories, scales, pending amaxes)
is replicated on every rank and kept identical by `update_scales`, whose one all-reduce (MAX) of all
pending amaxes runs once per optimizer step. No other synchronisation of these buffers is needed,
and one is harmful: DDP's default `broadcast_buffers=True` copies every buffer from rank 0 before a
forward that follows a gradient-synchronising forward; with gradient accumulation *without*
`no_sync()` this overwrites the amaxes the other ranks recorded in the earlier micro-batches of the
step (they never reach the all-reduce). `ddp_ignore_fp8_buffers(model)` excludes them.

`enable_fp8_all_gather(model)` (opt-in, FSDP2): all-gather FP8 weights cast with the delayed weight
scale instead of the high-precision shards (see hf_fp8.fsdp).
"""

from __future__ import annotations

import torch
from torch import nn

from .scaling import scale_buffers


def fp8_buffer_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every DelayedScale buffer of `model` (persistent or not)."""
    return [name for name, _ in scale_buffers(model)]


def ddp_ignore_fp8_buffers(model: nn.Module) -> nn.Module:
    """Exclude `model`'s FP8 scaling buffers from DDP's buffer broadcast (and bucketing). Call on the
    converted model *before* wrapping it in `DistributedDataParallel`; keeps names already in
    `model._ddp_params_and_buffers_to_ignore`. Returns `model`. Equivalent, and simpler when the
    model has no other buffers that need syncing: `DistributedDataParallel(model, broadcast_buffers=False)`."""
    names = fp8_buffer_names(model)
    if not names:
        raise ValueError("ddp_ignore_fp8_buffers: the model has no FP8 layers; call hf_fp8.convert_model(model) first")
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    merged = existing + [n for n in names if n not in existing]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, merged)
    return model


def enable_fp8_all_gather(model: nn.Module) -> nn.Module:
    """Opt in to FSDP2 all-gathers of FP8 weights (1 byte/element) cast with each layer's delayed
    weight scale, instead of the fp32/bf16 shards (hf_fp8.fsdp has the details). Call after
    `hf_fp8.convert_model` and before `fully_shard`, and create the optimizer afterwards: every
    FP8Linear/FP8Conv1D weight becomes a new Parameter wrapping the same data. Weights shared with
    another module (tied) are refused. Idempotent; returns `model`."""
    from .fsdp import wrap_weight
    from .linear import FP8Conv1D, FP8Linear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Conv1D))]
    if not layers:
        raise ValueError("enable_fp8_all_gather: the model has no FP8 layers; call hf_fp8.convert_model(model) first")
    owners: dict[int, int] = {}
    for _, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for name, m in layers:
        if owners.get(id(m.weight), 0) > 1:
            raise ValueError(f"enable_fp8_all_gather: {name}.weight is shared with another module (tied weights)")
    for _, m in layers:
        wrap_weight(m)
    return model
