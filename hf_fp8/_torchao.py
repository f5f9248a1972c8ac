"""The torchao float8 primitives hf_fp8 builds on, imported in one place.

On a CPU-only torch, torchao logs that its CUDA extensions failed to load, and torch logs a
deprecation notice about torchao's pytree registration of enums; neither affects the float8
training path, so both are filtered (only those messages).
"""

import logging

import torch


class _DropKnownImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if torch.version.cuda is None and msg.startswith("Failed to load") and "torchao/_C" in msg:
            return False
        return "is now natively supported by torch.compile as an opaque value type" not in msg


# Kept installed: torchao registers more enums lazily (e.g. when transformers imports it later).
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_DropKnownImportNoise())

import torchao  # noqa: E402,F401
from torchao.float8.float8_utils import to_fp8_saturated  # noqa: E402
from torchao.float8.float8_training_tensor import (  # noqa: E402
    Float8TrainingTensor,
    GemmInputRole,
    LinearMMConfig,
    ScaledMMConfig,
    hp_tensor_and_scale_to_float8,
)

__all__ = [
    "Float8TrainingTensor",
    "GemmInputRole",
    "LinearMMConfig",
    "ScaledMMConfig",
    "hp_tensor_and_scale_to_float8",
    "to_fp8_saturated",
]
