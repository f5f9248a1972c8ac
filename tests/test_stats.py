"""fp8_stats / collect_fp8_stats: overflow/underflow fractions, kurtosis, hooks only on stats steps.

Everything runs on CPU with the real FP8 layers (torch._scaled_mm) and the hf_fp8 reference FP8
attention, on a tiny Llama built from its config (hidden 64, 2 layers, 4/2 heads, vocab 256).
Inputs are fresh random tensors from seeded generators; the one crafted tensor (section 2) is
random except for the elements placed on the overflow/underflow boundaries being tested.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers

import hf_fp8
from hf_fp8 import FP8Linear, FP8Recipe, convert_model
from hf_fp8.stats import FP8StepStats, _kurtosis_sum, _token_moments, collect_fp8_stats, decoder_blocks, overflow_threshold

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX, E5M2_MAX = torch.finfo(E4M3).max, torch.finfo(E5M2).max
LINEAR_ROLES = ("input", "weight", "grad_output")
ATTENTION_ROLES_OBSERVED = ("query", "key", "value", "grad_output")  # grad_scores: not observable


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    convert_model(model, FP8Recipe(attention=True))
    return model


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_ids(seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=gen(seed))


def stats_step(model, **inputs) -> FP8StepStats:
    with collect_fp8_stats(model) as stats:
        out = model(**inputs, use_cache=False)
        out.logits.float().pow(2).mean().backward()
    return stats


# --------------------------------------------------------------------------------------------
# 1. Kurtosis through the real hooks
# --------------------------------------------------------------------------------------------


def test_kurtosis_formula_on_known_vectors():
    # One token [1, 0, 0, 0]: mean(x^4) = 1/4, mean(x^2)^2 = 1/16 -> 4. Token [1, -1, 1, -1] -> 1.
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]])
    total, tokens = _kurtosis_sum(*_token_moments(x), 4).tolist()
    assert tokens == 2 and total == pytest.approx(4.0 + 1.0)
    # An all-zero token has no kurtosis: left out of the average instead of giving NaN.
    total, tokens = _kurtosis_sum(*_token_moments(torch.cat([x, torch.zeros(1, 4)])), 4).tolist()
    assert tokens == 2 and total == pytest.approx(5.0)


def test_decoder_blocks_found_from_config():
    model = tiny_llama()
    assert [n for n, _ in decoder_blocks(model)] == ["model.layers.0", "model.layers.1"]


def test_kurtosis_is_about_3_for_gaussian_activations():
    """inputs_embeds ~ N(0, 1): every block output is the gaussian input plus small random-init
    updates, and the QKV outputs are random projections of the normalised gaussian, so all are
    (near) gaussian per token: kurtosis 3 up to sampling noise (observed 2.91-2.98)."""
    model = tiny_llama()
    embeds = torch.randn(4, 32, 64, generator=gen(1))
    stats = stats_step(model, inputs_embeds=embeds)
    k = stats.kurtosis
    assert set(k) == {"qkv", "mlp_down_input", "block_output"}
    for site in ("qkv", "block_output"):
        assert sorted(k[site]["per_layer"]) == ["model.layers.0", "model.layers.1"]
        for layer, value in k[site]["per_layer"].items():
            assert abs(value - 3.0) < 0.2, (site, layer, value)
        assert k[site]["mean"] == pytest.approx(sum(k[site]["per_layer"].values()) / 2)
        assert k[site]["max"] == max(k[site]["per_layer"].values())
    # Reference for the block output of layer 0, computed here from the input: the block adds
    # small updates to the embeddings, so their kurtosis is within 0.1 of the input's.
    e = embeds.double()
    k_in = ((e**4).mean(-1) / (e**2).mean(-1) ** 2).mean().item()
    assert abs(k["block_output"]["per_layer"]["model.layers.0"] - k_in) < 0.1


def test_kurtosis_far_above_3_with_an_injected_outlier_channel():
    """One hidden channel of the embeddings 100x the others -> every block output carries it
    (residual stream): per token kurtosis ~ 64 * 100^4 / (100^2 + 63)^2 ~ 63. One output row of
    layer 1's q_proj scaled 100x -> an outlier feature among the 128 QKV features of layer 1 only.
    One up_proj row of layer 0 scaled 100x -> an outlier channel in layer 0's down_proj input."""
    model = tiny_llama()
    embeds = torch.randn(4, 32, 64, generator=gen(2))
    baseline = stats_step(model, inputs_embeds=embeds).kurtosis

    embeds[..., 7] = 100.0 * torch.sign(embeds[..., 7])
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[5] *= 100.0
        model.model.layers[0].mlp.up_proj.weight[9] *= 100.0
    k = stats_step(model, inputs_embeds=embeds).kurtosis

    for layer in ("model.layers.0", "model.layers.1"):
        assert k["block_output"]["per_layer"][layer] > 50
    assert k["qkv"]["per_layer"]["model.layers.1"] > 50
    assert abs(k["qkv"]["per_layer"]["model.layers.0"] - 3.0) < 0.5  # layer 0's q/k/v untouched
    assert k["mlp_down_input"]["per_layer"]["model.layers.0"] > 50
    assert k["mlp_down_input"]["per_layer"]["model.layers.0"] > 5 * baseline["mlp_down_input"]["per_layer"]["model.layers.0"]
    assert k["qkv"]["max"] == k["qkv"]["per_layer"]["model.layers.1"]


# --------------------------------------------------------------------------------------------
# 2. Overflow / underflow fractions, hand-counted, through one FP8Linear with known scales
# --------------------------------------------------------------------------------------------


def test_overflow_thresholds_are_the_rounding_limits_of_fp8_max():
    assert overflow_threshold(E4M3) == 464.0  # 448 + half its ulp 32
    assert overflow_threshold(E5M2) == 61440.0  # 57344 + half its ulp 8192
    # Just below the threshold torch's cast still rounds to fp8_max (so those values are not clipped).
    assert torch.tensor(463.9).to(E4M3).float().item() == 448.0
    assert torch.tensor(61439.0).to(E5M2).float().item() == 57344.0


def test_overflow_underflow_fractions_match_hand_count_single_linear():
    torch.manual_seed(0)
    layer = FP8Linear(32, 16)
    s_in, s_w, s_go = 4.0, 1000.0, 2.0**10
    state = layer.fp8_scale
    with torch.no_grad():
        state.scale.copy_(torch.tensor([s_in, s_w, s_go]))
        state.initialized.fill_(True)

    # Input (8, 32) = 256 elements, random in +-[0.5, 2) (x * 4 well inside E4M3), then:
    g = gen(3)
    x = torch.empty(8, 32).uniform_(0.5, 2.0, generator=g) * (torch.randint(0, 2, (8, 32), generator=g) * 2 - 1)
    x[0, 0] = 200.0  #          x*s = 800          > 464: overflow
    x[0, 1] = -117.0  #         x*s = -468         > 464: overflow
    x[0, 2] = 115.9  #          x*s = 463.6       <= 464: rounds to 448, not clipped
    x[1, 0] = 2.0**-13  #       x*s = 2**-11      <= 2**-10: flushes to 0: underflow
    x[1, 1] = -(2.0**-12)  #    x*s = -2**-10, the tie: rounds to even (0): underflow
    x[1, 2] = 2.0**-11  #       x*s = 2**-9, smallest subnormal: kept
    x[1, 3] = 0.0  #            exact zero: stays zero, not an underflow
    # Weight (16, 32) = 512 elements, random in +-[0.01, 0.1) (w * 1000 well inside E4M3), then:
    w = torch.empty(16, 32).uniform_(0.01, 0.1, generator=g)
    w[3, 4] = 0.5  #            w*s = 500: overflow
    w[5, 6] = 1e-7  #           w*s = 1e-4 < 2**-10: underflow
    w[5, 7] = -3e-7  #          w*s = -3e-4 < 2**-10: underflow
    with torch.no_grad():
        layer.weight.copy_(w)
    # Grad-output (8, 16) = 128 elements (E5M2: overflow beyond 61440, underflow at or below 2**-17):
    go = torch.empty(8, 16).uniform_(0.5, 2.0, generator=g)
    go[0, 0] = 70.0  #          70 * 1024 = 71680 > 61440: overflow
    go[0, 1] = 59.0  #          59 * 1024 = 60416: rounds to 57344, not clipped
    go[2, 0] = 2.0**-28  #      2**-18: underflow
    go[2, 1] = 2.0**-27  #      2**-17, the tie: underflow
    go[2, 2] = 2.0**-26  #      2**-16, smallest E5M2 subnormal: kept

    layer.train()
    with collect_fp8_stats(layer) as stats:
        out = layer(x)
        out.backward(go)

    roles = stats.layers["<root>"]
    assert roles["input"]["overflow_fraction"] == 2 / 256
    assert roles["input"]["underflow_fraction"] == 2 / 256
    assert roles["weight"]["overflow_fraction"] == 1 / 512
    assert roles["weight"]["underflow_fraction"] == 2 / 512
    assert roles["grad_output"]["overflow_fraction"] == 1 / 128
    assert roles["grad_output"]["underflow_fraction"] == 2 / 128
    # The scaling-state fields are still there, with the scales the casts used.
    assert roles["input"]["scale"] == s_in and roles["grad_output"]["scale"] == s_go
    assert set(roles["input"]) >= {"amax", "last_amax", "scale", "initialized", "nonfinite_skips"}
    flat = stats.flat()
    assert flat["fp8/overflow_max"] == 2 / 256
    assert flat["fp8/underflow_max"] == 2 / 128
    assert flat["fp8/overflow_max/linear/weight"] == 1 / 512


def test_fractions_pool_micro_batches_and_skip_roles_without_backward():
    torch.manual_seed(0)
    layer = FP8Linear(32, 16)
    with torch.no_grad():
        layer.fp8_scale.scale.fill_(4.0)
        layer.fp8_scale.initialized.fill_(True)
    a = torch.empty(4, 32).uniform_(0.5, 1.0, generator=gen(4))
    b = a.clone()
    a[0, :4] = 500.0  # 4 overflows in the first micro-batch, none in the second
    with collect_fp8_stats(layer) as stats, torch.no_grad():
        layer(a)
        layer(b)
    roles = stats.layers["<root>"]
    assert roles["input"]["overflow_fraction"] == 4 / 256
    assert "overflow_fraction" not in roles["grad_output"]  # no backward ran in the stats step
    assert "fp8/overflow_max/linear/grad_output" not in stats.flat()


# --------------------------------------------------------------------------------------------
# 3. The model-level stats step: every FP8 layer and role, JSON, and no cost outside it
# --------------------------------------------------------------------------------------------


def test_stats_step_covers_linears_and_attention_and_is_json_serializable():
    model = tiny_llama()
    ids = random_ids(5)
    stats = stats_step(model, input_ids=ids)

    linears = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    attentions = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert sorted(stats.layers) == sorted(linears + attentions)
    for name in linears:
        for role in LINEAR_ROLES:
            assert 0.0 <= stats.layers[name][role]["overflow_fraction"] <= 1.0, (name, role)
            assert 0.0 <= stats.layers[name][role]["underflow_fraction"] <= 1.0, (name, role)
    for name in attentions:
        for role in ATTENTION_ROLES_OBSERVED:
            assert "overflow_fraction" in stats.layers[name][role], (name, role)
        assert "overflow_fraction" not in stats.layers[name]["grad_scores"]

    flat = stats.flat()
    assert json.loads(json.dumps(flat)) == flat
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())
    for key in (
        "fp8/kurtosis/qkv_mean", "fp8/kurtosis/qkv_max", "fp8/kurtosis/mlp_down_input_mean",
        "fp8/kurtosis/block_output_mean", "fp8/overflow_max", "fp8/underflow_max",
        "fp8/overflow_max/attention/query", "fp8/underflow_max/linear/grad_output", "fp8/nonfinite_skips",
    ):
        assert key in flat, key
    full = json.loads(json.dumps(stats.to_dict(), allow_nan=False))
    assert set(full) == {"layers", "kurtosis"}
    assert full["kurtosis"]["qkv"]["per_layer"].keys() == {"model.layers.0", "model.layers.1"}
    assert "kurtosis/qkv_mean" in repr(stats)
    # fp8_stats alone is the scaling state, without step fractions.
    plain = hf_fp8.fp8_stats(model)
    assert plain.keys() == stats.layers.keys()
    assert "overflow_fraction" not in plain[linears[0]]["input"]


def _hook_snapshot(model):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hooks = {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks))
        for name, m in model.named_modules()
    }
    return hooks, ALL_ATTENTION_FUNCTIONS["hf_fp8"]


def test_no_hook_is_installed_or_runs_outside_a_stats_step(monkeypatch):
    from hf_fp8 import stats as stats_mod
    from hf_fp8.attention import hf_fp8_attention_forward

    calls = {"observe": 0, "moments": 0}
    observe, moments = FP8StepStats._observe, stats_mod._token_moments

    def counting_observe(self, *args):
        calls["observe"] += 1
        return observe(self, *args)

    def counting_moments(x):
        calls["moments"] += 1
        return moments(x)

    monkeypatch.setattr(FP8StepStats, "_observe", counting_observe)
    monkeypatch.setattr(stats_mod, "_token_moments", counting_moments)

    model = tiny_llama()
    before = _hook_snapshot(model)
    assert before[1] is hf_fp8_attention_forward
    assert all(counts == (0, 0, 0, 0) for counts in before[0].values())

    def ordinary_step(seed):
        ids = random_ids(seed)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    ordinary_step(6)
    assert calls == {"observe": 0, "moments": 0}

    with collect_fp8_stats(model) as stats:
        during = _hook_snapshot(model)
        assert during[1] is not hf_fp8_attention_forward  # the observing wrapper
        assert sum(c[0] + c[1] for c in during[0].values()) > 0
        ordinary_step(7)
    observed = dict(calls)
    # 14 linears x 3 roles + 2 attentions x 4 observable roles; 2 blocks x (3 qkv + 1 down + 1 output).
    assert observed == {"observe": 14 * 3 + 2 * 4, "moments": 2 * 5}
    assert stats.layers is not None

    assert _hook_snapshot(model) == before
    ordinary_step(8)
    assert calls == observed  # nothing ran after the stats step

    # A backward after the stats step ended is not observed either (its tensor hooks are inert).
    with collect_fp8_stats(model):
        ids = random_ids(9)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    forward_only = dict(calls)
    loss.backward()
    assert calls == forward_only
    assert _hook_snapshot(model) == before


def test_stats_step_refuses_nesting_and_results_need_the_step_to_end():
    model = tiny_llama()
    stats = collect_fp8_stats(model)
    with pytest.raises(RuntimeError, match="ended"):
        stats.flat()
    with stats:
        with pytest.raises(RuntimeError, match="already running"):
            collect_fp8_stats(model).start()
        with torch.no_grad():
            model(input_ids=random_ids(10), use_cache=False)
    assert stats.flat()["fp8/nonfinite_skips"] == 0.0
    # Explicit start/stop (for training loops that cannot wrap a step in `with`).
    stats = collect_fp8_stats(model).start()
    with torch.no_grad():
        model(input_ids=random_ids(11), use_cache=False)
    assert "fp8/kurtosis/qkv_mean" in stats.stop().flat()


def test_fallback_attention_module_is_not_observed():
    """A module running its BF16 fallback casts nothing to FP8: no fractions are reported for it."""
    model = tiny_llama()
    model.model.layers[0].self_attn.fp8_attention_fallback = "test"
    stats = stats_step(model, input_ids=random_ids(12))
    assert "overflow_fraction" not in stats.layers["model.layers.0.self_attn"]["query"]
    assert "overflow_fraction" in stats.layers["model.layers.1.self_attn"]["query"]


@pytest.mark.parametrize(
    "config_cls, model_cls, kwargs",
    [
        # Fused QKV GEMMs: GPT-2 `attn.c_attn` (Conv1D; `mlp.c_proj` is its down-projection, while
        # `attn.c_proj` is not), GPT-NeoX `query_key_value` / `dense_4h_to_h`, Phi3 `qkv_proj`.
        ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, attn_pdrop=0.0, n_positions=64)),
        ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)),
        ("Phi3Config", "Phi3ForCausalLM", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)),
    ],
)
def test_kurtosis_sites_found_in_other_families(config_cls, model_cls, kwargs):
    config = getattr(transformers, config_cls)(vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    convert_model(model)
    stats = stats_step(model, input_ids=random_ids(13))
    blocks = [n for n, _ in decoder_blocks(model)]
    assert len(blocks) == 2
    for site in ("qkv", "mlp_down_input", "block_output"):
        assert sorted(stats.kurtosis[site]["per_layer"]) == blocks, site
        assert all(1.0 < v < 20.0 for v in stats.kurtosis[site]["per_layer"].values()), site


def test_cast_sqnr_is_the_formats_precision_in_range_and_drops_when_saturating():
    """sqnr_db = 10 log10(sum y^2 / sum (fp8(y) - y)^2), y = x * scale, pooled over the step's casts.
    Within range it is the format's relative precision (~31.5 dB E4M3, ~25.6 dB E5M2, whatever the
    distribution); a scale 16x too large clips the top of the tensor and it falls below 20 dB."""
    torch.manual_seed(0)
    layer = FP8Linear(64, 32)
    x = torch.randn(128, 64, generator=gen(11)) * 3
    go = torch.randn(128, 32, generator=gen(12)) * 1e-3

    def run(factor):
        state = layer.fp8_scale
        with torch.no_grad():
            amaxes = torch.stack([x.abs().max(), layer.weight.abs().max(), go.abs().max()])
            state.scale.copy_(torch.tensor([E4M3_MAX, E4M3_MAX, E5M2_MAX]) / amaxes * factor)
            state.initialized.fill_(True)
        with collect_fp8_stats(layer) as stats:
            layer(x).backward(go)
        return stats, state.scale.clone()

    stats, scales = run(1.0)
    roles = stats.layers["<root>"]
    for role, lo, hi in (("input", 30.5, 32.5), ("weight", 30.5, 32.5), ("grad_output", 24.5, 26.5)):
        assert lo < roles[role]["sqnr_db"] < hi, (role, roles[role]["sqnr_db"])
    # The same number from the definition, in float64, for the input.
    y = (x.float() * scales[0]).double()  # x * scale in float32, as the cast computes it
    q = (x.float() * scales[0]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).double()
    want = 10 * math.log10(y.square().sum().item() / (q - y).square().sum().item())
    assert roles["input"]["sqnr_db"] == pytest.approx(want, rel=1e-6)  # float32 sums
    flat = stats.flat()
    assert flat["fp8/sqnr_min_db"] == min(r["sqnr_db"] for r in roles.values() if "sqnr_db" in r)
    assert flat["fp8/sqnr_min_db/linear/grad_output"] == roles["grad_output"]["sqnr_db"]
    assert flat["fp8/sqnr_db/<root>/input"] == roles["input"]["sqnr_db"]  # a root layer is named <root>

    saturated, _ = run(16.0)
    for role in ("input", "weight", "grad_output"):
        assert saturated.layers["<root>"][role]["sqnr_db"] < 20, role


def test_cast_sqnr_of_an_exact_or_zero_tensor_is_inf_or_absent():
    from hf_fp8.stats import cast_counts, sqnr_db

    exact = torch.tensor([1.0, -2.0, 0.5, 448.0])  # all representable in E4M3 at scale 1
    over, under, n, signal, noise = cast_counts(exact, torch.tensor(1.0), E4M3).tolist()
    assert (over, under, n, noise) == (0, 0, 4, 0) and signal > 0 and sqnr_db(signal, noise) == math.inf
    assert sqnr_db(*cast_counts(torch.zeros(8), torch.tensor(1.0), E4M3).tolist()[3:]) is None
