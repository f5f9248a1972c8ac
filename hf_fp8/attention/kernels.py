"""Which FP8 attention kernel runs a call, fastest first:
1. cuDNN's fused FP8 SDPA (`cudnn_sdpa.py`): sm_90 with nvidia-cudnn-frontend; causal or unmasked
   attention at head dim 128;
2. hf_fp8's Triton FP8 flash attention (`triton_flash.py`): GPUs with FP8 tensor cores and Triton;
   head dims 32/64/128, causal, unmasked or boolean (padding, sliding-window) masks;
3. the pure-PyTorch reference (`reference.py`): everything else, and the CPU.
Under `torch.use_deterministic_algorithms(True)` cuDNN's kernel is skipped: its FP8 backward on
Hopper has no deterministic mode, while the Triton kernel and the reference are deterministic.
HF_FP8_ATTENTION_KERNEL=auto|cudnn|triton|reference picks one (an unavailable choice raises).
"""

from __future__ import annotations

import torch

from . import cudnn_sdpa, triton_flash

# The choice, read from the environment once (at conversion, outside torch.compile: a module global
# is a constant to dynamo, guarded, so changing it recompiles rather than graph-breaks).
_CHOICE: str | None = None


def _choice() -> str:
    global _CHOICE
    if _CHOICE is None:
        _CHOICE = cudnn_sdpa.kernel_choice()
    return _CHOICE


def _triton_status(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device` (None: they can); raises if they were asked for."""
    choice = _choice()
    if choice in ("cudnn", "reference"):
        return f"{cudnn_sdpa.KERNEL_ENV}={choice}"
    reason = triton_flash.triton_ok(device)
    if reason is not None and choice == "triton":
        raise RuntimeError(f"{cudnn_sdpa.KERNEL_ENV}=triton but {reason}")
    return reason


def kernel_for(query: torch.Tensor, key: torch.Tensor, attention_mask, is_causal: bool) -> tuple[str, str]:
    """(kernel, why the faster kernels do not take this call): kernel is "cudnn", "triton" or "reference"."""
    choice = _choice()
    reasons = []
    if choice in ("auto", "cudnn"):
        kernel, why = cudnn_sdpa.kernel_for(query, key, attention_mask, is_causal)
        if kernel == "cudnn":
            return "cudnn", ""
        reasons.append(f"cuDNN: {why}")
    else:
        reasons.append(f"cuDNN: {cudnn_sdpa.KERNEL_ENV}={choice}")
    why = _triton_status(query.device) or triton_flash.declines(query, key, attention_mask, is_causal)
    if why is None:
        return "triton", "; ".join(reasons)
    reasons.append(f"Triton: {why}")
    return "reference", "; ".join(reasons)


def description(device: torch.device) -> str:
    """One line for reports: which FP8 attention kernels run on `device`. Also checks availability
    once, outside any torch.compile region."""
    choice = _choice()
    cudnn_why = cudnn_sdpa.status(device) if choice in ("auto", "cudnn") else f"{cudnn_sdpa.KERNEL_ENV}={choice}"
    triton_why = _triton_status(device)
    deterministic = cudnn_why is None and torch.are_deterministic_algorithms_enabled()
    if deterministic:
        cudnn_why = cudnn_sdpa.DETERMINISTIC_REASON
    parts = []
    if cudnn_why is None:
        parts.append(f"cuDNN FP8 SDPA (cuDNN {cudnn_sdpa.backend_version()}) for causal/unmasked batches at head dim 128")
    if triton_why is None:
        dims = "/".join(map(str, triton_flash.HEAD_DIMS))
        parts.append(f"hf_fp8's Triton FP8 flash attention for {'other calls' if parts else 'calls'} "
                     f"(head dims {dims}; causal, unmasked or boolean masks)")  # fmt: skip
    if parts:
        note = f" (cuDNN FP8 SDPA not used: {cudnn_why})" if deterministic else ""
        return "; ".join(parts) + "; the pure-PyTorch reference for the rest" + note
    return f"pure-PyTorch reference (cuDNN: {cudnn_why}; Triton: {triton_why})"
