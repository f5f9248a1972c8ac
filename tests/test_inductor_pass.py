"""hf_fp8._inductor_pass: under torch.compile, FP8 conversions lose the clamp in front of them only
where the generated conversion saturates by itself (CUDA, Triton's cvt.rn.satfinite), so every
compiled cast gives the eager reference's bits; the pass rewrites exactly the saturating clamp.
CUDA cases run on the GPU machine."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.utils import run_and_get_code

import hf_fp8
from hf_fp8 import _inductor_pass, cast
from helpers import train_compiled_llama_layer

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (the H200 runs these)")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
aten, prims = torch.ops.aten, torch.ops.prims


@pytest.fixture
def fresh_inductor(monkeypatch):
    """Every compile lowers its graph (no FX graph cache hit from another test's variant) and counts
    the clamps the pass drops."""
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    torch._dynamo.reset()
    dropped = []
    drop = _inductor_pass.drop_saturating_clamps

    def counted(graph):
        dropped.append(drop(graph))
        return dropped[-1]

    monkeypatch.setattr(_inductor_pass, "drop_saturating_clamps", counted)
    yield dropped
    torch._dynamo.reset()


def hard_values(device):
    """Random values over ~8 decades with overflow, +-inf, NaN, ties and subnormals in front: FP32."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(96, 128, generator=gen) * torch.exp(torch.randn(96, 128, generator=gen) * 4)
    specials = [float("inf"), -float("inf"), float("nan"), 1e6, -1e6, 449.0, 464.0, 480.0, 57344.0, 61440.0,
                -61441.0, 1e38, 2.0**-10, 2.0**-17, 3 * 2.0**-18, -0.0]  # fmt: skip
    x.view(-1)[: len(specials)] = torch.tensor(specials)
    return x.to(device)


def same_bits(a, b):
    """Bit-identical, NaN counted equal to NaN (the sign of a NaN is not a value)."""
    nan = a.float().isnan()
    return torch.equal(nan, b.float().isnan()) and torch.equal(a.view(torch.uint8)[~nan], b.view(torch.uint8)[~nan])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", FP8)
def test_compiled_cast_saturates_like_the_reference(fresh_inductor, device, fp8):
    """The compiled cast of values that overflow, inf and NaN is the eager cast, bit for bit; the pass
    dropped the clamp on CUDA only. (On the CPU inductor's C++ conversion to E5M2 gives inf for an
    overflow: without the device check this test fails there.)"""
    x, scale = hard_values(device), torch.tensor(3.5, device=device)
    compiled = torch.compile(lambda x, s: cast.to_fp8(x, s, fp8))
    y, (code,) = run_and_get_code(compiled, x, scale)
    assert same_bits(y, cast.to_fp8(x, scale, fp8))
    values = y.float()
    assert values.isnan().sum() == 1 and values[~values.isnan()].abs().max() == torch.finfo(fp8).max
    assert fresh_inductor == ([1] if device == "cuda" else [0])
    if device == "cuda":  # no clamp left in the Triton kernel
        assert "triton_helpers.maximum" not in code and "triton_helpers.minimum" not in code


def _post_grad_graph(fn, *args):
    """fn's aten graph after inductor's decompositions (clamp as clamp_min and clamp_max), as the
    post-grad passes see it, with FakeTensor values in node.meta["val"]."""
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args).graph


def _count(graph, target):
    return sum(n.op == "call_function" and n.target is target for n in graph.nodes)


def test_pass_drops_exactly_the_saturating_clamp(monkeypatch):
    """Where the device's conversion saturates (pretended here for the CPU), the pass drops the clamp
    of an FP32 tensor to +-max of the FP8 format it is converted to, in every spelling of it, and
    nothing else: other bounds, a non-FP8 target, a BF16 source, a clamped value also used elsewhere,
    or a device whose conversion does not saturate."""
    e4, e5 = FP8
    m4, m5 = (torch.finfo(d).max for d in FP8)

    def fn(x, xb):
        return (
            x.clamp(-m4, m4).to(e4),  # dropped
            x.clamp(min=-m5).clamp(max=m5).to(e5),  # dropped (two clamps, min first)
            x.clamp(max=m4).clamp(min=-m4).to(e4),  # dropped (max first)
            x.clamp(-400.0, 400.0).to(e4),  # other bounds: kept
            x.clamp(-m5, m5).to(e4),  # E5M2's bounds, E4M3 target: kept
            x.clamp(-m4, m4).to(torch.bfloat16),  # not FP8: kept
            xb.clamp(-m4, m4).to(e4),  # BF16 source: kept
        )

    x, xb = torch.randn(8, 16), torch.randn(8, 16, dtype=torch.bfloat16)
    graph = _post_grad_graph(fn, x, xb)
    clamps = _count(graph, aten.clamp_min.default) + _count(graph, aten.clamp_max.default)
    assert _count(graph, aten.clamp.default) == 0 and clamps == 14
    assert _inductor_pass.drop_saturating_clamps(graph) == 0  # the CPU's conversion does not saturate

    monkeypatch.setattr(_inductor_pass, "converts_saturating", lambda device: True)
    assert _inductor_pass.drop_saturating_clamps(graph) == 3
    graph.lint()
    assert _count(graph, aten.clamp_min.default) + _count(graph, aten.clamp_max.default) == clamps - 6
    converts = [n for n in graph.nodes if n.target is prims.convert_element_type.default and n.args[1] in FP8]
    assert [n.args[0].op for n in converts] == ["placeholder"] * 3 + ["call_function"] * 3  # the first three read x

    def shared(x):  # the clamped value is also an output: the clamp stays
        c = x.clamp(-m4, m4)
        return c.to(e4), c

    graph = _post_grad_graph(shared, x)
    assert _inductor_pass.drop_saturating_clamps(graph) == 0

    # aten.clamp itself, as a graph may hold it where clamp is not decomposed
    table = {op: fn for op, fn in select_decomp_table().items() if op is not aten.clamp.default}
    graph = make_fx(lambda x: x.clamp(-m5, m5).to(e5), decomposition_table=table, tracing_mode="fake")(x).graph
    assert _count(graph, aten.clamp.default) == 1
    assert _inductor_pass.drop_saturating_clamps(graph) == 1 and _count(graph, aten.clamp.default) == 0


class _Marker(CustomGraphPass):
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return "marker"


def test_install_runs_after_a_pass_set_before_and_keys_the_cache_on_both(monkeypatch):
    cfg = torch._inductor.config
    assert _inductor_pass.installed()  # hf_fp8.cast installed it on import
    marker = _Marker()
    monkeypatch.setattr(cfg, "post_grad_custom_post_pass", marker)
    assert not _inductor_pass.installed()
    _inductor_pass.install()
    chained = cfg.post_grad_custom_post_pass
    assert _inductor_pass.installed() and chained.then == [marker]
    _inductor_pass.install()  # once
    assert cfg.post_grad_custom_post_pass is chained
    chained(torch.fx.Graph())
    assert marker.calls == 1
    uuid = chained.uuid()
    assert uuid[1:] == ("marker",) and uuid[0] == _inductor_pass.DropSaturatingClamps().uuid()[0]
    # A plain function set before: inductor caches nothing it rewrote, so the chain gives no uuid.
    monkeypatch.setattr(cfg, "post_grad_custom_post_pass", lambda graph: None)
    _inductor_pass.install()
    assert cfg.post_grad_custom_post_pass.uuid() is None


@cuda
def test_compiled_training_is_bitwise_the_same_without_the_clamps(monkeypatch):
    """A compiled Llama layer trained 5 steps on the GPU ends with bitwise the same losses, weights,
    scales and amax histories with the pass as without it."""
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    runs = []
    for with_pass in (False, True):
        monkeypatch.setattr(torch._inductor.config, "post_grad_custom_post_pass",
                            _inductor_pass.DropSaturatingClamps() if with_pass else None)  # fmt: skip
        runs.append(train_compiled_llama_layer("cuda", hf_fp8.FP8Recipe(share_input_scales=True)))
    torch._dynamo.reset()
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))
