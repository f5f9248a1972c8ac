"""hf_fp8's Library-defined ops (hf_fp8._ops): their fake implementations, schemas and autograd
registration agree with the real kernels, checked by torch.library.opcheck on FP8 inputs.
(opcheck's schema test cannot run on FP8 tensors: it compares them with allclose.)"""

import pytest
import torch

from hf_fp8.cast import cast_fp8_reference, cast_weight_fp8, transpose_fp8
from hf_fp8.linear import scaled_mm_without_onednn
from hf_fp8.scaling import amax_of
from helpers import OPCHECK_UTILS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fp8_sample(shape, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 4
    assert (x != 0).all()
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_transpose_fp8_passes_opcheck(device, dtype):
    y = fp8_sample((48, 80), dtype, device, seed=1)
    torch.library.opcheck(transpose_fp8, (y,), test_utils=OPCHECK_UTILS)
    y_t = transpose_fp8(y)
    assert torch.equal(y_t.view(torch.uint8), y.t().contiguous().view(torch.uint8))


def test_transpose_fp8_on_meta_tensors_gives_the_transposed_shape():
    y = torch.empty(16, 48, dtype=torch.float8_e4m3fn, device="meta")
    y_t = transpose_fp8(y)
    assert y_t.shape == (48, 16) and y_t.dtype == y.dtype and y_t.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_cast_weight_fp8_passes_opcheck_and_is_the_reference_cast_in_both_layouts(device, dtype, fp8):
    """Both layouts bit for bit the reference cast's (the Triton kernel on CUDA), values beyond the
    FP8 range saturated, and the amax exactly amax_of's."""
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(96, 160, generator=gen) * 3).to(device=device, dtype=dtype)
    w[5, 7] = 1e6  # saturates
    scale = torch.tensor(7.0, device=device)
    torch.library.opcheck(cast_weight_fp8, (w, scale, fp8), test_utils=OPCHECK_UTILS)
    w8, w8_t, amax = cast_weight_fp8(w, scale, fp8)
    ref, ref_t = cast_fp8_reference(w, scale, fp8, transposed=True)
    assert w8.shape == (96, 160) and w8_t.shape == (160, 96) and w8.dtype == w8_t.dtype == fp8
    assert torch.equal(w8.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(w8_t.view(torch.uint8), ref_t.view(torch.uint8))
    assert float(w8.float().abs().max()) == torch.finfo(fp8).max
    assert amax.dtype == torch.float32 and amax.dim() == 0 and torch.equal(amax, amax_of(w))


def test_scaled_mm_without_onednn_passes_opcheck_and_matches_the_fp32_product():
    a = fp8_sample((32, 64), torch.float8_e4m3fn, "cpu", seed=2)
    b = fp8_sample((48, 64), torch.float8_e4m3fn, "cpu", seed=3).t()  # column-major (K, N)
    scale_a, scale_b = torch.tensor(0.5), torch.tensor(0.25)
    args = (a, b, scale_a, scale_b, torch.bfloat16, False)
    torch.library.opcheck(scaled_mm_without_onednn, args, test_utils=OPCHECK_UTILS)
    out = scaled_mm_without_onednn(*args)
    want = (a.float() @ b.float()) * 0.125
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # BF16 output rounding only: relative error of one BF16 ulp.
    torch.testing.assert_close(out.float(), want, rtol=2**-8, atol=0)


def test_op_dispatch_benchmark_runs_on_the_cpu():
    """benchmarks/op_dispatch.py (RESULTS (33)'s host cost per call) still runs: three rows of
    positive microseconds."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "op_dispatch.py"
    out = subprocess.run([sys.executable, str(script), "--calls", "20"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line[:1].isalpha() and line.split()[-1].replace(".", "").isdigit()]
    assert len(rows) == 3, out.stdout
    assert all(float(row.split()[-1]) > 0 for row in rows), out.stdout
