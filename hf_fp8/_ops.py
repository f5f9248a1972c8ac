"""hf_fp8's small torch operators: defined on a `torch.library.Library` rather than with
`torch.library.custom_op`, for their per-call host cost.

These ops run many times per step (`hf_fp8::transpose_fp8` 11 times per Llama layer and
micro-batch under torch.compile, `hf_fp8::scaled_mm_without_onednn` three times per linear on the
CPU, the cuDNN attention ops of `attention/cudnn_sdpa.py` once per layer in forward and backward),
and a custom_op call costs 8-19 us more host time than a Library op (its Python autograd kernel and
argument handling): 47.8 against 29.1 us per CUDA transpose on the H200 machine's host,
19.2 against 8.4 us on the CPU of the development machine (`benchmarks/op_dispatch.py`,
benchmarks/RESULTS.md (33)). Host time matters where the host cannot keep ahead of the GPU (small
micro-batches, eager mode). The ops take and return FP8 or plain tensors that are never
differentiated (hf_fp8's autograd.Functions route the gradients), so their Autograd key falls
through and they need no autograd formula.
"""

from __future__ import annotations

from typing import Callable

import torch

_LIB = torch.library.Library("hf_fp8", "FRAGMENT")  # other hf_fp8 ops are custom_ops of the same namespace


def define_op(schema: str, kernels: dict[str, Callable], fake: Callable, tags: tuple[torch.Tag, ...] = ()):
    """Define `hf_fp8::<schema>` with its kernels by dispatch key ("CPU", or
    "CompositeExplicitAutograd" for every device) and a fake (meta) implementation for
    torch.compile; returns the op's overload, called like a function. `tags`: torch.Tag values of
    the schema, such as `flexible_layout` (inductor passes the op its inputs' buffers as they are
    rather than copies with the strides of the traced call; see cast._transpose_fp8)."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema, tags=tags)
    for key, kernel in kernels.items():
        _LIB.impl(name, kernel, key)
    _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
    torch.library.register_fake(f"hf_fp8::{name}", fake, lib=_LIB)
    return getattr(torch.ops.hf_fp8, name).default
