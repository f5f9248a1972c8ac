"""Delayed-scaling semantics, one behaviour per test: history roll, max vs most_recent, margin,
micro-batch max-reduction with one update per optimizer step, first-step init, non-finite amaxes,
state_dict round trip, and the one-collective all-reduce under torch.distributed (gloo)."""

import re
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hf_fp8
from hf_fp8 import scaling
from hf_fp8.scaling import delayed_scale_states
from helpers import sqnr

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344
INPUT, WEIGHT, GRAD = 0, 1, 2


def make_layer(**recipe):
    torch.manual_seed(0)
    return hf_fp8.FP8Linear(32, 16, recipe=hf_fp8.FP8Recipe(**recipe))


def step(layer, amax, grad_amax=None):
    """One forward(+backward) whose input has absolute max exactly `amax` (and grad-output max
    `grad_amax`), followed by an optimizer-step-time update."""
    forward_backward(layer, amax, grad_amax)
    hf_fp8.update_scales(layer)


def forward_backward(layer, amax, grad_amax=None):
    x = torch.rand(16, 32) * 0.5 * amax
    x[3, 7] = -amax
    x.requires_grad_(grad_amax is not None)
    out = layer(x)
    if grad_amax is not None:
        g = torch.rand(16, 16) * 0.5 * grad_amax
        g[0, 0] = grad_amax
        out.backward(g)


def test_history_rolls_newest_first():
    layer = make_layer(amax_history_len=4)
    for amax in (1.0, 2.0, 3.0, 4.0, 5.0):
        step(layer, amax, grad_amax=amax / 10)
    s = layer.fp8_scale
    torch.testing.assert_close(s.amax_history[INPUT], torch.tensor([5.0, 4.0, 3.0, 2.0]))  # 1.0 rolled out
    torch.testing.assert_close(s.amax_history[GRAD], torch.tensor([0.5, 0.4, 0.3, 0.2]))
    weight_amax = layer.weight.detach().abs().max()
    torch.testing.assert_close(s.amax_history[WEIGHT], weight_amax.repeat(4))


def test_max_vs_most_recent():
    by_algo = {}
    for algo in ("max", "most_recent"):
        layer = make_layer(amax_compute_algo=algo, amax_history_len=8)
        for amax in (8.0, 2.0):
            step(layer, amax)
        by_algo[algo] = layer.fp8_scale.scale[INPUT].item()
    assert by_algo["max"] == pytest.approx(E4M3_MAX / 8.0)
    assert by_algo["most_recent"] == pytest.approx(E4M3_MAX / 2.0)


def test_history_length_bounds_memory_of_max():
    layer = make_layer(amax_history_len=2)
    for amax in (8.0, 1.0, 1.0):
        step(layer, amax)
    # 8.0 left the 2-step window
    assert layer.fp8_scale.scale[INPUT].item() == pytest.approx(E4M3_MAX / 1.0)


@pytest.mark.parametrize("margin", [0, 1, 3])
def test_each_unit_of_margin_halves_the_scale(margin):
    layer = make_layer(margin=margin)
    step(layer, 4.0, grad_amax=0.25)
    s = layer.fp8_scale.scale
    assert s[INPUT].item() == pytest.approx(E4M3_MAX / 4.0 / 2**margin)
    assert s[GRAD].item() == pytest.approx(E5M2_MAX / 0.25 / 2**margin)


def test_micro_batches_are_max_reduced_and_scales_change_once_per_step():
    layer = make_layer()
    step(layer, 1.0, grad_amax=1.0)
    scale_before = layer.fp8_scale.scale.clone()
    for amax, grad_amax in ((3.0, 0.5), (7.0, 0.1), (2.0, 2.0)):  # 3 micro-batches, no update
        forward_backward(layer, amax, grad_amax)
        torch.testing.assert_close(layer.fp8_scale.scale, scale_before, rtol=0, atol=0)
    hf_fp8.update_scales(layer)
    s = layer.fp8_scale
    assert s.amax_history[INPUT, 0].item() == 7.0 and s.amax_history[GRAD, 0].item() == 2.0
    assert s.amax_history[INPUT, 1].item() == 1.0  # one roll for three micro-batches
    assert s.scale[INPUT].item() == pytest.approx(E4M3_MAX / 7.0)


def test_attach_updates_once_per_optimizer_step_with_gradient_accumulation():
    layer = make_layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    hf_fp8.attach(layer, opt)
    accumulation, steps = 4, 3
    for _ in range(steps):
        for micro in range(accumulation):
            forward_backward(layer, 1.0 + micro, grad_amax=1.0)
        opt.step()
        opt.zero_grad()
    history = layer.fp8_scale.amax_history[INPUT]
    assert (history > 0).sum().item() == steps  # 3 rolls, not 12
    torch.testing.assert_close(history[:steps], torch.full((steps,), 4.0))


def test_attach_twice_is_refused_and_handle_detaches():
    layer = make_layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    handle = hf_fp8.attach(layer, opt)
    with pytest.raises(RuntimeError, match="already attached"):
        hf_fp8.attach(layer, opt)
    handle.remove()
    hf_fp8.attach(layer, opt)  # allowed again once detached


def test_first_step_uses_the_tensors_own_amax():
    """Before any update the scale buffer is a placeholder (1.0); casting with it would saturate an
    input of amax 1e4 at 448. The first step must scale dynamically instead."""
    layer = make_layer()
    assert not layer.fp8_scale.initialized.any()
    x = torch.randn(16, 32) * 1e4
    ref = x @ layer.weight.detach().t() + layer.bias.detach()
    out = layer(x)
    sqnr = 20 * torch.log10(ref.norm() / (ref - out.detach()).norm())
    assert sqnr.item() >= 20.0
    hf_fp8.update_scales(layer)
    assert layer.fp8_scale.initialized[INPUT] and layer.fp8_scale.initialized[WEIGHT]
    assert not layer.fp8_scale.initialized[GRAD]  # no backward ran: grad scale stays uninitialized
    assert layer.fp8_scale.scale[INPUT].item() == pytest.approx(E4M3_MAX / x.abs().max().item())


def test_delayed_scale_is_used_after_first_update():
    """After an update the cast uses the stored scale, not the current tensor's amax: an input
    much larger than the history saturates (that is what delayed scaling means)."""
    layer = make_layer()
    step(layer, 1.0)
    x = torch.randn(16, 32)
    x = x / x.abs().max() * 100.0  # 100x the recorded amax -> clipped to 448/scale = 1.0
    out = layer(x)
    clipped = x.clamp(-1.0, 1.0) @ layer.weight.detach().t() + layer.bias.detach()
    sqnr = 20 * torch.log10(clipped.norm() / (clipped - out.detach()).norm())
    assert sqnr.item() >= 20.0


def test_after_the_first_update_casts_do_not_depend_on_their_own_amax():
    """Once update_scales has initialized every role of a state (known on the host), cast_scale is
    the stored scale alone, so under torch.compile the cast need not wait for the reduction over its
    own tensor; before, the first step is dynamic. A step with only a forward leaves grad_output
    uninitialized: the state keeps the dynamic rule until a backward has been seen."""
    from hf_fp8.scaling import cast_scale

    layer = make_layer()
    state = layer.fp8_scale
    amax = torch.tensor(10.0)
    assert state.updated_on_host is False
    assert cast_scale(state, INPUT, amax).item() == pytest.approx(E4M3_MAX / 10.0)
    step(layer, 2.0)  # forward only
    assert state.updated_on_host is False
    assert cast_scale(state, INPUT, amax).item() == pytest.approx(E4M3_MAX / 2.0)  # delayed: initialized
    assert cast_scale(state, GRAD, amax).item() == pytest.approx(E5M2_MAX / 10.0)  # dynamic: not yet
    step(layer, 2.0, grad_amax=0.5)
    assert state.updated_on_host is True
    assert cast_scale(state, INPUT, torch.tensor(float("nan"))).item() == pytest.approx(E4M3_MAX / 2.0)
    assert cast_scale(state, GRAD, amax).item() == pytest.approx(E5M2_MAX / 0.5)
    layer.load_state_dict(make_layer().state_dict())  # a fresh, uninitialized state
    assert state.updated_on_host is False
    assert cast_scale(state, INPUT, amax).item() == pytest.approx(E4M3_MAX / 10.0)


def test_an_optimizer_step_without_forward_keeps_the_first_step_dynamic():
    """An attached optimizer step before any forward (e.g. creating optimizer state to load a
    checkpoint into) must not make the first real step cast with the placeholder scale 1."""
    from hf_fp8.scaling import cast_scale

    layer = make_layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    hf_fp8.attach(layer, opt)
    opt.step()
    assert layer.fp8_scale.updated_on_host is False
    assert cast_scale(layer.fp8_scale, INPUT, torch.tensor(1e4)).item() == pytest.approx(E4M3_MAX / 1e4)


def test_nonfinite_amax_is_skipped_counted_and_warned():
    layer = make_layer()
    step(layer, 2.0, grad_amax=1.0)
    history, scale = layer.fp8_scale.amax_history.clone(), layer.fp8_scale.scale.clone()
    x = torch.randn(16, 32)
    x[0, 0] = float("nan")
    layer(x)
    with pytest.warns(RuntimeWarning, match=r"non-finite .*<root>:input"):
        hf_fp8.update_scales(layer)
    s = layer.fp8_scale
    assert s.nonfinite_skips.tolist() == [1, 0, 0]
    torch.testing.assert_close(s.amax_history[INPUT], history[INPUT], rtol=0, atol=0)
    assert s.scale[INPUT] == scale[INPUT]
    assert s.amax_history[WEIGHT, 0] > 0 and s.amax_history[WEIGHT, 1] > 0  # weight still rolled
    stats = hf_fp8.fp8_stats(layer)
    assert stats["<root>"]["input"]["nonfinite_skips"] == 1


def test_nonfinite_policy_raise_and_skip():
    layer = make_layer(on_nonfinite_amax="raise")
    layer(torch.full((16, 32), float("inf")))
    with pytest.raises(FloatingPointError, match="<root>:input"):
        hf_fp8.update_scales(layer)
    layer = make_layer(on_nonfinite_amax="skip")
    layer(torch.full((16, 32), float("inf")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_fp8.update_scales(layer)
    assert layer.fp8_scale.nonfinite_skips[INPUT].item() == 1


def test_update_before_any_forward_and_without_fp8_layers():
    with pytest.raises(RuntimeError, match="no FP8 forward pass was recorded"):
        hf_fp8.update_scales(make_layer())
    with pytest.raises(ValueError, match="convert_model"):
        hf_fp8.update_scales(nn.Linear(16, 16))
    with pytest.raises(ValueError, match="convert_model"):
        hf_fp8.attach(nn.Linear(16, 16), torch.optim.SGD(nn.Linear(16, 16).parameters(), lr=0.1))


def test_eval_mode_does_not_record():
    layer = make_layer()
    step(layer, 1.0)
    layer.eval()
    layer(torch.randn(16, 32) * 50)
    assert (layer.fp8_scale.pending_amax < 0).all()


def test_zero_tensor_keeps_scale():
    layer = make_layer()
    step(layer, 2.0)
    scale = layer.fp8_scale.scale[INPUT].item()
    layer(torch.zeros(16, 32))
    hf_fp8.update_scales(layer)
    assert layer.fp8_scale.scale[INPUT].item() == scale  # the 2.0 is still in the history
    fresh = make_layer()
    fresh(torch.zeros(16, 32))
    hf_fp8.update_scales(fresh)
    assert not fresh.fp8_scale.initialized[INPUT]  # an all-zero history gives no scale


def test_state_dict_round_trip_restores_scales_and_histories_exactly():
    layer = make_layer(amax_history_len=16)
    for amax in (1.0, 3.0, 2.0):
        step(layer, amax, grad_amax=amax)
    state = layer.state_dict()
    for key in ("fp8_scale.amax_history", "fp8_scale.scale", "fp8_scale.initialized", "fp8_scale.nonfinite_skips"):
        assert key in state
    fresh = hf_fp8.FP8Linear(32, 16, recipe=hf_fp8.FP8Recipe(amax_history_len=16))
    fresh.load_state_dict(state)
    for name, buf in layer.fp8_scale.named_buffers():
        assert torch.equal(buf, getattr(fresh.fp8_scale, name)), name
    x = torch.randn(8, 32)
    assert torch.equal(layer(x), fresh(x))


def test_inverse_scale_follows_every_write_of_the_scale():
    """The FP8 GEMMs multiply by the stored `inv_scale` (no reciprocal per GEMM): a stale inverse
    would scale every output wrongly without any error. After update_scales, load_state_dict and
    raise_margin it is 1 / scale bit for bit, and the output still matches the high-precision one."""
    from hf_fp8.integrations.trainer import raise_margin

    def assert_in_sync(layer):
        s = layer.fp8_scale
        assert s.updated_on_host and not torch.equal(s.scale, torch.ones_like(s.scale))
        assert torch.equal(s.inv_scale, s.scale.reciprocal())
        x = torch.rand(8, 32) * 2 - 1  # within the recorded amaxes: no saturation
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
        err = (layer(x) - ref).norm() / ref.norm()
        assert err < 0.1, err.item()  # FP8 E4M3 rounding; a stale 2x inverse gives ~1

    layer = make_layer()
    for amax in (1.0, 3.0):
        step(layer, amax, grad_amax=amax)
    assert_in_sync(layer)
    raise_margin(layer, 1)  # halves every scale at once
    assert_in_sync(layer)
    fresh = make_layer()
    step(fresh, 50.0, grad_amax=50.0)  # other scales, so the load has something to change
    fresh.load_state_dict(layer.state_dict())
    fresh.fp8_scale.updated_on_host = True  # as the next update_scales would set it
    assert torch.equal(fresh.fp8_scale.scale, layer.fp8_scale.scale)
    assert_in_sync(fresh)


def test_model_dtype_casts_keep_the_scaling_state_float32():
    """Regression: model.to(torch.bfloat16) after conversion used to turn scales and amax
    histories into bf16 (8-bit mantissa)."""
    layer = make_layer()
    step(layer, 3.0)
    scale = layer.fp8_scale.scale.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    for name in ("amax_history", "scale", "inv_scale", "pending_amax", "scale_numerator"):
        assert getattr(layer.fp8_scale, name).dtype == torch.float32, name
    assert torch.equal(layer.fp8_scale.scale, scale)
    layer.half()
    assert layer.fp8_scale.scale.dtype == torch.float32
    step(layer, 3.0)  # still trains


def test_one_update_handles_all_layers_of_a_model():
    model = nn.Sequential(hf_fp8.FP8Linear(32, 64), nn.ReLU(), hf_fp8.FP8Linear(64, 16))
    model(torch.randn(16, 32)).sum().backward()
    hf_fp8.update_scales(model)
    for _, state in delayed_scale_states(model):
        assert state.initialized.all()
        assert (state.pending_amax == -1).all()


def _mixed_recipe_model():
    torch.manual_seed(0)
    return nn.Sequential(
        hf_fp8.FP8Linear(32, 64, recipe=hf_fp8.FP8Recipe(amax_history_len=4)),
        nn.ReLU(),
        hf_fp8.FP8Linear(64, 16, recipe=hf_fp8.FP8Recipe(amax_history_len=8, amax_compute_algo="most_recent")),
    )


def _states_equal(a: nn.Module, b: nn.Module) -> None:
    for (name, sa), (_, sb) in zip(delayed_scale_states(a), delayed_scale_states(b)):
        for buffer, ta in sa._buffers.items():
            tb = sb._buffers[buffer]
            assert torch.equal(ta, tb), (name, buffer, ta, tb)


def test_update_tracks_replaced_buffers_new_layers_and_groups_of_recipes():
    """update_scales keeps what it gathered of a model's scale buffers between calls (host time, see
    scaling._UpdatePlan). A model whose two layers have different history lengths and algos (two
    groups in one update) is updated whole; its twin layer by layer. Between updates the model's
    buffers are replaced by new tensors and a layer is swapped for a new one (in both). The scaling
    states must stay identical: a stale plan would write into the replaced tensors."""
    model = _mixed_recipe_model()
    twin = _mixed_recipe_model()
    gen = torch.Generator().manual_seed(1)
    for i in range(5):
        x = torch.randn(24, 32, generator=gen) * (1 + i)
        for m in (model, twin):
            m(x).square().sum().backward()
        hf_fp8.update_scales(model)
        for layer in (twin[0], twin[2]):
            hf_fp8.update_scales(layer)
        _states_equal(model, twin)
        if i == 0:
            plan = scaling._deferred[model]["plan"]
        if i == 1:  # nothing changed since the plan was made: reused
            assert scaling._deferred[model]["plan"] is plan
            state = model[0].fp8_scale
            state.amax_history = state.amax_history.clone()
            state.scale = state.scale.clone()
            state.inv_scale_input = state.inv_scale_input.clone()
        if i == 2:
            assert scaling._deferred[model]["plan"] is not plan
            for m in (model, twin):
                m[2] = hf_fp8.FP8Linear.from_linear(m[2].to_linear(), hf_fp8.FP8Recipe(amax_history_len=2))
    for m in (model, twin):
        assert m[0].fp8_scale.initialized.all() and m[2].fp8_scale.initialized.all()
        assert (m[0].fp8_scale.amax_history[:, :4] > 0).all()
        torch.testing.assert_close(m[0].fp8_scale.inv_scale, m[0].fp8_scale.scale.reciprocal(), rtol=0, atol=0)


# ---- torch.distributed: one all-reduce (MAX) for all layers, identical histories on all ranks ----


def _distributed_worker(rank, world_size, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # same weights on both ranks
        model = nn.Sequential(hf_fp8.FP8Linear(32, 32), hf_fp8.FP8Linear(32, 16))
        calls = []
        real = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        x = torch.randn(16, 32) * (rank + 1)  # rank 1 sees twice the amax of rank 0
        model(x).sum().backward()
        hf_fp8.update_scales(model)
        dist.all_reduce = real
        states = [s for _, s in delayed_scale_states(model)]
        results[rank] = {
            "calls": calls,
            "history": torch.stack([s.amax_history[:, 0] for s in states]),
            "local_input_amax": x.abs().max().item(),
        }
    finally:
        dist.destroy_process_group()


def test_distributed_update_is_one_all_reduce_max(tmp_path):
    world_size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(world_size, str(tmp_path / "init"), results), nprocs=world_size)
        results = dict(results)
    assert results[0]["calls"] == [6] and results[1]["calls"] == [6]  # 2 layers x 3 roles, one collective
    assert torch.equal(results[0]["history"], results[1]["history"])
    global_max = max(results[r]["local_input_amax"] for r in range(world_size))
    assert results[0]["history"][0, INPUT].item() == pytest.approx(global_max)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous check exists on CUDA only (run on the GPU machine)")
def test_cuda_nonfinite_check_is_reported_one_step_late_without_sync():
    torch.manual_seed(0)
    layer = hf_fp8.FP8Linear(32, 16, device="cuda")
    layer(torch.randn(16, 32, device="cuda"))
    hf_fp8.update_scales(layer)  # first call: checked at once
    bad = torch.randn(16, 32, device="cuda")
    bad[0, 0] = float("nan")
    layer(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_fp8.update_scales(layer)  # the NaN step: no warning yet (no host sync)
    assert layer.fp8_scale.nonfinite_skips[INPUT].item() == 1  # but already skipped and counted
    layer(torch.randn(16, 32, device="cuda"))
    with pytest.warns(RuntimeWarning, match=r"previous optimizer step: <root>:input"):
        hf_fp8.update_scales(layer)
    raising = hf_fp8.FP8Linear(32, 16, device="cuda", recipe=hf_fp8.FP8Recipe(on_nonfinite_amax="raise"))
    raising(torch.randn(16, 32, device="cuda"))
    hf_fp8.update_scales(raising)
    raising(bad)
    with pytest.raises(FloatingPointError, match="<root>:input"):
        hf_fp8.update_scales(raising)  # "raise" checks at once, also on CUDA


def test_attached_step_without_forward_is_a_no_op_but_direct_update_raises():
    """An optimizer step with nothing recorded (optimizer-state init before a checkpoint load) must
    not raise through attach, and must not roll any history."""
    layer = make_layer()
    step(layer, 2.0)
    history = layer.fp8_scale.amax_history.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    hf_fp8.attach(layer, opt)
    opt.step()  # no forward since the last update
    assert torch.equal(layer.fp8_scale.amax_history, history)
    with pytest.raises(RuntimeError, match="no FP8 forward pass was recorded"):
        hf_fp8.update_scales(layer)


def test_host_initialized_flag_is_remembered_and_forgotten_on_load():
    layer = make_layer()
    fresh_state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert not layer.fp8_scale.initialized_on_host(WEIGHT)
    step(layer, 1.0)
    assert layer.fp8_scale.initialized_on_host(WEIGHT)
    layer.load_state_dict(fresh_state)  # back to an uninitialized state
    assert not layer.fp8_scale.initialized_on_host(WEIGHT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy exists on CUDA only (run on the GPU machine)")
def test_cuda_steady_state_is_known_one_update_late_without_sync():
    """On CUDA, update_scales learns that a state is fully initialized from an async copy read at
    the next update: the second step still casts with the `where` rule, the third with the scale."""
    torch.manual_seed(0)
    layer = hf_fp8.FP8Linear(32, 16, device="cuda")
    for expected in (False, True, True):
        x = torch.randn(16, 32, device="cuda", requires_grad=True)
        layer(x).sum().backward()
        hf_fp8.update_scales(layer)
        assert layer.fp8_scale.updated_on_host is expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pending async copies exist on CUDA only (run on the GPU machine)")
def test_cuda_model_can_be_deep_copied_and_pickled_between_updates():
    """After CUDA updates a model has async host copies (and their CUDA events) pending for the next
    update; a deep copy (an EMA twin) or torch.save(model) must still work (it raised "cannot pickle
    'Event' object"), and the copy goes on training exactly as the original does."""
    import copy
    import io

    torch.manual_seed(0)
    layer = hf_fp8.FP8Linear(32, 16, device="cuda")
    inputs = [torch.randn(16, 32, device="cuda") for _ in range(4)]
    for x in inputs[:2]:
        layer(x.requires_grad_()).sum().backward()
        hf_fp8.update_scales(layer)
    twin = copy.deepcopy(layer)
    torch.save(layer, io.BytesIO())
    for x in inputs[2:]:
        for module in (layer, twin):
            module(x.detach().requires_grad_()).sum().backward()
            hf_fp8.update_scales(module)
    for name, value in layer.fp8_scale.state_dict().items():
        assert torch.equal(value, twin.fp8_scale.state_dict()[name]), name
    assert twin.fp8_scale.updated_on_host


def test_amax_of_is_the_exact_max_for_any_rank_layout_and_propagates_nan():
    """amax_of reduces per row and then over rows (so torch.compile fuses it with the cast); the
    result must be exactly max|x| for every rank and layout, and NaN anywhere must give NaN."""
    from hf_fp8.scaling import amax_of

    gen = torch.Generator().manual_seed(3)
    # (3, 2048) and (2, 2, 3072) are reduced in pieces of AMAX_CHUNK; (4, 1024) and (2, 1536) per row.
    for shape in [(), (7,), (5, 9), (2, 3, 17), (2, 4, 6, 8), (3, 2048), (2, 2, 3072), (4, 1024), (2, 1536)]:
        x = torch.randn(shape, generator=gen, dtype=torch.bfloat16) * 3
        want = x.float().abs().max()
        assert amax_of(x) == want and amax_of(x).dtype == torch.float32, shape
        if x.dim() >= 2:
            assert amax_of(x.transpose(-1, -2)) == want, shape  # a transposed view: same max
        y = x.clone().reshape(-1)
        y[len(y) // 2] = float("nan")
        assert amax_of(y.reshape(shape)).isnan(), shape


def test_amax_of_reduces_long_rows_in_pieces_of_amax_chunk():
    """A last dim longer than AMAX_CHUNK (and divisible by it) is reduced in 1024-element pieces, so
    that inductor runs the amax and the cast beside it without a loop over the row (RESULTS (36): the
    8B slice's SwiGLU backward 0.76 -> 0.65 ms per layer); shorter or indivisible rows per row. Checked
    on the traced graph: the first amax's input shape."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from hf_fp8.scaling import AMAX_CHUNK, amax_of

    def first_amax_input_shape(x):
        graph = make_fx(amax_of)(x).graph
        node = next(n for n in graph.nodes if n.target == torch.ops.aten.amax.default)
        return tuple(node.args[0].meta["val"].shape)

    assert AMAX_CHUNK == 1024
    assert first_amax_input_shape(torch.randn(8, 14336)) == (8, 14, 1024)
    assert first_amax_input_shape(torch.randn(2, 8, 4096).transpose(1, 2)) == (2, 8, 4, 1024)  # memory order
    assert first_amax_input_shape(torch.randn(8, 1024)) == (8, 1024)
    assert first_amax_input_shape(torch.randn(8, 1536)) == (8, 1536)


def _compiled_silu_mul_cast(rows: int, cols: int):
    """SiLU(gate) * up with its amax and E4M3 cast (scale 8) compiled on the GPU: (the FP8 output, the
    names of the Triton kernels that read gate and up, h in FP32, the recorded amax)."""
    from torch._inductor.utils import run_and_get_code

    from hf_fp8.scaling import amax_of

    def silu_mul_cast(g, u, scale, pending):
        h = torch.nn.functional.silu(g) * u
        pending.copy_(torch.maximum(pending, amax_of(h)))
        return (h.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    g, u = (torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pending, scale = torch.zeros((), device="cuda"), torch.tensor(8.0, device="cuda")
    torch._dynamo.reset()
    out, (code,) = run_and_get_code(torch.compile(silu_mul_cast, dynamic=False), g, u, scale, pending)
    # Inductor names each kernel after the ops it runs.
    silu = [k for k in set(re.findall(r"def (triton_\w+)\(", code)) if "silu" in k]
    return out, silu, torch.nn.functional.silu(g.float()) * u.float(), pending


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU (Triton) fusion is what is checked")
def test_compiled_cast_of_a_long_row_runs_without_a_loop_over_the_row():
    """SiLU(gate) * up at the 8B FFN width (14336): with the amax per whole row inductor emitted a
    looping reduction kernel (`triton_red`, 2.5 TB/s in the training step); in pieces of 1024 it is a
    persistent one (`triton_per`) that also holds the SiLU and the cast."""
    out, silu, h, pending = _compiled_silu_mul_cast(512, 14336)
    assert len(silu) == 1 and silu[0].startswith("triton_per_") and "amax" in silu[0], silu
    assert torch.allclose(pending, h.abs().max(), rtol=1e-2)
    assert sqnr(h, out.float() / 8.0) > 25  # dB; E4M3 rounding alone gives ~31


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU (Triton) fusion is what is checked")
def test_compiled_cast_reads_its_input_once_with_the_amax_in_the_same_kernel():
    """Under torch.compile the amax and the FP8 cast of SiLU(gate) * up must be one kernel: with a
    whole-tensor amax inductor emitted a separate reduction kernel that read gate and up a second
    time (581 us vs 337 us at 16384 x 8192 on an H200)."""
    out, silu, h, pending = _compiled_silu_mul_cast(256, 512)
    assert len(silu) == 1 and "amax" in silu[0] and "clamp" in silu[0], f"gate/up read by {silu}"
    assert torch.allclose(pending, h.abs().max(), rtol=1e-2)
    torch.testing.assert_close(out.float(), (h * 8).clamp(-E4M3_MAX, E4M3_MAX), rtol=0.07, atol=0.02)
