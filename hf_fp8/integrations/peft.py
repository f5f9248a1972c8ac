"""LoRA (PEFT) on an FP8 base model.

The frozen base linears run in FP8 (forward and grad-input; FP8Linear skips the grad-weight GEMM
when its weight does not require grad), the LoRA adapters (`lora_A`, `lora_B`, ...) stay in high
precision: they are small, and their weights are the only ones that train.

Both orders work:

    convert_peft_model(get_peft_model(model, lora_config))      # convert after wrapping
    get_peft_model(model_converted_by_convert_peft_model, cfg)   # convert before wrapping

PEFT wraps each target nn.Linear in a `lora.Linear` whose `base_layer` is the original layer;
FP8Linear is an nn.Linear subclass, so PEFT accepts it as a base layer, and convert_model finds
`...q_proj.base_layer` inside an existing `lora.Linear`. Adapter modules are never converted: the
recipe used here always skips the name pattern `*lora_*` (adapter modules are named
`...lora_A.default`, so the pattern must match the full dotted name).

For an ordinary checkpoint: `merged = merge_and_revert(peft_model)` merges the adapters into the
base weights, removes the PEFT wrappers and turns every FP8 layer back into nn.Linear; then
`merged.save_pretrained(path)` writes a checkpoint stock transformers loads.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..convert import FP8Report, convert_model, revert_model
from ..recipe import FP8Recipe

__all__ = ["LORA_SKIP_PATTERNS", "convert_peft_model", "is_peft_model", "merge_and_revert", "peft_recipe"]

# Every PEFT adapter module or parameter container carries "lora_" in its dotted name
# (lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector).
LORA_SKIP_PATTERNS = ("*lora_*",)


def peft_recipe(recipe: FP8Recipe | None = None) -> FP8Recipe:
    """`recipe` (default FP8Recipe()) with the LoRA adapter pattern added to `skip`."""
    recipe = recipe or FP8Recipe()
    skip = tuple(recipe.skip) + tuple(p for p in LORA_SKIP_PATTERNS if p not in recipe.skip)
    return dataclasses.replace(recipe, skip=skip)


def is_peft_model(model: nn.Module) -> bool:
    """True if `model` holds PEFT LoRA layers (a PeftModel, or a model LoRA layers were injected into)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def convert_peft_model(model: nn.Module, recipe: FP8Recipe | None = None, **kwargs) -> FP8Report:
    """`convert_model` with the LoRA adapters kept in high precision (see `peft_recipe`). Works on a
    plain model (before `get_peft_model`) and on a PEFT model (the base layers inside `lora.Linear`
    are converted). Extra keyword arguments go to `convert_model`."""
    return convert_model(model, peft_recipe(recipe), **kwargs)


def merge_and_revert(model: nn.Module, *, safe_merge: bool = False) -> nn.Module:
    """Merge the LoRA adapters into the base weights, drop the PEFT wrappers and revert every FP8
    layer to a plain nn.Linear (same Parameters, FP8 scaling state dropped). Returns the plain base
    model (for a PeftModel, the underlying transformers model), ready for `save_pretrained`.
    A model without LoRA layers is only reverted."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload(safe_merge=safe_merge)
    elif is_peft_model(model):
        raise TypeError(
            "merge_and_revert: the model holds LoRA layers but no merge_and_unload (pass the PeftModel "
            "returned by peft.get_peft_model)"
        )
    revert_model(model)
    return model
