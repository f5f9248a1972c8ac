"""FP8Linear numerics against high-precision nn.Linear, on the real torch._scaled_mm path (CPU).

Tolerance: SQNR >= 20 dB for output, grad-input and grad-weight (E4M3 has 3 mantissa bits, E5M2
two; torchao's tensorwise recipe reaches 24-28 dB on such layers).
"""

import copy
import re

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import hf_fp8
from hf_fp8.linear import FP8Conv1D
from helpers import sqnr, train_compiled_llama_layer

MIN_SQNR_DB = 20.0
# CI runs the CPU cases; on the GPU machine the same tests run on CUDA too (torch._scaled_mm there
# has real layout and alignment rules the CPU kernel does not).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def run_pair(fp8_layer, ref_layer, x, grad_out, autocast=False):
    """Forward + backward of both layers on the same input; returns (fp8, ref) of (out, dx, dw)."""
    results = []
    device = fp8_layer.weight.device
    dtype = torch.float32 if autocast else fp8_layer.weight.dtype
    x, grad_out = x.to(device, dtype), grad_out.to(device, dtype)
    for layer in (fp8_layer, ref_layer):
        xi = x.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = layer(xi)
        out.backward(grad_out.to(out.dtype))
        results.append((out.detach(), xi.grad, layer.weight.grad.clone()))
        layer.weight.grad = None
    return results


def make_pair(in_f, out_f, dtype, bias=True, device="cpu"):
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)
    fp8 = nn.Linear(in_f, out_f, bias=bias, dtype=dtype, device=device)
    fp8.load_state_dict(ref.state_dict())
    return hf_fp8.FP8Linear.from_linear(fp8), ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_high_precision(dtype, bias, device):
    fp8, ref = make_pair(256, 128, dtype, bias, device)
    x = torch.randn(4, 32, 256, dtype=dtype)
    grad_out = torch.randn(4, 32, 128, dtype=dtype)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run_pair(fp8, ref, x, grad_out)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert sqnr(y_ref, y) >= MIN_SQNR_DB
    assert sqnr(dx_ref, dx) >= MIN_SQNR_DB
    assert sqnr(dw_ref, dw) >= MIN_SQNR_DB


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_linear_under_autocast_keeps_fp32_master_weights(device):
    fp8, ref = make_pair(128, 64, torch.float32, device=device)
    x = torch.randn(64, 128)
    grad_out = torch.randn(64, 64)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run_pair(fp8, ref, x, grad_out, autocast=True)
    # Same output dtype rule as F.linear under autocast; weight grads land in the fp32 master dtype.
    assert y.dtype == torch.bfloat16 and y_ref.dtype == torch.bfloat16
    assert dw.dtype == torch.float32
    assert sqnr(y_ref, y) >= MIN_SQNR_DB
    assert sqnr(dx_ref, dx) >= MIN_SQNR_DB
    assert sqnr(dw_ref, dw) >= MIN_SQNR_DB


@pytest.mark.parametrize("device", DEVICES)
def test_token_count_not_multiple_of_16(device):
    # 3 x 7 = 21 tokens: the grad-weight GEMM reduces over tokens, so its inner dim gets padded.
    fp8, ref = make_pair(64, 32, torch.bfloat16, device=device)
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run_pair(fp8, ref, torch.randn(3, 7, 64), torch.randn(3, 7, 32))
    assert min(sqnr(y_ref, y), sqnr(dx_ref, dx), sqnr(dw_ref, dw)) >= MIN_SQNR_DB


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt, grad_dtype", [("hybrid", torch.float8_e5m2), ("e4m3", torch.float8_e4m3fn)])
def test_all_three_gemms_run_in_fp8(monkeypatch, fmt, grad_dtype, device):
    """Forward E4M3xE4M3, grad-input and grad-weight (grad format)xE4M3, each one torch._scaled_mm."""
    calls = []
    real = torch._scaled_mm

    def spy(a, b, *args, **kwargs):
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape)))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    torch.manual_seed(0)
    layer = hf_fp8.FP8Linear(64, 32, recipe=hf_fp8.FP8Recipe(fp8_format=fmt), device=device, dtype=torch.bfloat16)
    x = torch.randn(16, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    layer(x).backward(torch.randn(16, 32, device=device, dtype=torch.bfloat16))
    e4m3 = torch.float8_e4m3fn
    assert calls == [
        (e4m3, e4m3, (16, 64), (64, 32)),  # out = x @ w.T
        (grad_dtype, e4m3, (16, 32), (32, 64)),  # grad_input = go @ w
        (grad_dtype, e4m3, (32, 16), (16, 64)),  # grad_weight = go.T @ x
    ]


def test_backward_saves_fp8_not_high_precision_activations():
    layer = hf_fp8.FP8Linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    fp8_saved = sorted((tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn))
    # x and w as FP8 (1 byte per element); backward transposes them (on CPU; the eager CUDA cast
    # writes the transposed copies directly, and those are what is kept, test_cast.py).
    assert fp8_saved == [(16, 64), (32, 64)]
    assert not any(t.dtype in (torch.bfloat16, torch.float32) and t.numel() > 1 for t in saved)


def test_backward_keeps_only_what_its_gemms_read():
    """A frozen weight (LoRA base layer) needs no grad-weight GEMM, so no copy of the input is kept;
    an input that needs no gradient keeps no weight copy."""
    layer = hf_fp8.FP8Linear(64, 32, dtype=torch.bfloat16)

    def fp8_saved(x):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = layer(x)
        return sorted(tuple(t.shape) for t in saved if t.dtype == torch.float8_e4m3fn), out

    layer.weight.requires_grad_(False)
    x = torch.randn(16, 64, dtype=torch.bfloat16, requires_grad=True)
    shapes, out = fp8_saved(x)
    assert shapes == [(32, 64)]  # the weight only
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    layer.weight.requires_grad_(True)
    shapes, out = fp8_saved(torch.randn(16, 64, dtype=torch.bfloat16))
    assert shapes == [(16, 64)]  # the input only
    out.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_from_linear_shares_parameters_and_to_linear_reverts():
    lin = nn.Linear(32, 48)
    fp8 = hf_fp8.FP8Linear.from_linear(lin)
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    back = fp8.to_linear()
    assert type(back) is nn.Linear and back.weight is lin.weight
    x = torch.randn(5, 32)
    torch.testing.assert_close(back(x), lin(x), rtol=0, atol=0)


def test_fp8_dims_must_be_multiples_of_16():
    with pytest.raises(ValueError, match="in_features=30 not a multiple of 16"):
        hf_fp8.FP8Linear(30, 32)
    with pytest.raises(ValueError, match="out_features=40 not a multiple of 16"):
        hf_fp8.FP8Linear.from_linear(nn.Linear(32, 40))


def test_fp8_conv1d_matches_conv1d():
    torch.manual_seed(0)
    ref = Conv1D(96, 64)  # nf=96 outputs, nx=64 inputs; weight stored (64, 96)
    with torch.no_grad():
        ref.bias.normal_()
    conv = Conv1D(96, 64)
    conv.load_state_dict(ref.state_dict())
    fp8 = FP8Conv1D.from_conv1d(conv)
    assert fp8.weight is conv.weight
    (y, dx, dw), (y_ref, dx_ref, dw_ref) = run_pair(fp8, ref, torch.randn(2, 16, 64), torch.randn(2, 16, 96))
    assert min(sqnr(y_ref, y), sqnr(dx_ref, dx), sqnr(dw_ref, dw)) >= MIN_SQNR_DB
    assert type(fp8.to_conv1d()) is Conv1D


def test_outputs_are_not_trivially_equal_to_high_precision():
    """Guards the SQNR tests: the FP8 path must actually quantize (an exact match means no FP8)."""
    fp8, ref = make_pair(128, 64, torch.float32)
    x = torch.randn(32, 128)
    assert not torch.equal(fp8(x), ref(x))


def graph_keeping_backend(graphs: dict):
    """A torch.compile backend that runs the AOT forward and backward graphs as they are (min-cut
    partitioned, as inductor's) and stores them in `graphs` under "forward" / "backward"."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                        partition_fn=min_cut_rematerialization_partition, keep_inference_input_mutations=True)  # fmt: skip


def test_compiled_fp8_gemms_on_the_cpu_run_without_onednn():
    """On the CPU the FP8 GEMMs switch oneDNN off (it has no FP8 kernels on most CPUs: ~50-150x
    slower). Traced by torch.compile that switch fell out of the graph, so every compiled GEMM ran in
    oneDNN (a 2-layer toy model: 15 s per step against 0.34 s). Compiled, each GEMM must be the op
    that switches inside it, give the eager result bit for bit, and leave oneDNN on for the rest."""
    graphs = {}
    torch.manual_seed(0)
    layer = hf_fp8.FP8Linear(64, 32, dtype=torch.bfloat16)
    eager = copy.deepcopy(layer)
    x = torch.randn(48, 64, dtype=torch.bfloat16)
    grad = torch.randn(48, 32, dtype=torch.bfloat16)
    for module in (layer, eager):  # the steady state, so that both cast with the same scales
        module(x.clone().requires_grad_()).backward(grad)
        hf_fp8.update_scales(module)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=graph_keeping_backend(graphs))
    results = []
    for module in (compiled, eager):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.backward(grad)
        results.append((out, xi.grad, layer.weight.grad if module is compiled else eager.weight.grad))
    for name, gm in graphs.items():
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert not [t for t in targets if "aten._scaled_mm" in t], (name, targets)
        assert sum("hf_fp8.scaled_mm_without_onednn" in t for t in targets) == (1 if name == "forward" else 2), name
    for got, want in zip(*results):
        assert torch.isfinite(want.float()).all() and torch.equal(got, want)
    assert torch.backends.mkldnn.enabled


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_steady_state_step_computes_no_scale_reciprocal_and_one_amax_update_per_pass(device):
    """Under torch.compile every extra op of the scaling bookkeeping becomes a kernel launch of its
    own (host time that small micro-batches cannot hide). Once the delayed scales are known, the
    forward and backward graphs of an FP8Linear must take the GEMMs' inverse scales from the state
    (no reciprocal: there were two per GEMM) and update the pending amaxes with one copy per pass
    (the forward had one per recorded role). On the CPU with torch 2.11 (the GPU machine's) this
    fullgraph compile used to fail at the FP8 GEMMs' oneDNN switch ("HOP: Unsafe side effect")."""
    graphs = {}
    torch.manual_seed(0)
    layer = hf_fp8.FP8Linear(64, 32, recipe=hf_fp8.FP8Recipe(), device=device, dtype=torch.bfloat16)
    x = torch.randn(16, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # on CUDA the steady state is known one update late
        layer(x).float().square().mean().backward()
        hf_fp8.update_scales(layer)
    assert layer.fp8_scale.updated_on_host
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=graph_keeping_backend(graphs))
    compiled(x).float().square().mean().backward()
    assert set(graphs) == {"forward", "backward"}
    for name, gm in graphs.items():
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert sum("scaled_mm" in t for t in targets) == (1 if name == "forward" else 2), name
        assert not [t for t in targets if "reciprocal" in t or t.startswith("aten.div")], (name, targets)
        assert sum(t == "aten.copy_.default" for t in targets) == 1, (name, targets)
    # ...and the amaxes were recorded (input and weight by the forward, grad-output by the backward).
    assert (layer.fp8_scale.pending_amax > 0).all()


def test_compiled_llama_layer_with_dynamic_shapes_trains_at_two_lengths():
    """With dynamic shapes the token count is symbolic; the transpose_op test on it crashed
    dynamo when it was written `n in range(first, end)` (AsPythonConstantNotImplementedError)."""
    import transformers
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=DEVICES[-1], dtype=torch.bfloat16)
    hf_fp8.convert_model(model, hf_fp8.FP8Recipe(share_input_scales=True))
    model.model.layers[0].compile(dynamic=True, backend="aot_eager")
    for seq in (32, 48):
        ids = torch.randint(0, 128, (2, seq), device=DEVICES[-1])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("share,min_tokens,expected", [(True, 64, 11), (False, 64, 14), (True, 65, 0)])
def test_compiled_llama_layer_makes_transposed_fp8_copies_with_the_op_from_the_token_threshold(
        monkeypatch, share, min_tokens, expected):  # fmt: skip
    """The grad-weight GEMMs read each linear's FP8 input and grad-output transposed. Fused into the
    kernel that produces the FP8 tensor (a row-wise reduction: amax, RMSNorm backward), inductor
    wrote that copy one byte per token row: as a plain transpose of the q/k/v input, it recomputed
    the RMSNorm in backward and stored the copy three times from the norm-backward kernel (0.37 ms
    per layer at 4096 tokens, 1.5B shape, H200), and the SwiGLU backward with the gate/up
    grad-outputs' copies took 1.37 ms per layer at the 8B slice against 0.74 without. From
    _TRANSPOSE_OP_MIN_TOKENS tokens (here 2 x 32 = 64) every copy is the opaque
    hf_fp8::transpose_fp8, once per FP8 tensor: the inputs (shared by q/k/v and by gate/up with
    shared input scales: 4, else 7) and the 7 grad-outputs; below it, none."""
    import transformers
    monkeypatch.setattr(hf_fp8.linear, "_TRANSPOSE_OP_MIN_TOKENS", min_tokens)
    graphs = {}
    device = DEVICES[-1]
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    hf_fp8.convert_model(model, hf_fp8.FP8Recipe(share_input_scales=share))
    ids = torch.randint(0, 128, (2, 32), device=device)
    model.model.layers[0].compile(backend=graph_keeping_backend(graphs))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    counts = {name: sum(n.op == "call_function" and "transpose_fp8" in str(n.target) for n in gm.graph.nodes)
              for name, gm in graphs.items()}  # fmt: skip
    assert sum(counts.values()) == expected, counts  # forward or backward: the partitioner's choice


def _fp8_buffers_written_by_kernels(code: str) -> int:
    """How many FP8 outputs the fused kernels of inductor's generated `code` write: `at::Float8_*`
    out_ptr parameters of its C++ kernels (CPU), `*fp8...` out_ptr signature entries of its Triton
    kernels (CUDA)."""
    return len(re.findall(r"at::Float8_\w+\*\s+out_ptr\d+", code)) + len(re.findall(r"'out_ptr\d+': '\*fp8", code))


def _compiled_steady_state_codes(monkeypatch, device, weight_op: bool) -> list[str]:
    """Inductor's generated code (forward, backward) of a compiled FP8Linear (128 tokens, transposed
    copies by transpose_fp8) in the steady state, with the weight cast by cast_weight_fp8
    (FP8Recipe.cast_weights_once) or not."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(hf_fp8.linear, "_TRANSPOSE_OP_MIN_TOKENS", 64)
    torch._dynamo.reset()
    torch.manual_seed(0)
    recipe = hf_fp8.FP8Recipe(cast_weights_once=weight_op)
    linear = hf_fp8.FP8Linear(64, 128, bias=False, dtype=torch.bfloat16, device=device, recipe=recipe)
    x = torch.randn(128, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    compiled = torch.compile(linear)

    def step():
        compiled(x).float().square().sum().backward()
        hf_fp8.update_scales(linear)

    for _ in range(3):  # past the first steps' dynamic scales
        step()
    with torch._inductor.config.patch(force_disable_caches=True):
        torch._dynamo.reset()
        _, codes = run_and_get_code(step)
    return codes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weight_op", [False, True])
def test_compiled_linear_writes_each_fp8_tensor_once(monkeypatch, device, weight_op):
    """An FP8 tensor that both a GEMM and transpose_fp8 read was written twice by inductor, from the
    same kernel: each consumer's stride requirement copied the unrealized cast (8B slice: the o_proj
    input, the o/down/q/k/v grad-outputs). With transpose_fp8 tagged flexible_layout and the
    input's copy made before the forward GEMM, a compiled FP8Linear in the steady state writes x8
    (and w8, unless cast_weight_fp8 casts it) in forward, go8 (and the transposed weight, unless
    forward's cast_weight_fp8 made it) in backward, once each (3 and 3 FP8 outputs before); the
    transposed x8 and go8 come from one transpose_fp8 each."""
    codes = _compiled_steady_state_codes(monkeypatch, device, weight_op)
    kernel_outputs = [1, 1] if weight_op else [2, 2]
    assert [_fp8_buffers_written_by_kernels(c) for c in codes] == kernel_outputs
    assert [c.count("transpose_fp8.default(") for c in codes] == [1, 1]
    assert [c.count("cast_weight_fp8.default(") for c in codes] == ([1, 0] if weight_op else [0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_is_the_same_with_the_weights_cast_by_the_op(monkeypatch, device):
    """cast_weight_fp8 computes what inductor's weight casts compute (the same expressions on the
    CPU, the bit-exact Triton cast on CUDA): a compiled Llama layer trained 5 steps (the op from the
    steady state on) ends with bitwise the same weights, scales and amax histories and the same
    losses as with inductor's casts."""
    runs, op_calls = [], []
    op = hf_fp8.linear.cast_weight_fp8

    def counted_op(*args):
        op_calls.append(1)  # at trace time
        return op(*args)

    monkeypatch.setattr(hf_fp8.linear, "cast_weight_fp8", counted_op)
    for weight_op in (False, True):
        runs.append(train_compiled_llama_layer(device, hf_fp8.FP8Recipe(share_input_scales=True, cast_weights_once=weight_op)))
        # The op ran for the layer's seven weights only with cast_weights_once (counted as traced).
        assert (len(op_calls) >= 7) if weight_op else not op_calls
    (losses_a, state_a), (losses_b, state_b) = runs
    assert losses_a == losses_b
    assert all(torch.equal(a, b) for a, b in zip(state_a, state_b))


@pytest.mark.parametrize("compiled", [False, True])
def test_transposed_copies_by_the_op_give_the_same_gradients(monkeypatch, compiled):
    """transpose_fp8 only moves bytes. Eager, a Llama layer's loss and gradients are bit-identical
    with the transposed FP8 copies made by the op (threshold at the batch's 64 tokens) or by the cast
    (threshold above it). Compiled, inductor recomputes some FP8 tensors in backward without the
    forward's intermediate BF16 roundings (the fused copies), so a few FP8 values round the other way:
    there both must be as close to the BF16 model's gradients as FP8 gets (>= 18 dB SQNR per
    parameter on this first step) and within 1 dB of each other."""
    import transformers
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)  # fmt: skip
    results = {}
    for min_tokens in (None, 64, 65):  # None: the BF16 model
        monkeypatch.setattr(hf_fp8.linear, "_TRANSPOSE_OP_MIN_TOKENS", min_tokens or 0)
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(device=DEVICES[-1], dtype=torch.bfloat16)
        if min_tokens:
            hf_fp8.convert_model(model, hf_fp8.FP8Recipe(share_input_scales=True))
        if compiled:
            model.model.layers[0].compile()
        ids = torch.randint(0, 128, (2, 32), device=DEVICES[-1])
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        assert torch.isfinite(loss)
        results[min_tokens] = [p.grad.float() for p in model.parameters()]
        results[min_tokens, "loss"] = loss.detach()
    if not compiled:
        assert torch.equal(results[64, "loss"], results[65, "loss"])
    for bf16, op_made, cast_made in zip(results[None], results[64], results[65]):
        if not compiled:
            assert torch.equal(op_made, cast_made)
        else:
            assert sqnr(bf16, op_made) >= 18 and sqnr(bf16, cast_made) >= 18
            assert abs(sqnr(bf16, op_made) - sqnr(bf16, cast_made)) <= 1
