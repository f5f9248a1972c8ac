"""hf_fp8.cast: the reference cast (what CI runs) against torchao's cast, and the Triton kernels
against the reference, bit for bit: compiled on a GPU (CUDA cases: run on the GPU machine) and, in CI,
in Triton's interpreter on the CPU; in eager CUDA mode the FP8 linear reads its operands in the
layouts the Triton casts write (no transposing copies)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hf_fp8
from hf_fp8 import cast
from hf_fp8._torchao import GemmInputRole, LinearMMConfig, hp_tensor_and_scale_to_float8
from hf_fp8.scaling import amax_of
from helpers import triton_interpreter

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA (the H200 runs these)")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def sample(shape, dtype, device, seed):
    """Gaussian values spread over ~6 decades, so the cast saturates some, rounds most and
    flushes some into the subnormals; never all zeros."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 3)
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_is_torchaos_cast_and_its_transpose(fp8, dtype):
    x = sample((48, 80), dtype, "cpu", seed=1)
    scale = torch.tensor(3.7)
    y, y_t = cast.cast_fp8_reference(x, scale, fp8, transposed=True)
    expected = hp_tensor_and_scale_to_float8(x, scale, fp8, LinearMMConfig(), GemmInputRole.INPUT)._data
    assert torch.equal(bits(y), bits(expected))
    assert y_t.is_contiguous() and torch.equal(bits(y_t), bits(expected.t()))
    assert y.float().abs().max() == torch.finfo(fp8).max  # the sample saturates...
    assert (y.float() != 0).float().mean() > 0.5  # ...and is mostly non-zero
    assert cast.cast_fp8_reference(x, scale, fp8, transposed=False)[1] is None


def test_the_fused_cast_is_chosen_in_eager_mode_only(monkeypatch):
    x = torch.randn(32, 32)
    assert not cast.fused_cast_applies(x)  # CPU
    monkeypatch.setattr(cast, "_eligible", lambda t: True)
    assert cast.fused_cast_applies(x)
    seen = []

    def probe(t):
        seen.append(cast.fused_cast_applies(t))
        return t + 1

    torch.compile(probe, backend="eager", fullgraph=True)(x)
    assert seen == [False]
    monkeypatch.setattr(cast, "FUSED_CAST_ENABLED", False)  # HF_FP8_FUSED_CAST=0
    assert not cast.fused_cast_applies(x)


@cuda
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])  # FP32: two kernels
@pytest.mark.parametrize("shape", [(256, 512), (100, 300), (1, 16), (4096, 64), (64, 4096), (3, 1000)])
def test_triton_cast_equals_reference_bitwise(fp8, dtype, shape):
    x = sample(shape, dtype, "cuda", seed=shape[0] + shape[1])
    scale = torch.tensor(11.3, device="cuda")
    assert cast.fused_cast_applies(x)
    y, y_t, amax = cast.cast_fp8_fused(x, scale, fp8, transposed=True)
    ref, ref_t = cast.cast_fp8_reference(x, scale, fp8, transposed=True)
    assert torch.equal(bits(y), bits(ref))
    assert torch.equal(bits(y_t), bits(ref_t))
    assert amax.dtype == torch.float32 and amax.item() == amax_of(x).item() > 0
    y2, none, _ = cast.cast_fp8_fused(x, scale, fp8, transposed=False)
    assert none is None and torch.equal(bits(y2), bits(ref))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)  # CUDA: the Triton byte transpose
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("shape", [(256, 512), (100, 300), (1, 16), (4096, 64), (3, 1000)])
def test_transpose_fp8_is_the_transposed_copy_bitwise(device, fp8, shape):
    y, _ = cast.cast_fp8_reference(sample(shape, torch.float32, device, seed=shape[1]), torch.tensor(5.0, device=device), fp8, False)
    assert (y.float() != 0).float().mean() > 0.5
    y_t = cast.transpose_fp8(y)
    assert y_t.dtype == fp8 and y_t.shape == (shape[1], shape[0]) and y_t.is_contiguous()
    assert torch.equal(bits(y_t), bits(y.t().contiguous()))
    # A non-contiguous input (a column slice) is transposed as its values, not its storage.
    sliced = y[:, 1:]
    assert torch.equal(bits(cast.transpose_fp8(sliced)), bits(sliced.t().contiguous()))


def test_report_line_names_the_cast(monkeypatch):
    line = cast.describe(torch.device("cpu"))
    assert line.startswith("eager: the PyTorch reference (cpu device)") and "cast_weight_fp8 op)" in line
    monkeypatch.setattr(cast, "FUSED_CAST_ENABLED", False)
    line = cast.describe(torch.device("cuda", 0))
    assert "HF_FP8_FUSED_CAST=0" in line and "cast_weight_fp8" not in line


@cuda
def test_report_line_names_the_triton_cast_on_the_gpu():
    line = cast.describe(torch.device("cuda"))
    assert line.startswith("eager: one Triton kernel per cast") and "cast_weight_fp8 op, the Triton kernel)" in line
    assert "without its clamp (the generated conversion saturates; hf_fp8's inductor pass)" in line


def _check_amax_of_nan_inf_and_empty(device):
    x = sample((128, 128), torch.bfloat16, device, seed=3)
    scale = torch.tensor(1.0, device=device)
    x[7, 9] = float("inf")
    assert cast.cast_fp8_fused(x, scale, FP8[0], True)[2].item() == float("inf")
    x[100, 3] = -float("nan")
    y, _, amax = cast.cast_fp8_fused(x, scale, FP8[0], True)
    assert amax.isnan() and y[100, 3].float().isnan()
    y, y_t, amax = cast.cast_fp8_fused(torch.empty(0, 32, device=device, dtype=torch.bfloat16), scale, FP8[1], True)
    assert y.shape == (0, 32) and y_t.shape == (32, 0) and amax.item() == 0.0


@cuda
def test_triton_amax_propagates_nan_and_inf_and_handles_empty():
    _check_amax_of_nan_inf_and_empty("cuda")


# ---- the same kernels in Triton's interpreter (CI: no GPU) ------------------------------------------


@pytest.fixture
def interpreted():
    """hf_fp8's cast kernels run by Triton's interpreter on CPU tensors: their logic (tiles, edge
    masks, the transposed store, the amax atomics) is checked in CI, not only on the GPU machine."""
    with triton_interpreter():
        yield


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])  # FP32: cast, then byte transpose
@pytest.mark.parametrize("shape", [(100, 300), (1, 16), (130, 3), (64, 128)])
def test_cast_kernels_in_the_interpreter_equal_reference_bitwise(interpreted, fp8, dtype, shape):
    x = sample(shape, dtype, "cpu", seed=shape[0] * 7 + shape[1])
    scale = torch.tensor(11.3)
    ref, ref_t = cast.cast_fp8_reference(x, scale, fp8, transposed=True)
    y, y_t, amax = cast.cast_fp8_fused(x, scale, fp8, transposed=True)
    assert torch.equal(bits(y), bits(ref)) and torch.equal(bits(y_t), bits(ref_t))
    assert amax.item() == amax_of(x).item() > 0
    # Recording into pending amaxes (max-reduced): none recorded yet (-1) and a lower one become x's
    # amax; a higher one stays.
    fresh, lower, higher = torch.tensor(-1.0), torch.tensor(amax.item() / 2), torch.tensor(2 * amax.item())
    y2, none, no_amax = cast.cast_fp8_fused(x, scale, fp8, transposed=False, record_into=(fresh, lower))
    assert none is None and no_amax is None and torch.equal(bits(y2), bits(ref))
    cast.cast_fp8_fused(x, scale, fp8, transposed=True, record_into=(higher,))
    assert fresh.item() == lower.item() == amax.item() and higher.item() == 2 * amax.item()
    # The byte transpose on its own (transpose_fp8 on CUDA).
    y_t3 = torch.empty_like(ref_t)
    cast.transpose_bytes(ref, y_t3)
    assert torch.equal(bits(y_t3), bits(ref_t))


def test_cast_kernel_amax_in_the_interpreter_propagates_nan_and_inf_and_handles_empty(interpreted):
    _check_amax_of_nan_inf_and_empty("cpu")


class _ScaledMMOperands(TorchDispatchMode):
    """Records the storages of every torch._scaled_mm operand."""

    def __init__(self):
        super().__init__()
        self.operands = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._scaled_mm.default:
            self.operands += [args[0].untyped_storage().data_ptr(), args[1].untyped_storage().data_ptr()]
        return func(*args, **(kwargs or {}))


@cuda
def test_eager_fp8_gemms_read_the_tensors_the_triton_cast_wrote(monkeypatch):
    """In eager CUDA mode every GEMM operand is a Triton cast's output as written, in either layout:
    no transposing copy in between. (Before, torchao's matmul backward made three aten copies per
    layer; on an H200 they ran ~10x slower than a tiled kernel.)"""
    written = []
    real = hf_fp8.linear.cast_fp8_fused

    def recording(*args, **kwargs):
        y, y_t, amax = real(*args, **kwargs)
        written.extend(t.untyped_storage().data_ptr() for t in (y, y_t) if t is not None)
        return y, y_t, amax

    monkeypatch.setattr(hf_fp8.linear, "cast_fp8_fused", recording)
    layer = hf_fp8.FP8Linear(64, 32, device="cuda", dtype=torch.bfloat16)
    for step in range(3):  # the host knows the delayed scales after two updates
        x = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        written.clear()
        mode = _ScaledMMOperands()
        with mode:
            layer(x).backward(torch.randn(48, 32, device="cuda", dtype=torch.bfloat16))
        hf_fp8.update_scales(layer)
    assert len(mode.operands) == 6 and set(mode.operands) <= set(written)
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()


@cuda
@pytest.mark.parametrize("tokens", [64, 40])
@pytest.mark.parametrize("master_weights", ["bf16", "fp32 + autocast"])
def test_fp8_linear_training_is_the_same_with_the_triton_cast(monkeypatch, tokens, master_weights):
    """Four steps of an FP8 layer (scales updated after each): outputs, gradients and amaxes with the
    Triton cast equal those with the reference cast, bit for bit; BF16 weights, or FP32 master weights
    under BF16 autocast (the Trainer's bf16=True)."""
    autocast = master_weights != "bf16"
    results, fused_calls = [], []
    real = hf_fp8.linear.cast_fp8_fused
    monkeypatch.setattr(hf_fp8.linear, "cast_fp8_fused", lambda *a, **k: fused_calls.append(1) or real(*a, **k))
    for fused in (True, False):
        monkeypatch.setattr(cast, "FUSED_CAST_ENABLED", fused)
        torch.manual_seed(0)
        layer = hf_fp8.FP8Linear(128, 64, device="cuda", dtype=torch.float32 if autocast else torch.bfloat16)
        run = []
        for step in range(4):
            x = sample((tokens, 128), torch.bfloat16, "cuda", seed=step).requires_grad_()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = layer(x)
            out.backward(sample((tokens, 64), torch.bfloat16, "cuda", seed=10 + step))
            run += [out.detach(), x.grad, layer.weight.grad.clone(), layer.fp8_scale.pending_amax.clone()]
            layer.weight.grad = None
            hf_fp8.update_scales(layer)
        results.append(run)
        if fused:  # steps 3 and 4 (the host knows the delayed scales one update late): input, weight, grad-output
            assert len(fused_calls) >= 6
    for a, b in zip(*results):
        assert torch.equal(a, b)


def _emulated_kernel(x, scale, dtype, transposed, record_into=()):
    """cast_fp8_fused's contract on CPU (the reference plus the amax, or the amax max-reduced into
    `record_into`), to test the code around it."""
    y, y_t = cast.cast_fp8_reference(x, scale, dtype, transposed)
    for pending in record_into:
        pending.copy_(torch.maximum(pending, amax_of(x)))
    return y, y_t, None if record_into else amax_of(x)


def test_linears_record_each_amax_once_whether_the_cast_or_the_layer_records_it(monkeypatch):
    """In eager CUDA mode the Triton cast max-reduces amaxes straight into the pending amaxes (the
    layer's own, and the shared input scale's of q/k/v and gate/up); the layer then must not record
    them again, nor miss one. On CPU with the kernel's contract emulated: three steps of a small
    Llama with shared input scales give the same losses, gradients, pending amaxes (before each
    update) and scales as the reference path, bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fp8.scaling import delayed_scale_states

    monkeypatch.setattr(cast, "_eligible", lambda t: t.dim() == 2 and t.is_contiguous())
    recorded_by_kernel = []

    def kernel(*args, record_into=()):
        recorded_by_kernel.append(len(record_into))
        return _emulated_kernel(*args, record_into=record_into)

    monkeypatch.setattr(hf_fp8.linear, "cast_fp8_fused", kernel)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(cast, "FUSED_CAST_ENABLED", fused)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        hf_fp8.convert_model(model, hf_fp8.FP8Recipe())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = []
        for _ in range(4):  # the fused cast takes over once the host knows the delayed scales (step 2 on)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            run += [loss.detach()] + [p.grad.clone() for p in model.parameters()]
            run += [s.pending_amax.clone() for _, s in delayed_scale_states(model)]
            opt.step()
            opt.zero_grad()
            hf_fp8.update_scales(model)
            run += [s.scale.clone() for _, s in delayed_scale_states(model)]
        runs.append(run)
    # Steps 2-4 cast input, weight (forward) and grad-output (backward) of 7 linears in the kernel,
    # which recorded each: k/v and up (shared input scales) into two states.
    assert sorted(set(recorded_by_kernel)) == [1, 2] and len(recorded_by_kernel) == 3 * 7 * 3
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_attention_casts_any_layout_through_the_2d_kernel_with_the_reference_strides(monkeypatch):
    """Attention's Q/K/V are (B, H, S, D) views of (B, S, H, D) memory: the fused path casts the
    memory as 2D and hands back a tensor with the input's strides, equal to the reference cast."""
    from hf_fp8.attention.reference import new_attention_scales, to_fp8, cast_input

    monkeypatch.setattr(cast, "_eligible", lambda t: t.dim() == 2 and t.is_contiguous())
    monkeypatch.setattr(cast, "cast_fp8_fused", _emulated_kernel)
    q = sample((2, 5, 3, 16), torch.bfloat16, "cpu", seed=4).transpose(1, 2)  # (B, H=3, S=5, D)
    assert not q.is_contiguous() and cast.fused_cast_applies_any_layout(q)
    scale = torch.tensor(2.5)
    y, amax = cast.cast_fp8_fused_any_layout(q, scale, FP8[0])
    ref = to_fp8(q, scale, FP8[0])
    assert y.shape == ref.shape and y.stride() == ref.stride() == q.stride()
    assert torch.equal(bits(y), bits(ref)) and amax == amax_of(q)
    # In attention: the same data, scale and recorded amax as the reference path.
    state = new_attention_scales(hf_fp8.FP8Recipe(attention=True))
    state.updated_on_host = True  # as after two updates
    fused = cast_input(q, state, 0, record=True)
    monkeypatch.setattr(cast, "FUSED_CAST_ENABLED", False)
    pending = state.pending_amax.clone()
    reference = cast_input(q, state, 0, record=True)
    assert torch.equal(bits(fused[0]), bits(reference[0])) and fused[0].stride() == reference[0].stride()
    assert torch.equal(fused[1], reference[1]) and torch.equal(fused[2], reference[2])
    assert torch.equal(pending, state.pending_amax)  # both recorded the same amax


def test_broadcast_or_overlapping_tensors_take_the_reference(monkeypatch):
    monkeypatch.setattr(cast, "_eligible", lambda t: t.dim() == 2 and t.is_contiguous())
    expanded = torch.randn(1, 1, 4, 16, dtype=torch.bfloat16).expand(2, 3, 4, 16)  # a sum()'s gradient
    assert not cast.fused_cast_applies_any_layout(expanded)
    assert not cast.fused_cast_applies_any_layout(torch.tensor(1.0))


def _check_attention_layout_cast(device, fp8):
    q = sample((2, 256, 8, 64), torch.bfloat16, device, seed=9).transpose(1, 2)  # (B, H, S, D) of BSHD memory
    scale = torch.tensor(7.0, device=device)
    assert device != "cuda" or cast.fused_cast_applies_any_layout(q)  # eager CUDA picks this cast itself
    y, amax = cast.cast_fp8_fused_any_layout(q, scale, fp8)
    ref = cast.cast_fp8_reference(q.contiguous(), scale, fp8, False)[0]
    assert y.stride() == q.stride() and torch.equal(bits(y.contiguous()), bits(ref))
    assert amax.item() == amax_of(q).item()


@cuda
@pytest.mark.parametrize("fp8", FP8)
def test_triton_cast_of_attention_layouts_equals_reference_bitwise(fp8):
    _check_attention_layout_cast("cuda", fp8)


@pytest.mark.parametrize("fp8", FP8)
def test_cast_kernel_of_attention_layouts_in_the_interpreter_equals_reference_bitwise(interpreted, fp8):
    _check_attention_layout_cast("cpu", fp8)


def test_kernels_compile_for_hopper():
    """The cast (BF16 and FP32 inputs, to E4M3 and E5M2, one or both layouts, one or two amaxes) and the
    byte transpose build to sm_90 cubins on the CPU (see helpers.build_for_hopper)."""
    from helpers import build_for_hopper

    from hf_fp8.cast import _BLOCK, _TRANSPOSE_BLOCK_M, _TRANSPOSE_BLOCK_N

    tiles = {"BLOCK_M": _BLOCK, "BLOCK_N": _BLOCK}
    kernels = []
    for x, y, transposed, two in (("*bf16", "*fp8e4nv", True, False), ("*fp32", "*fp8e5", False, True)):
        signature = {"x_ptr": x, "y_ptr": y, "y_t_ptr": y, "scale_ptr": "*fp32", "amax_bits_ptr": "*i32",
                     "amax_bits_ptr2": "*i32", "rows": "i32", "cols": "i32", "fp8_max": "fp32", "TRANSPOSED": "constexpr",
                     "TWO_AMAXES": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}  # fmt: skip
        kernels.append(("hf_fp8._cast_triton", "cast_fp8_kernel", signature, {"TRANSPOSED": transposed, "TWO_AMAXES": two, **tiles}))
    transpose = {"y_ptr": "*u8", "y_t_ptr": "*u8", "rows": "i32", "cols": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    kernels.append(("hf_fp8._cast_triton", "transpose_bytes_kernel", transpose, {"BLOCK_M": _TRANSPOSE_BLOCK_M, "BLOCK_N": _TRANSPOSE_BLOCK_N}))
    build_for_hopper(kernels)
