"""FSDP2 FP8 weight all-gather with the delayed weight scale (hf_fp8.distributed.enable_fp8_all_gather):
2 and 4 CPU processes over gloo (every spawned check runs at both sizes, `all_worlds` of
test_distributed), the tiny Llama of test_distributed, 4 AdamW steps on a global batch of 4 sequences.

Compared runs (same seeds, same data):
  fp32:  plain FSDP2 (fp32 all-gather) vs FP8 all-gather, fp32 parameters. The FP8 weight is cast
         per shard with the same scale the plain run computes from the unsharded weight (the dynamic
         scale of the all-reduced amax before the first update, the delayed one after), so the runs
         agree bitwise: losses, and all amax histories and scales.
  bf16:  FSDP2 with MixedPrecisionPolicy(param_dtype=bf16) (bf16 all-gather) vs FP8 all-gather under
         the same policy. The FP8 run casts the fp32 shard to E4M3 directly, the bf16 run casts the
         bf16-rounded weight: a few E4M3 values round differently. Tolerance: relative 2e-3 on the
         losses (measured over the 4 steps: 2 ranks 6.3e-5, 7.0e-5, 1.0e-5, 1.1e-4; 4 ranks 9.0e-5,
         1.8e-4, 3.4e-5, 7.4e-5).
All-gathered bytes per step are counted at torch.distributed.all_gather_single (FSDP2's collective):
every FP8Linear weight costs 1 byte/element instead of 2 (bf16) or 4 (fp32); the RMSNorm weights and
embeddings are all-gathered as before. Each rank sends its 1/world_size shard (every dim 0 of the
tiny Llama divides by 2 and 4: no padding), so the expected byte counts scale with 1/world_size.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hf_fp8
from hf_fp8.distributed import enable_fp8_all_gather
from hf_fp8.fsdp import DelayedFloat8AllGatherWeight
from hf_fp8.scaling import delayed_scale_states
from hf_fp8._torchao import Float8TrainingTensor

from test_distributed import (
    LR,
    WEIGHT,
    all_worlds,
    fp8_llama,
    fp8_state,
    global_batches,
    init_gloo,
    mean_over_ranks,
    shard_of,
    spawn,
)

LOSS_RTOL_BF16 = 2e-3


class AllGatherBytes:
    """Records (dtype, bytes) of each all_gather_single input while `active`."""

    def __init__(self):
        self.calls = []
        self.active = False
        self.real = dist.all_gather_single

        def recording(output, input, *args, **kwargs):
            if self.active:
                self.calls.append((str(input.dtype), input.numel() * input.element_size()))
            return self.real(output, input, *args, **kwargs)

        dist.all_gather_single = recording

    def restore(self):
        dist.all_gather_single = self.real


def _model(fp8_all_gather: bool, mp: bool, seed: int = 0):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = fp8_llama(seed)
    if fp8_all_gather:
        enable_fp8_all_gather(model)
    kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)} if mp else {}
    for layer in model.model.layers:
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    return model


def _fp8_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, hf_fp8.FP8Linear)]


def _run(rank, world, fp8_all_gather, mp, recorder, ckpt_dir=None):
    from torch.distributed.tensor import DTensor

    model = _model(fp8_all_gather, mp)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    hf_fp8.attach(model, opt)
    q = model.model.layers[0].self_attn.q_proj
    seen = []
    q.register_forward_pre_hook(lambda m, a: seen.append(type(m.weight).__name__))
    out = {"losses": [], "state": [], "bytes": [], "history_vs_full": []}
    for step, x in enumerate(global_batches()):
        full_max = {n: m.weight.full_tensor().abs().max().item() for n, m in _fp8_modules(model)}
        mine = shard_of(x, rank, world)
        recorder.calls, recorder.active = [], True
        loss = model(input_ids=mine, labels=mine).loss
        loss.backward()
        recorder.active = False
        out["bytes"].append(list(recorder.calls))
        opt.step()
        opt.zero_grad(set_to_none=True)
        out["losses"].append(mean_over_ranks(loss.item()))
        out["state"].append(fp8_state(model))
        states = dict(delayed_scale_states(model))
        out["history_vs_full"] += [(n, states[n].amax_history[WEIGHT, 0].item(), v) for n, v in full_max.items()]
    out["weight_type_in_forward"] = seen[0]
    out["weight_outside"] = (type(q.weight).__name__, type(q.weight._local_tensor).__name__, q.weight._local_tensor.dtype)
    out["optim_state_types"] = sorted({type(v._local_tensor if isinstance(v, DTensor) else v).__name__ for s in opt.state.values() for v in s.values()})
    sd = model.state_dict()
    out["state_dict_local_types"] = sorted({type(v._local_tensor).__name__ for v in sd.values() if isinstance(v, DTensor)})
    lin = sum(m.weight.to_local().numel() for _, m in _fp8_modules(model) if "layers.0." in f"{_}.")
    out["layer0_fp8_shard_numel"] = lin
    out["layer0_shard_numel"] = sum(p.to_local().numel() for p in model.model.layers[0].parameters())
    if ckpt_dir is not None:
        out.update(_dcp_roundtrip(rank, world, model, opt, ckpt_dir))
    return out


def _dcp_roundtrip(rank, world, model, opt, ckpt_dir):
    """Save after the run, load into a fresh FP8-all-gather model and into a plain FSDP2 model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor import DTensor

    msd, osd = get_state_dict(model, opt)
    saved_types = sorted({type(v._local_tensor).__name__ for v in msd.values() if isinstance(v, DTensor)})
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt_dir)
    ref = {k: v.full_tensor() for k, v in msd.items() if isinstance(v, DTensor)}
    res = {"saved_local_types": saved_types, "loaded_equal": {}}
    for fp8_ag in (True, False):
        m = _model(fp8_ag, mp=False, seed=1)
        o = torch.optim.AdamW(m.parameters(), lr=LR)
        hf_fp8.attach(m, o)
        lm, lo = get_state_dict(m, o)
        dcp.load({"model": lm, "optim": lo}, checkpoint_id=ckpt_dir)
        set_state_dict(m, o, model_state_dict=lm, optim_state_dict=lo)
        got, _ = get_state_dict(m, o)
        res["loaded_equal"][fp8_ag] = all(torch.equal(got[k].full_tensor(), v) for k, v in ref.items())
        if fp8_ag:
            res["reloaded_is_wrapped"] = isinstance(m.model.layers[0].self_attn.q_proj.weight._local_tensor, DelayedFloat8AllGatherWeight)
            x = shard_of(global_batches(5)[-1], rank, world)
            res["loss_after_load"] = m(input_ids=x, labels=x).loss.item()
            res["loss_reference"] = model(input_ids=x, labels=x).loss.item()
    return res


def _worker(rank, world, init_file, results, ckpt_dir):
    init_gloo(rank, world, init_file)
    recorder = AllGatherBytes()
    try:
        results[rank] = {
            "ref_fp32": _run(rank, world, False, False, recorder),
            "fp8_fp32": _run(rank, world, True, False, recorder, ckpt_dir),
            "ref_bf16": _run(rank, world, False, True, recorder),
            "fp8_bf16": _run(rank, world, True, True, recorder),
        }
    finally:
        recorder.restore()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory, world):
    tmp = tmp_path_factory.mktemp(f"fsdp_fp8_ag{world}")
    return spawn(_worker, world, tmp, str(tmp / "ckpt"))


@all_worlds
def test_fp8_all_gather_fp32_is_bitwise_the_high_precision_all_gather(results, world):
    for rank in range(world):
        ref, fp8 = results[rank]["ref_fp32"], results[rank]["fp8_fp32"]
        assert fp8["losses"] == ref["losses"]
        for step, (a, b) in enumerate(zip(fp8["state"], ref["state"])):
            assert torch.equal(a, b), f"FP8 state differs from the fp32-all-gather run after step {step + 1}"
    assert results[0]["fp8_fp32"]["losses"][-1] < results[0]["fp8_fp32"]["losses"][0]


@all_worlds
def test_fp8_all_gather_losses_match_bf16_all_gather(results, world):
    ref, fp8 = results[0]["ref_bf16"]["losses"], results[0]["fp8_bf16"]["losses"]
    for rank in range(1, world):
        assert results[rank]["fp8_bf16"]["losses"] == fp8
    assert fp8 == pytest.approx(ref, rel=LOSS_RTOL_BF16)
    print("bf16 vs fp8 all-gather, relative loss differences:", [abs(a - b) / abs(b) for a, b in zip(fp8, ref)])
    assert fp8[-1] < fp8[0]


@all_worlds
def test_amax_histories_identical_on_ranks(results, world):
    for run in ("fp8_fp32", "fp8_bf16"):
        for rank in range(1, world):
            for step, (a, b) in enumerate(zip(results[0][run]["state"], results[rank][run]["state"], strict=True)):
                assert torch.equal(a, b), f"{run}: FP8 state of rank {rank} differs from rank 0's after step {step + 1}"


@all_worlds
def test_weight_amax_history_is_max_abs_of_the_full_weight(results, world):
    for rank in range(world):
        for run in ("fp8_fp32", "fp8_bf16"):
            checks = results[rank][run]["history_vs_full"]
            assert len(checks) == 14 * 4
            for name, hist, full in checks:
                assert hist == full, (run, name)


@all_worlds
def test_all_gathered_bytes_of_fp8_weights_are_halved(results, world):
    r = results[0]
    lin, total = r["fp8_bf16"]["layer0_fp8_shard_numel"], r["fp8_bf16"]["layer0_shard_numel"]
    other = total - lin  # the two RMSNorm weights
    # a decoder layer: 7 FP8Linear weights (q, o: 64x64; k, v: 32x64; gate, up: 128x64; down: 64x128)
    # and 2 RMSNorm weights (64 each); every dim 0 divides by the world size, so no padding
    assert lin == 36864 // world and other == 128 // world
    for step in range(4):
        ref = r["ref_bf16"]["bytes"][step]
        fp8 = r["fp8_bf16"]["bytes"][step]
        ref32 = r["ref_fp32"]["bytes"][step]
        fp8_32 = r["fp8_fp32"]["bytes"][step]
        assert len(ref) == len(fp8) == len(ref32) == len(fp8_32)
        # decoder-layer all-gathers (forward and backward re-gather): FP8 weights at 1 byte/element
        assert ref.count(("torch.bfloat16", 2 * (lin + other))) == 4
        assert fp8.count(("torch.uint8", lin + 2 * other)) == 4
        assert ref32.count(("torch.float32", 4 * (lin + other))) == 4
        assert fp8_32.count(("torch.uint8", lin + 4 * other)) == 4
        # the root group (embeddings, final norm, lm_head: no FP8Linear there) is all-gathered as before
        root = ("torch.bfloat16", 2 * (2 * 256 * 64 + 64) // world)
        assert ref.count(root) == fp8.count(root) >= 1
        saved = sum(b for _, b in ref) - sum(b for _, b in fp8)
        assert saved == 4 * lin  # bf16 -> fp8: exactly half the bytes of every FP8Linear weight
    assert sum(b for _, b in fp8) / sum(b for _, b in ref) < 0.6


@all_worlds
def test_parameters_stay_fp32_shards_and_forward_sees_fp8(results):
    r = results[0]["fp8_fp32"]
    assert r["weight_type_in_forward"] == "Float8TrainingTensor"
    assert r["weight_outside"] == ("DTensor", "DelayedFloat8AllGatherWeight", torch.float32)
    assert r["optim_state_types"] == ["Tensor"]
    assert r["state_dict_local_types"] == ["Tensor"]
    assert results[0]["ref_fp32"]["weight_type_in_forward"] == "Parameter"


@all_worlds
def test_dcp_checkpoint_holds_plain_shards_and_loads_both_ways(results, world):
    for rank in range(world):
        r = results[rank]["fp8_fp32"]
        assert r["saved_local_types"] == ["Tensor"]
        assert r["loaded_equal"] == {True: True, False: True}
        assert r["reloaded_is_wrapped"]
        assert r["loss_after_load"] == r["loss_reference"]


def test_enable_fp8_all_gather_refuses_bad_calls():
    with pytest.raises(ValueError, match="no FP8 layers"):
        from test_distributed import tiny_llama

        enable_fp8_all_gather(tiny_llama())
    model = fp8_llama()
    enable_fp8_all_gather(model)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(w, DelayedFloat8AllGatherWeight)
    enable_fp8_all_gather(model)  # idempotent
    assert model.model.layers[0].self_attn.q_proj.weight is w
    # without FSDP the wrapped weight is an ordinary weight for the FP8 layer
    x = torch.randint(0, 256, (2, 32))
    ref = fp8_llama()
    assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert set(model.state_dict()) == set(ref.state_dict())
    assert all(type(v) is torch.Tensor for v in model.state_dict().values())
