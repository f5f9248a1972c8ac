"""An inductor graph pass: FP8 conversions without the clamp in front of them, where the generated
code's conversion saturates by itself.

Every FP8 cast of hf_fp8 is `(x.float() * scale).clamp(-max, max).to(fp8)` (cast.to_fp8): PyTorch's
eager conversion does not saturate (to E5M2 an overflow is inf; to E4M3 it is NaN up to torch
2.11), so the clamp is what makes the cast saturating. In the Triton code inductor generates for a
CUDA GPU with FP8 conversions (compute capability 8.9+), the conversion is PTX's
`cvt.rn.satfinite`, which saturates finite and infinite values to +-max and keeps NaN: the clamp
(a NaN-propagating max and min, ~6 instructions per element) changes no bit of the result (H200,
torch 2.11, Triton 3.6: E4M3 and E5M2, overflow, +-inf, NaN, subnormals; RESULTS (38)). It does cost
time: in the training step the FP8 SwiGLU kernels are bound by instructions, not memory, as FP8
GEMMs around them hold the clocks down (H200, 8B slice, per layer: forward 0.43 -> 0.32 ms, backward
0.66 -> 0.52 ms, BF16's own SwiGLU times; all inductor kernels 10.3 -> 8.6 ms per step).

The pass runs after the forward/backward partition (post-grad), so the partitioner sees the same
aten graph as without it, and only where inductor compiles: other torch.compile backends (such as
aot_eager) run the eager ops and keep the clamp. Installed when hf_fp8.cast is imported (unless
HF_FP8_FUSED_CAST=0), chained after a post-grad pass set before it; a pass set later replaces it
(the casts then keep their clamps: slower, the same numbers).
"""

from __future__ import annotations

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

aten, prims = torch.ops.aten, torch.ops.prims
_FP8_MAX = {dtype: torch.finfo(dtype).max for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}


def converts_saturating(device: torch.device) -> bool:
    """True when inductor's code for `device` converts FP32 to FP8 saturating (cvt.rn.satfinite):
    Triton on an NVIDIA GPU of compute capability 8.9+."""
    from .cast import _index, triton_fp8_unavailable

    return device.type == "cuda" and torch.version.hip is None and triton_fp8_unavailable(_index(device)) is None


def _unclamped(node: torch.fx.Node, bound: float) -> tuple[torch.fx.Node | None, list[torch.fx.Node]]:
    """(x, clamp nodes) if `node` is x clamped to [-bound, bound] (clamp, or clamp_min and clamp_max
    in either order, each used once), x an FP32 tensor; else (None, [])."""
    chain = []
    lo = hi = None
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and len(node.users) == 1 and len(chain) < 2:
        if node.target is aten.clamp.default and len(node.args) == 3 and lo is hi is None:
            lo, hi = node.args[1], node.args[2]
        elif node.target is aten.clamp_min.default and lo is None:
            lo = node.args[1]
        elif node.target is aten.clamp_max.default and hi is None:
            hi = node.args[1]
        else:
            break
        chain.append(node)
        node = node.args[0]
        if lo is not None and hi is not None:
            break
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if lo != -bound or hi != bound or not isinstance(val, torch.Tensor) or val.dtype != torch.float32:
        return None, []
    return node, chain


def drop_saturating_clamps(graph: torch.fx.Graph) -> int:
    """Rewrite `convert_element_type(clamp(x, -max, max), fp8)` to `convert_element_type(x, fp8)`
    where the conversion's device `converts_saturating`; returns how many."""
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not prims.convert_element_type.default:
            continue
        src, dtype = node.args[0], node.args[1]
        if dtype not in _FP8_MAX or not isinstance(src, torch.fx.Node):
            continue
        x, chain = _unclamped(src, _FP8_MAX[dtype])
        val = node.meta.get("val")
        if x is None or not isinstance(val, torch.Tensor) or not converts_saturating(val.device):
            continue
        node.replace_input_with(src, x)
        for clamp in chain:  # outermost first: each is unused once the one above it is gone
            graph.erase_node(clamp)
        dropped += 1
    return dropped


class DropSaturatingClamps(CustomGraphPass):
    """The pass as inductor's `post_grad_custom_post_pass`, after `then` (the pass, or list of
    passes, that was set before)."""

    def __init__(self, then=None):
        self.then = [] if then is None else list(then) if isinstance(then, (list, tuple)) else [then]

    def __call__(self, graph: torch.fx.Graph) -> None:
        for other in self.then:
            other(graph)
        drop_saturating_clamps(graph)

    def uuid(self):
        if not all(isinstance(other, CustomGraphPass) for other in self.then):
            return None  # inductor does not cache graphs a plain function rewrote; neither do we
        return (get_hash_for_files((__file__,)), *(other.uuid() for other in self.then))


def install() -> None:
    """Make the pass inductor's post-grad pass (once; after one already set)."""
    current = inductor_config.post_grad_custom_post_pass
    if not isinstance(current, DropSaturatingClamps):
        inductor_config.post_grad_custom_post_pass = DropSaturatingClamps(then=current)


def installed() -> bool:
    """Whether inductor runs the pass (a post-grad pass set after install() replaces it)."""
    return isinstance(inductor_config.post_grad_custom_post_pass, DropSaturatingClamps)
