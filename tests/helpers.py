"""Shared by the tests: learnable synthetic data and a plain FP8/BF16 loop (training parity), building
Triton kernels for Hopper without a GPU, and Triton's interpreter patched to run hf_fp8's kernels."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import hf_fp8


# torch.library.opcheck's checks that run on FP8 ops (its schema check compares FP8 outputs with
# allclose, which FP8 tensors do not support).
OPCHECK_UTILS = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `test` against the higher-precision `ref`, in dB (FP64
    arithmetic); a NaN or inf in `test` fails the calling test here, so it can never pass."""
    ref, test = ref.double(), test.double()
    assert torch.isfinite(test).all(), "NaN/inf in the FP8 result"
    return (20 * torch.log10(ref.norm() / (ref - test).norm())).item()


def structured_batches(steps: int, batch: int = 2, seq: int = 32, alphabet: int = 64, noise: float = 0.1, seed: int = 0):
    """Fixed random-but-learnable data: each sequence follows a fixed random permutation of the
    first `alphabet` token ids (next = perm[current]); `noise` of the positions are replaced by a
    uniformly random token. Best achievable loss ~0.7 nats; random init starts at ~ln(256) = 5.55."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(alphabet, generator=gen)
    batches = []
    for _ in range(steps):
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, alphabet, (batch,), generator=gen)
        for t in range(1, seq):
            x[:, t] = perm[x[:, t - 1]]
        flip = torch.rand(batch, seq, generator=gen) < noise
        x[flip] = torch.randint(0, alphabet, (int(flip.sum()),), generator=gen)
        batches.append(x)
    return batches


def train_losses(model: nn.Module, batches, recipe: hf_fp8.FP8Recipe | None, lr: float = 1e-3) -> list[float]:
    """Train on `batches` (AdamW, BF16 autocast, fp32 master weights); FP8 when `recipe` is given."""
    model.train()
    if recipe is not None:
        hf_fp8.convert_model(model, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if recipe is not None:
        hf_fp8.attach(model, opt)
    return run_steps(model, opt, batches)


def run_steps(model: nn.Module, opt: torch.optim.Optimizer, batches, device_type: str = "cpu") -> list[float]:
    """One optimizer step per batch (next-token loss under BF16 autocast); the losses."""
    losses = []
    for x in batches:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train_compiled_llama_layer(device: str, recipe: hf_fp8.FP8Recipe, steps: int = 5):
    """A 1-layer BF16 Llama (width 64) converted with `recipe`, its decoder layer compiled, trained
    `steps` AdamW steps on fixed random tokens (2 x 32): (losses, copies of the state dict's tensors),
    for comparing two compiled variants bit for bit. Resets dynamo first."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128)  # fmt: skip
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    hf_fp8.convert_model(model, recipe)
    model.model.layers[0].compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hf_fp8.attach(model, opt)
    losses = []
    for step in range(steps):
        ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(step)).to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert torch.isfinite(loss)
        losses.append(loss.item())
    return losses, [t.detach().clone() for t in model.state_dict().values()]


def final_loss(losses: list[float]) -> float:
    """Mean of the last 5 steps: single steps are noisy."""
    return sum(losses[-5:]) / 5


_BUILD_FOR_HOPPER = """
import importlib, json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

for module, name, signature, constexprs in json.loads(sys.argv[1]):
    kernel = getattr(importlib.import_module(module), name)
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", 90, 32))
    except FileNotFoundError as e:  # a Triton build without its CUDA toolchain (ptxas)
        print("no CUDA toolchain:", e)
        sys.exit(3)
    assert compiled.asm["cubin"], name
"""


def build_for_hopper(kernels: list[tuple[str, str, dict, dict]]) -> None:
    """Build Triton kernels to sm_90 cubins with the installed Triton and its bundled ptxas, without a
    GPU, so a syntax or typing error in a kernel fails CI rather than the GPU machine. kernels:
    (module, kernel name, signature {arg: "*bf16" | "i32" | "constexpr" ...}, constexprs {arg: value}).
    In a process of its own: the tests' Triton runs as the interpreter (conftest.py), which cannot
    compile. Skips the calling test when Triton or its CUDA toolchain is missing; fails on a build error."""
    pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", _BUILD_FOR_HOPPER, json.dumps(kernels)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    if done.returncode == 3:
        pytest.skip(f"Triton cannot build CUDA code here: {done.stdout.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]


@contextlib.contextmanager
def triton_interpreter():
    """Run hf_fp8's Triton kernels in Triton's interpreter on CPU tensors (conftest.py sets
    TRITON_INTERPRET=1 where there is no GPU), with its defects patched (`patch_triton_interpreter`);
    yields the MonkeyPatch for further patches. Skips where Triton is missing or a GPU runs the
    compiled kernels instead."""
    pytest.importorskip("triton", reason="Triton is not installed (the test extra installs it on Linux x86-64)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present: the compiled kernels are tested instead")
    with pytest.MonkeyPatch.context() as mp:
        patch_triton_interpreter(mp)
        yield mp


def patch_triton_interpreter(mp) -> None:
    """Two defects of Triton's interpreter, not of hf_fp8's kernels, patched through the pytest
    MonkeyPatch `mp`: (1) its FP32 -> FP8 conversion rounds half-up on the mantissa without carrying
    into the exponent (126.8 -> 64 in E4M3; Triton 3.6 to 3.9), so it is replaced by torch's
    round-to-nearest-even, which the GPU's cvt.rn does; (2) in Triton 3.6 scalars are 1-element numpy
    arrays, which numpy >= 2.3 refuses to turn into Python ints (loop bounds)."""
    import numpy as np
    from triton import language as tl
    from triton.runtime import interpreter

    fp8 = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    convert = interpreter.InterpreterBuilder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar in fp8 and src.dtype.scalar == tl.float32:
            x = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return interpreter.TensorHandle(x.to(fp8[dst_type.scalar]).view(torch.uint8).numpy(), dst_type.scalar)
        return convert(self, src, dst_type, rounding_mode)

    patch_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    mp.setattr(interpreter.InterpreterBuilder, "create_fp_to_fp", create_fp_to_fp)
    mp.setattr(interpreter, "_patch_lang_tensor", _patch_lang_tensor)
