"""hf_fp8 as Accelerate's FP8 backend (hf_fp8.integrations.accelerate), on CPU.

In process: Accelerator(mixed_precision="fp8", cpu=True) + enable(): prepare converts, the optimizer
trains the converted weights, scales update once per real optimizer step under gradient
accumulation, losses equal a hand-written hf_fp8 loop, HF_FP8_RECIPE picks the recipe, Accelerate's
own torchao conversion does not run. Subprocesses: `accelerate launch` with 1 process (flags and the
shipped config file) and 2 CPU processes (DDP over gloo), and examples/pretrain_fog.py --tiny.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_fp8
from hf_fp8.integrations import accelerate as hf_fp8_accelerate
from hf_fp8.scaling import delayed_scale_states

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "accelerate_train.py"
RECIPE = hf_fp8.FP8Recipe(amax_history_len=16, attention=True)


def _load_script():
    spec = importlib.util.spec_from_file_location("_hf_fp8_accelerate_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = _load_script()


@pytest.fixture
def fresh_accelerate(monkeypatch):
    """Accelerate's singletons reset, no launcher env leaking in, and the integration's global
    state (enabled or not, recipe) restored afterwards."""
    for var in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_FP8_BACKEND", "ACCELERATE_USE_CPU", "HF_FP8_RECIPE",
                "HF_FP8_FSDP_FP8_ALL_GATHER"):
        monkeypatch.delenv(var, raising=False)
    was_enabled, recipe = hf_fp8_accelerate.is_enabled(), hf_fp8_accelerate._recipe
    all_gather = hf_fp8_accelerate._fsdp_fp8_all_gather
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    hf_fp8_accelerate.disable()
    if was_enabled:
        hf_fp8_accelerate.enable(recipe, all_gather)


def _reference_losses(recipe, micro_batches, ga):
    """The hand-written hf_fp8 loop: convert_model + attach, bf16 autocast, loss / ga per micro-batch."""
    model = train_script.build_model()
    model.train()
    hf_fp8.convert_model(model, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=train_script.LR)
    hf_fp8.attach(model, opt)
    losses = []
    for i, x in enumerate(micro_batches):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        (loss / ga).backward()
        losses.append(loss.item())
        if (i + 1) % ga == 0:
            opt.step()
            opt.zero_grad()
    return losses, model


# ------------------------------------------------------------------------------------ in process


def test_prepare_converts_trains_and_updates_once_per_real_step(fresh_accelerate, capsys):
    hf_fp8_accelerate.enable(recipe=RECIPE)
    ga, steps = 4, 2
    accelerator = Accelerator(mixed_precision="fp8", cpu=True, gradient_accumulation_steps=ga)
    assert hf_fp8_accelerate.uses_hf_fp8(accelerator)
    assert accelerator.fp8_backend == "HF_FP8" and accelerator.native_amp
    assert accelerator.ao_recipe_handler is None and accelerator.te_recipe_handler is None

    model = train_script.build_model()
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=train_script.LR)
    pmodel, popt = accelerator.prepare(model, opt)

    out = capsys.readouterr().out
    assert "hf_fp8: Accelerator.prepare converted LlamaForCausalLM" in out
    assert "hf_fp8 coverage: 14/15 GEMM layers in FP8" in out
    assert "FP8       attention (2 layers)" in out  # the recipe's FP8 attention
    raw = accelerator.unwrap_model(pmodel)
    assert raw is model
    fp8_layers = {n: m for n, m in raw.named_modules() if isinstance(m, hf_fp8.FP8Linear)}
    assert len(fp8_layers) == 14
    assert raw.config._attn_implementation == "hf_fp8"
    # Accelerate's own FP8 (torchao Float8Linear) did not run.
    from torchao.float8.float8_linear import Float8Linear

    assert not any(isinstance(m, Float8Linear) for m in raw.modules())
    # The optimizer trains exactly the converted model's parameters.
    opt_ids = [id(p) for g in popt.optimizer.param_groups for p in g["params"]]
    assert sorted(opt_ids) == sorted(id(p) for p in raw.parameters())
    assert {id(m.weight) for m in fp8_layers.values()} <= set(opt_ids)
    assert set(hf_fp8_accelerate.reports(accelerator)[0].converted) == set(fp8_layers)

    states = delayed_scale_states(raw)
    real_steps = []
    popt.optimizer.register_step_post_hook(lambda *a: real_steps.append(1))
    batches = train_script.make_batches(steps * ga, 2, 32)
    losses = []
    for i, x in enumerate(batches):
        with accelerator.accumulate(pmodel):
            loss = pmodel(input_ids=x, labels=x, use_cache=False).loss
            accelerator.backward(loss)
            popt.step()
            popt.zero_grad()
        losses.append(loss.item())
        done = (i + 1) // ga
        assert len(real_steps) == done
        for _, s in states:  # history column j is filled iff j < real steps so far
            filled = (s.amax_history != 0).any(dim=0)
            assert filled[:done].all() and not filled[done:].any(), (i, filled)
            assert bool(s.initialized.all()) == (done > 0)
        if i == ga - 1:  # after the first real step every converted weight has moved
            for name, layer in fp8_layers.items():
                assert not torch.equal(layer.weight.detach(), initial[f"{name}.weight"]), name

    ref_losses, ref_model = _reference_losses(RECIPE, batches, ga)
    # Same ops, same order, same autocast: equal up to float rounding noise.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-5)
    for (name, s), (_, r) in zip(states, delayed_scale_states(ref_model)):
        torch.testing.assert_close(s.amax_history, r.amax_history, rtol=1e-5, atol=0, msg=name)


def test_dynamo_backend_compiles_the_converted_model(fresh_accelerate, capsys):
    """Accelerator(dynamo_backend=...): prepare converts first, then Accelerate wraps the converted
    model in torch.compile; it trains like the hand-written eager loop and the scales update once per
    step. aot_eager: the same aten ops as eager, through dynamo and AOT autograd."""
    hf_fp8_accelerate.enable(recipe=RECIPE)
    accelerator = Accelerator(mixed_precision="fp8", cpu=True, dynamo_backend="aot_eager")
    model = train_script.build_model()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=train_script.LR)
    pmodel, popt = accelerator.prepare(model, opt)
    assert "hf_fp8: Accelerator.prepare converted LlamaForCausalLM" in capsys.readouterr().out
    assert isinstance(pmodel, torch._dynamo.eval_frame.OptimizedModule) and pmodel._orig_mod is model
    assert sum(isinstance(m, hf_fp8.FP8Linear) for m in model.modules()) == 14
    batches = train_script.make_batches(3, 2, 32)
    losses = []
    for x in batches:
        loss = pmodel(input_ids=x, labels=x, use_cache=False).loss
        accelerator.backward(loss)
        popt.step()
        popt.zero_grad()
        losses.append(loss.item())
    ref_losses, ref_model = _reference_losses(RECIPE, batches, 1)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=0, atol=1e-4)
    for (name, s), (_, r) in zip(delayed_scale_states(model), delayed_scale_states(ref_model)):
        assert (s.amax_history != 0).any(dim=0).tolist()[:4] == [True, True, True, False], name
        # Rounding only: forward amaxes equal; the last step's backward ones within 1% (0.85% seen).
        torch.testing.assert_close(s.amax_history, r.amax_history, rtol=2e-2, atol=0, msg=name)


def test_recipe_from_env_and_no_double_attach(fresh_accelerate, monkeypatch, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("amax_history_len: 8\nmargin: 1\nattention: false\n")
    monkeypatch.setenv("HF_FP8_RECIPE", str(path))
    hf_fp8_accelerate.enable()
    assert hf_fp8_accelerate.resolve_recipe() == hf_fp8.FP8Recipe.from_file(path)
    accelerator = Accelerator(mixed_precision="fp8", cpu=True)
    model = train_script.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Model and optimizer prepared in separate calls: still converted once, attached once.
    pmodel = accelerator.prepare(model)
    popt = accelerator.prepare(opt)
    assert "recipe: format=hybrid history=8 algo=max margin=1 attention=False" in capsys.readouterr().out
    assert all(s.amax_history.shape[1] == 8 and s.margin == 1 for _, s in delayed_scale_states(model))
    assert len(popt.optimizer._optimizer_step_post_hooks) == 1
    x = train_script.make_batches(1, 2, 32)[0]
    pmodel(input_ids=x, labels=x, use_cache=False).loss.backward()
    popt.step()
    assert all(bool(s.initialized.all()) for _, s in delayed_scale_states(model))


def test_enable_idempotent_disable_restores(fresh_accelerate):
    hf_fp8_accelerate.disable()
    original = {k: Accelerator.__dict__[k] for k in hf_fp8_accelerate._PATCHED}
    hf_fp8_accelerate.enable()
    patched = {k: Accelerator.__dict__[k] for k in hf_fp8_accelerate._PATCHED}
    hf_fp8_accelerate.enable(recipe=RECIPE)  # only swaps the recipe
    assert {k: Accelerator.__dict__[k] for k in hf_fp8_accelerate._PATCHED} == patched
    assert hf_fp8_accelerate.resolve_recipe() == RECIPE
    hf_fp8_accelerate.disable()
    assert {k: Accelerator.__dict__[k] for k in hf_fp8_accelerate._PATCHED} == original
    accelerator = Accelerator(mixed_precision="fp8", cpu=True)
    assert accelerator.fp8_backend == "AO"  # Accelerate's own auto-detection again


def test_explicit_accelerate_backend_wins_with_a_warning(fresh_accelerate):
    from accelerate.utils import AORecipeKwargs

    hf_fp8_accelerate.enable(recipe=RECIPE)
    accelerator = Accelerator(mixed_precision="fp8", cpu=True, kwargs_handlers=[AORecipeKwargs()])
    assert not hf_fp8_accelerate.uses_hf_fp8(accelerator)
    assert accelerator.fp8_backend == "AO"
    # Not fp8: hf_fp8 stays out silently (nothing to replace).
    AcceleratorState._reset_state(True)
    assert not hf_fp8_accelerate.uses_hf_fp8(Accelerator(mixed_precision="bf16", cpu=True))
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision="fp8", cpu=True, kwargs_handlers=[AORecipeKwargs()])
    with pytest.warns(RuntimeWarning, match="hf_fp8 is enabled but this Accelerator uses Accelerate's own FP8"):
        accelerator.prepare(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_import_hf_fp8_enables_the_integration():
    code = "import hf_fp8, sys; from hf_fp8.integrations import accelerate as a; print(a.is_enabled())"
    env = {**os.environ, "HF_FP8_ACCELERATE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    if out.strip() != "True":
        pytest.skip("hf_fp8/__init__.py does not call hf_fp8.integrations.accelerate._auto_enable() (yet)")
    env["HF_FP8_ACCELERATE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.strip() == "False"


# -------------------------------------------------------------------------------- accelerate launch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, launch_args, script_args, extra_env=None):
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(f"amax_history_len: {RECIPE.amax_history_len}\nattention: {str(RECIPE.attention).lower()}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    # No default accelerate config from the machine; recipe through the environment.
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_FP8_RECIPE=str(recipe_path), OMP_NUM_THREADS="1")
    env.update(extra_env or {})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(SCRIPT), str(out), *script_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "hf_fp8 coverage: 14/15 GEMM layers in FP8" in proc.stdout
    return [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def _check_rank(result, world, steps):
    assert result["world"] == world
    assert result["mixed_precision"] == "fp8" and result["fp8_backend"] == "HF_FP8" and result["uses_hf_fp8"]
    assert not result["torchao_float8_linear"]
    assert result["optimizer_params_are_model_params"]
    assert result["real_steps"] == steps
    assert len(result["converted"]) == 14
    assert all(change > 0 for change in result["weight_change"].values()), result["weight_change"]


@pytest.mark.parametrize("how", ["flags", "config_file"])
def test_accelerate_launch_single_process(tmp_path, how):
    steps, ga, batch = 3, 2, 2
    if how == "flags":
        launch = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "fp8", "--dynamo_backend", "no"]
    else:
        launch = ["--config_file", str(ROOT / "recipes/accelerate/fp8.yaml")]
    (result,) = _launch(tmp_path, launch, ["--steps", str(steps), "--ga", str(ga), "--batch", str(batch)])
    _check_rank(result, 1, steps)
    assert result["distributed_type"] == "DistributedType.NO"
    ref, _ = _reference_losses(RECIPE, train_script.make_batches(steps * ga, batch, 32), ga)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref), rtol=0, atol=1e-5)


def test_accelerate_launch_ddp_two_cpu_processes(tmp_path):
    steps, ga, batch, world = 3, 2, 2, 2
    launch = ["--multi_gpu", "--num_processes", str(world), "--num_machines", "1", "--mixed_precision", "fp8",
              "--dynamo_backend", "no", "--main_process_port", str(_free_port())]  # fmt: skip
    results = _launch(tmp_path, launch, ["--steps", str(steps), "--ga", str(ga), "--batch", str(batch)],
                      extra_env={"ACCELERATE_USE_CPU": "1"})  # fmt: skip
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        _check_rank(r, world, steps)
        assert r["distributed_type"] == "DistributedType.MULTI_CPU"
        assert not r["ddp_broadcasts_fp8_buffers"]
    r0, r1 = results
    # One all-reduce (MAX) per real step: every rank holds the same histories and scales, bit for bit;
    # DDP's averaged gradients keep the weights identical.
    assert r0["scaling"] == r1["scaling"]
    assert r0["weight_checksum"] == r1["weight_checksum"]
    assert r0["losses"] != r1["losses"]  # the ranks did see different data

    # Reference: one process over the same global batch (world * batch rows per micro-batch).
    ref_losses, ref_model = _reference_losses(RECIPE, train_script.make_batches(steps * ga, world * batch, 32), ga)
    ddp_losses = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]  # equal token counts per rank
    # Not bit-equal, for reasons inherent to data parallelism in FP8: before the first scale update
    # each rank casts with the dynamic scale of its own half-batch (not the global batch's), and
    # every rank's grad-output amax is that of its local mean loss (~2x the global one), so the
    # gradient casts round differently; bf16 GEMMs on 2 vs 4 rows and the gradient all-reduce
    # reorder sums. Measured: |diff| <= 1e-3 on losses of ~5.5; 5e-3 (0.1%) is far below what a
    # rank training on stale scales or unsynchronised weights produces.
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(ref_losses), rtol=0, atol=5e-3)
    # Scaling state vs the single-process reference. Weights are the same up to the small
    # differences above, so their amaxes agree closely. The first layer's q/k/v input (RMSNorm of the
    # embeddings, no FP8 upstream) has the same values on both sides, so its amax of the global
    # batch must equal the MAX all-reduce of the two half-batches' amaxes: exactly the same.
    # (Deeper inputs go through FP8 ops that round differently, and the grad-output amaxes are
    # ~2x, see above: not compared.)
    ref_scaling = train_script.scaling_state(ref_model)
    for name, state in r0["scaling"].items():
        if len(state["amax_history"]) != 3:  # linears: input, weight, grad_output
            continue
        got = torch.tensor(state["amax_history"])[:, :steps]
        want = torch.tensor(ref_scaling[name]["amax_history"])[:, :steps]
        torch.testing.assert_close(got[1], want[1], rtol=2e-3, atol=0, msg=name)
        if name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"):
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0, msg=name)


# ------------------------------------------------------------------------------------ the example


def test_pretrain_fog_example_tiny(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"))
    metrics = tmp_path / "metrics.json"
    cmd = [sys.executable, str(ROOT / "examples/pretrain_fog.py"), "--tiny", "--steps", "40", "--metrics-json", str(metrics)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "hf_fp8 coverage:" in proc.stdout
    losses = json.loads(metrics.read_text())["losses"]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, (first, last)


# ------------------------------------------------------------------ FSDP2 FP8 all-gather wiring


class _FSDP2Accelerator:
    """What the integration reads of an Accelerator running FSDP2 (Accelerate runs FSDP on GPUs only,
    so the wiring is tested on its own; the all-gather itself runs under real fully_shard in
    tests/test_fsdp_fp8_all_gather.py)."""

    is_fsdp2 = True
    is_local_main_process = False

    def __init__(self):
        from accelerate.utils import DistributedType

        self.distributed_type = DistributedType.FSDP


def test_fsdp2_fp8_all_gather_wraps_weights_and_keeps_them_in_the_optimizer(fresh_accelerate, monkeypatch):
    """With the option on, prepare's conversion wraps every FP8 weight for the FP8 all-gather and the
    optimizer created before prepare is switched to the wrapped Parameters, so they train (the
    trap of Accelerate's torchao FSDP path: converted weights left out of the optimizer)."""
    from hf_fp8.fsdp import DelayedFloat8AllGatherWeight

    model = train_script.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=train_script.LR)
    accelerator = _FSDP2Accelerator()
    hf_fp8_accelerate.enable(RECIPE, fsdp_fp8_all_gather=True)
    assert hf_fp8_accelerate.fsdp_fp8_all_gather_wanted(accelerator)
    hf_fp8_accelerate._convert(accelerator, model)
    hf_fp8_accelerate._swap_optimizer_params(accelerator, opt)
    wrapped = [m.weight for m in model.modules() if isinstance(m, hf_fp8.FP8Linear)]
    assert wrapped and all(isinstance(w, DelayedFloat8AllGatherWeight) for w in wrapped)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(w) in in_opt for w in wrapped)
    assert len(in_opt) == len(list(model.parameters()))
    before = [w.detach().clone() for w in wrapped]
    hf_fp8.attach(model, opt)
    x = torch.randint(0, 256, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=x, labels=x, use_cache=False).loss.backward()
    opt.step()
    assert all(not torch.equal(b, w.detach()) for b, w in zip(before, wrapped))


@pytest.mark.parametrize("all_gather", [False, True])
def test_fsdp_preparation_turns_cast_weights_once_off_unless_weights_are_gathered_in_fp8(fresh_accelerate, all_gather):
    """Under FSDP the FP8 copies cast_weights_once keeps for backward would be of the unsharded
    weights, in every layer: prepare converts with cast_weights_once=False there, except when FSDP2
    all-gathers FP8 weights (fp8_matmul then uses those as they come). Without FSDP it stays on."""
    model = train_script.build_model()
    hf_fp8_accelerate.enable(RECIPE, fsdp_fp8_all_gather=all_gather)
    hf_fp8_accelerate._convert(_FSDP2Accelerator(), model)
    layers = [m for m in model.modules() if isinstance(m, hf_fp8.FP8Linear)]
    assert layers and all(m.recipe.cast_weights_once is all_gather for m in layers)
    assert hf_fp8_accelerate.resolve_recipe().cast_weights_once  # the user's recipe is not changed
    plain = train_script.build_model()
    hf_fp8_accelerate._convert(Accelerator(mixed_precision="fp8", cpu=True), plain)
    assert all(m.recipe.cast_weights_once for m in plain.modules() if isinstance(m, hf_fp8.FP8Linear))


def test_fsdp_fp8_all_gather_option_is_ignored_without_fsdp2_and_validated(fresh_accelerate, monkeypatch):
    hf_fp8_accelerate.enable(RECIPE)
    monkeypatch.setenv(hf_fp8_accelerate.ENV_FSDP_FP8_ALL_GATHER, "1")
    assert hf_fp8_accelerate.fsdp_fp8_all_gather_wanted(_FSDP2Accelerator())
    accelerator = Accelerator(mixed_precision="fp8", cpu=True)  # single process: no FSDP
    assert not hf_fp8_accelerate.fsdp_fp8_all_gather_wanted(accelerator)
    model = train_script.build_model()
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert not any(type(p).__name__ == "DelayedFloat8AllGatherWeight" for p in model.parameters())
    monkeypatch.setenv(hf_fp8_accelerate.ENV_FSDP_FP8_ALL_GATHER, "maybe")
    with pytest.raises(ValueError, match="HF_FP8_FSDP_FP8_ALL_GATHER"):
        hf_fp8_accelerate.fsdp_fp8_all_gather_wanted(_FSDP2Accelerator())
    with pytest.raises(TypeError, match="fsdp_fp8_all_gather"):
        hf_fp8_accelerate.enable(RECIPE, fsdp_fp8_all_gather="yes")
