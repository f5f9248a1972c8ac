"""fp8_stats: the delayed-scaling state of every FP8 tensor of a model, readable on the host.

Reading it syncs with the device; call it on logging steps, not every step.
"""

from __future__ import annotations

import torch
from torch import nn

from .scaling import delayed_scale_states


@torch.no_grad()
def fp8_stats(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """layer name -> role -> {scale, amax (history reduced with the recipe's algo), last_amax,
    initialized, nonfinite_skips}. Layer names are the FP8 modules' names in `model`."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, state in delayed_scale_states(model):
        history = state.amax_history.float().cpu()
        reduced = history.amax(dim=1) if state.amax_compute_algo == "max" else history[:, 0]
        roles = {}
        for i, role in enumerate(state.roles):
            roles[role] = {
                "scale": state.scale[i].item(),
                "amax": reduced[i].item(),
                "last_amax": history[i, 0].item(),
                "initialized": bool(state.initialized[i].item()),
                "nonfinite_skips": int(state.nonfinite_skips[i].item()),
            }
        out[name] = roles
    return out
