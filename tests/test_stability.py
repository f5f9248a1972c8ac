"""apply_attention_stability: "fog-guard" (architecture change, recorded in the config) and
"preserve" (BF16 attention fallback for modules whose query/key amax spiked; nothing else changes).

CPU, tiny models built from their configs (hidden 64, 2 layers, 4/2 heads, head_dim 16, vocab 256),
fresh random token ids from seeded generators.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

import hf_fp8
from hf_fp8 import FP8Linear, FP8Recipe, convert_model, update_scales
from hf_fp8.stability import CONFIG_ATTR, MODES, StabilityReport, apply_attention_stability, fog_softmax_scale

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
HEAD_DIM = 16
ATTN = ("model.layers.0.self_attn", "model.layers.1.self_attn")


def tiny(arch: str = "Llama", seed: int = 0, **overrides):
    config = getattr(transformers, f"{arch}Config")(**{**TINY, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, f"{arch}ForCausalLM")(config).eval()


def random_ids(seed: int, batch: int = 2, seq: int = 16) -> torch.Tensor:
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def capture_outputs(model, names):
    """Register forward hooks that store each named module's output; returns (store, handles)."""
    store, handles = {}, []
    for name in names:
        def hook(module, args, output, name=name):
            store[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return store, handles


# --------------------------------------------------------------------------------------------
# fog-guard
# --------------------------------------------------------------------------------------------


def test_fog_guard_normalises_q_and_k_per_head_and_raises_softmax_scale():
    model = tiny()
    keys_before = sorted(model.state_dict())
    ids = random_ids(1)
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits

    report = apply_attention_stability(model, "fog-guard")

    assert isinstance(report, StabilityReport) and report.mode == "fog-guard"
    assert sorted(report.changed) == list(ATTN) and report.unchanged == {}
    expected_scale = math.sqrt(2 / HEAD_DIM)  # sqrt(2) x 1/sqrt(16) = 0.35355
    assert report.softmax_scale == pytest.approx(expected_scale)
    assert fog_softmax_scale(128) == 0.125  # the paper's 1.5B value at head_dim 128
    for name in ATTN:
        assert model.get_submodule(name).scaling == pytest.approx(expected_scale)
    assert getattr(model.config, CONFIG_ATTR) == {"mode": "fog-guard", "softmax_scale": report.softmax_scale, "eps": 1e-6}
    assert sorted(model.state_dict()) == keys_before  # no new parameter or buffer
    assert "softmax scale 0.25 -> 0.353553" in str(report)

    # The hooks registered last run last: they see q_proj/k_proj outputs after the guard.
    projections = [f"{a}.{p}" for a in ATTN for p in ("q_proj", "k_proj")]
    seen, handles = capture_outputs(model, projections)
    with torch.no_grad():
        logits_after = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    for name in projections:
        heads = seen[name].reshape(2, 16, -1, HEAD_DIM)
        rms = heads.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-4, msg=name)
    assert not torch.allclose(logits_before, logits_after)  # an architecture change, by design


def test_fog_guard_is_idempotent():
    model = tiny()
    apply_attention_stability(model, "fog-guard")
    ids = random_ids(2)
    with torch.no_grad():
        once = model(input_ids=ids).logits
    report = apply_attention_stability(model, "fog-guard")
    assert report.changed == {} and sorted(report.unchanged) == list(ATTN)
    attn = model.model.layers[0].self_attn
    assert len(attn._forward_pre_hooks) == 1 and len(attn.q_proj._forward_hooks) == 1
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, once, rtol=0, atol=0)
    # A different scale on a guarded model changes only the scale.
    report = apply_attention_stability(model, "fog-guard", softmax_scale=0.5)
    assert attn.scaling == 0.5 and "0.353553 -> 0.5" in report.changed[ATTN[0]]
    assert len(attn.q_proj._forward_hooks) == 1


def test_fog_guard_survives_save_pretrained_from_pretrained(tmp_path):
    model = tiny(seed=3)
    apply_attention_stability(model, "fog-guard", softmax_scale=0.3)
    ids = random_ids(4)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)

    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(loaded.config, CONFIG_ATTR)["softmax_scale"] == 0.3
    with torch.no_grad():
        plain = loaded(input_ids=ids).logits
    assert not torch.allclose(plain, expected)  # transformers alone does not know the guard
    report = apply_attention_stability(loaded)  # mode (and scale) read from the config
    assert report.mode == "fog-guard" and report.softmax_scale == 0.3
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_fog_guard_holds_across_fp8_conversion():
    """convert_model replaces q_proj/k_proj with new FP8Linear modules, which carry no hooks; the
    guard re-attaches its norm on the next forward. The FP8 model then matches the guarded
    high-precision model up to FP8 rounding, and its q_proj outputs are still unit-RMS per head."""
    model = tiny(seed=5)
    apply_attention_stability(model, "fog-guard")
    ids = random_ids(6)
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    convert_model(model, FP8Recipe(attention=True))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, FP8Linear)
    seen, handles = capture_outputs(model, [f"{ATTN[0]}.q_proj"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    handles[0].remove()
    rms = seen[f"{ATTN[0]}.q_proj"].reshape(2, 16, -1, HEAD_DIM).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=0, atol=1e-4)
    rel = ((logits - reference).norm() / reference.norm()).item()
    assert rel < 0.15  # observed ~0.07 (E4M3 rounding); a lost guard gives O(1)
    # Applying it again after conversion keeps one norm per projection.
    apply_attention_stability(model, "fog-guard")
    assert len(model.model.layers[0].self_attn.q_proj._forward_hooks) == 1


def test_stats_kurtosis_sees_the_qkv_gemm_output_of_a_guarded_model():
    """Like the paper (and the FOG model, whose guard is a module after q_proj), QKV kurtosis is
    measured on the projection output before the per-head norm: layer 0 gets the same input with
    and without the guard, so its QKV kurtosis is the same; layer 1's input differs."""
    ids = random_ids(8)
    kurtosis = []
    for guarded in (False, True):
        model = tiny(seed=9)
        if guarded:
            apply_attention_stability(model, "fog-guard")
        with hf_fp8.stats.collect_fp8_stats(model) as stats, torch.no_grad():
            model(input_ids=ids)
        kurtosis.append(stats.kurtosis["qkv"]["per_layer"])
    assert kurtosis[1]["model.layers.0"] == pytest.approx(kurtosis[0]["model.layers.0"], rel=1e-9)
    assert kurtosis[1]["model.layers.1"] != pytest.approx(kurtosis[0]["model.layers.1"], rel=1e-6)


def test_fog_guard_refuses_models_with_qk_norms_or_fused_qkv():
    qwen3 = tiny("Qwen3", head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match=r"Qwen3Attention.*already normalises Q and K \(q_norm/k_norm\)"):
        apply_attention_stability(qwen3, "fog-guard")
    assert not hasattr(qwen3.config, CONFIG_ATTR)  # nothing recorded, nothing changed
    assert qwen3.model.layers[0].self_attn.scaling == HEAD_DIM**-0.5
    phi3 = tiny("Phi3")
    with pytest.raises(ValueError, match=r"Phi3Attention.*no q_proj, k_proj.*fused QKV"):
        apply_attention_stability(phi3, "fog-guard")


def test_unknown_mode_and_missing_mode_are_value_errors():
    model = tiny()
    with pytest.raises(ValueError, match="unknown mode 'fog'; modes: 'fog-guard', 'preserve'"):
        apply_attention_stability(model, "fog")
    with pytest.raises(ValueError, match="no mode given"):
        apply_attention_stability(model)
    assert MODES == ("fog-guard", "preserve")


# --------------------------------------------------------------------------------------------
# preserve
# --------------------------------------------------------------------------------------------


def fp8_llama_with_history(steps: int = 3):
    """A converted tiny Llama (FP8 attention) after `steps` recorded forward/backward passes, each
    followed by update_scales, so every amax history holds `steps` entries."""
    model = tiny(seed=7)
    convert_model(model, FP8Recipe(attention=True))
    model.train()
    for step in range(steps):
        ids = random_ids(10 + step)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        update_scales(model)
    model.zero_grad()
    return model.eval()


def test_preserve_falls_back_only_for_the_layer_whose_query_amax_spiked():
    model = fp8_llama_with_history()
    ids = random_ids(20)
    outputs, handles = capture_outputs(model, ATTN)
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
    before = dict(outputs)
    state = model.get_submodule(ATTN[1]).fp8_attention_scale
    q = state.index("query")
    with torch.no_grad():
        state.amax_history[q, 0] = 5.0 * state.amax_history[q, 1:].max()  # a 5x spike at the last step

    report = apply_attention_stability(model, "preserve")

    assert report.fallback == [ATTN[1]]
    assert list(report.changed) == [ATTN[1]] and list(report.unchanged) == [ATTN[0]]
    reason = model.get_submodule(ATTN[1]).fp8_attention_fallback
    assert "query amax" in reason and "5x" in reason and "limit 2x" in reason
    assert not getattr(model.get_submodule(ATTN[0]), "fp8_attention_fallback", None)
    assert ATTN[1] in str(report) and "runs BF16 attention" in str(report)

    with torch.no_grad():
        logits_after = model(input_ids=ids).logits
    for h in handles:
        h.remove()
    # Layer 0 keeps FP8 attention: its output is bit-identical. Layer 1 now runs BF16 SDPA: close
    # to its FP8 output (observed ~3% relative), not identical.
    torch.testing.assert_close(outputs[ATTN[0]], before[ATTN[0]], rtol=0, atol=0)
    rel = ((outputs[ATTN[1]] - before[ATTN[1]]).norm() / before[ATTN[1]].norm()).item()
    assert 0 < rel < 0.1
    assert ((logits_after - logits_before).norm() / logits_before.norm()).item() < 0.1

    # Idempotent: a second call reports the existing fallback and changes nothing.
    again = apply_attention_stability(model, "preserve")
    assert again.changed == {} and "already runs BF16 attention" in again.unchanged[ATTN[1]]


def test_preserve_leaves_everything_alone_without_a_spike():
    model = fp8_llama_with_history()
    ids = random_ids(21)
    with torch.no_grad():
        before = model(input_ids=ids).logits
        state = model.get_submodule(ATTN[0]).fp8_attention_scale
        k = state.index("key")
        state.amax_history[k, 0] = 1.5 * state.amax_history[k, 1:].max()  # growth below the 2x limit
    report = apply_attention_stability(model, "preserve")
    assert report.changed == {} and sorted(report.unchanged) == list(ATTN)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    # A stricter limit catches the same 1.5x growth.
    report = apply_attention_stability(model, "preserve", amax_growth_limit=1.25)
    assert report.fallback == [ATTN[0]] and "key amax" in report.changed[ATTN[0]]


def test_preserve_uses_overflow_fractions_from_a_stats_step():
    model = fp8_llama_with_history()
    # The batch of the last recorded step: its amaxes are in the histories, so nothing overflows.
    with hf_fp8.stats.collect_fp8_stats(model) as stats, torch.no_grad():
        model(input_ids=random_ids(12), use_cache=False)
    assert all(stats.layers[a][r]["overflow_fraction"] == 0.0 for a in ATTN for r in ("query", "key"))
    assert apply_attention_stability(model, "preserve", stats=stats).changed == {}
    stats.layers[ATTN[0]]["key"]["overflow_fraction"] = 0.01  # as if 1% of K had been clipped
    report = apply_attention_stability(model, "preserve", stats=stats)
    assert report.fallback == [ATTN[0]] and "key overflow fraction 0.01" in report.changed[ATTN[0]]


def test_preserve_on_a_model_without_fp8_attention_changes_nothing():
    model = tiny()
    convert_model(model)  # linears only
    report = apply_attention_stability(model, "preserve")
    assert report.changed == {} and all("no FP8 attention" in why for why in report.unchanged.values())
