"""convert_model / revert_model / FP8Report on tiny random-init Hugging Face models.

Everything runs on CPU with the real FP8 numerics (torch._scaled_mm on float8 operands, no
emulation). Models are built from their Config with random init (no hub access); inputs are fresh
random token ids / activations from seeded generators (never zeros).

Sections:
  1. per-architecture conversion counts (expected numbers worked out from each architecture by
     hand), forward/backward, one AdamW step: weights change, delayed scales are initialized.
  2. Parameters are shared (not copied), conversion is idempotent, revert_model restores plain
     layers with the original outputs, checkpoint keys only gain fp8_scale buffers.
  3. skip reasons, skip patterns, bad input, the FLOP fraction (hand-counted), the report table;
     plus tests that expose bugs found in convert.py (marked "BUG").
  4. 50-step training parity FP8 vs BF16 on a tiny Llama.
  5. torch.compile(fullgraph=True) of one converted LlamaDecoderLayer: no graph break, same
     outputs/grads as eager, grad-output amax recorded under compile.

Note on speed: on CPU builds of torch, torch._scaled_mm with two E4M3 operands (the forward GEMM)
takes a slow reference path (~65 M MAC/s here, vs well under 1 ms for the mixed E5M2 x E4M3 backward
GEMMs), so token counts below are kept small; section 4 dominates the runtime.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_fp8 import FP8Linear, FP8Recipe, attach, convert_model, revert_model, update_scales
from hf_fp8.linear import FP8Conv1D
from hf_fp8.scaling import DelayedScale
from helpers import final_loss, structured_batches, train_losses

VOCAB = 256
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
E5M2_MAX = torch.finfo(torch.float8_e5m2).max  # 57344
LM_HEAD_REASON = "skip pattern 'lm_head' (recipe.skip)"
FP8_SCALE_BUFFERS = ("amax_history", "scale", "pending_amax", "initialized", "nonfinite_skips")

# Shared by every tiny config: hidden 64, 2 layers, vocab 256; special token ids inside the vocab.
TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GQA = dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)

# arch -> (Config class, *ForCausalLM class, config kwargs on top of TINY)
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(**GQA, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(**GQA)),  # head_dim = 64 / 4 = 16
    # Qwen3 with head_dim 32: q_proj is 64 -> 128 and o_proj 128 -> 64 (heads * head_dim != hidden).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(**GQA, head_dim=32)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(**GQA, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(**GQA, head_dim=16)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(**GQA)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_attention_heads=4, intermediate_size=128)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(**GQA)),
    # GPT-2 spells hidden/layers/heads n_embd/n_layer/n_head (TINY's names are aliases); MLP = 4*64 = 256.
    # Dropouts off so the FP8 and high-precision forwards see the same activations.
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(num_attention_heads=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
}

LLAMA_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# Worked out from the architectures (2 layers each), not copied from the code's output:
#   Llama-style (Llama, Qwen2, Qwen3, Mistral, Gemma2, OLMo2): q/k/v/o + gate/up/down = 7 nn.Linear
#     per layer -> 14; the LM head `lm_head` is the only other GEMM and is skipped by the default
#     pattern (embeddings are lookups; Qwen3/OLMo2 q_norm/k_norm are norms, not GEMMs).
#   Phi3: fused qkv_proj + o_proj + fused gate_up_proj + down_proj = 4 per layer -> 8.
#   GPT-NeoX: query_key_value, dense, dense_h_to_4h, dense_4h_to_h = 4 per layer -> 8. Its head is
#     called `lm_head` in transformers 5 (older releases named it `embed_out`, which the default
#     `*embed*` pattern catches; see test_default_skip_patterns).
#   GPT-2: transformers Conv1D c_attn, attn.c_proj, c_fc, mlp.c_proj = 4 per layer -> 8 FP8Conv1D;
#     lm_head (an nn.Linear tied to wte) skipped.
EXPECTED = {
    "llama": {"converted": 14, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "model.layers", "per_layer": LLAMA_LAYER},
    "qwen2": {"converted": 14, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "model.layers", "per_layer": LLAMA_LAYER},
    "qwen3": {"converted": 14, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "model.layers", "per_layer": LLAMA_LAYER},
    "mistral": {"converted": 14, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "model.layers", "per_layer": LLAMA_LAYER},
    "gemma2": {"converted": 14, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "model.layers", "per_layer": LLAMA_LAYER},
    "olmo2": {"converted": 14, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "model.layers", "per_layer": LLAMA_LAYER},
    "gpt_neox": {
        "converted": 8, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "gpt_neox.layers",
        "per_layer": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    },
    "phi3": {
        "converted": 8, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "model.layers",
        "per_layer": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
    },
    "gpt2": {
        "converted": 8, "n_skipped": 1, "skipped": {"lm_head": LM_HEAD_REASON}, "prefix": "transformer.h",
        "per_layer": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    },
}


def build(arch: str, seed: int = 0, **overrides) -> nn.Module:
    config_cls, model_cls, kwargs = MODELS[arch]
    config = getattr(transformers, config_cls)(**{**TINY, **kwargs, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_cls)(config)


def random_ids(seed: int, batch: int = 2, seq: int = 13) -> torch.Tensor:
    # 2 x 13 = 26 tokens: not a multiple of 16, so the grad-weight GEMM takes the padded path too.
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def fp8_states(model: nn.Module) -> dict[str, DelayedScale]:
    return {n.removesuffix(".fp8_scale"): m for n, m in model.named_modules() if isinstance(m, DelayedScale)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def emulate_fp8_forward(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of the unconverted `model` whose layers `names` compute what a first-step FP8 layer
    computes in forward: input and weight each quantized to E4M3 with the per-tensor scale
    448 / amax (scales are not initialized before the first update, so casts use the tensor's own
    amax), dequantized, multiplied in fp32."""

    def fake_e4m3(t):
        scale = E4M3_MAX / t.abs().amax().float()
        return (t.float() * scale).to(torch.float8_e4m3fn).float() / scale

    model = copy.deepcopy(model)
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, Conv1D):  # y = x @ W + b, W stored (in, out)
            layer.forward = lambda x, m=layer: fake_e4m3(x) @ fake_e4m3(m.weight) + m.bias
        else:
            layer.forward = lambda x, m=layer: nn.functional.linear(fake_e4m3(x), fake_e4m3(m.weight), m.bias)
    return model


# --------------------------------------------------------------------------------------------
# 1. Every supported architecture: expected counts, forward/backward, one optimizer step
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(MODELS))
def test_convert_and_train_one_step(arch):
    exp = EXPECTED[arch]
    model = build(arch)
    hp_model = copy.deepcopy(model)  # unconverted twin, same weights

    report = convert_model(model)

    assert len(report.converted) == exp["converted"]
    assert len(report.skipped) == exp["n_skipped"]
    assert report.skipped == exp["skipped"]
    assert set(report.converted) == {f"{exp['prefix']}.{i}.{n}" for i in range(2) for n in exp["per_layer"]}
    fp8_cls, plain_cls = (FP8Conv1D, Conv1D) if arch == "gpt2" else (FP8Linear, nn.Linear)
    for name in report.converted:
        assert type(model.get_submodule(name)) is fp8_cls, name
    assert type(model.get_submodule("lm_head")) is nn.Linear
    # Nothing else was touched: exactly one scaling state per converted layer, no plain GEMM left
    # in the decoder layers.
    assert sorted(fp8_states(model)) == sorted(report.converted)
    leftovers = [n for n, m in model.named_modules() if type(m) is plain_cls and n not in report.skipped]
    assert leftovers == []

    model.train()
    ids = random_ids(seed=1)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    emulated = emulate_fp8_forward(hp_model, report.converted)
    with torch.no_grad():
        hp_logits = hp_model(input_ids=ids, use_cache=False).logits
        emulated_logits = emulated(input_ids=ids, use_cache=False).logits
    assert torch.isfinite(out.loss)
    assert 4.0 < out.loss.item() < 7.0  # random init: about ln(256) = 5.55
    # Real torch._scaled_mm numerics == per-tensor E4M3 quantize/dequantize + fp32 GEMM: only the
    # fp32 accumulation order differs (observed ~2e-7 relative L2 on every model).
    assert rel_err(out.logits, emulated_logits) < 1e-5
    # vs the unconverted model: E4M3 keeps 3 mantissa bits. Observed relative L2 error of the
    # logits: 3-6% (Llama, Qwen2/3, Mistral, Phi3, GPT-NeoX, GPT-2), 8-11% for the post-norm models
    # (Gemma2, OLMo2: their norms after each sublayer bring the FP8 GEMM outputs to full scale, so
    # their errors are not diluted by the exact residual stream). 15% still catches any scale bug (a
    # wrong scale saturates or flushes values to zero: O(100%) errors).
    assert rel_err(out.logits, hp_logits) < 0.15

    out.loss.backward()
    weights = {n: model.get_submodule(n).weight for n in report.converted}
    for name, w in weights.items():
        assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0, name
    before = {n: w.detach().clone() for n, w in weights.items()}

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    attach(model, opt)  # update_scales runs as a post-hook of opt.step()
    opt.step()

    numerator = torch.tensor([E4M3_MAX, E4M3_MAX, E5M2_MAX])  # roles: input, weight (E4M3), grad_output (E5M2)
    for name, state in fp8_states(model).items():
        assert not torch.equal(weights[name], before[name]), f"{name}: weight unchanged by the step"
        assert state.initialized.tolist() == [True, True, True], name
        assert state.pending_amax.tolist() == [-1.0, -1.0, -1.0], name  # consumed by the update
        newest = state.amax_history[:, 0]
        assert (newest > 0).all() and torch.isfinite(newest).all(), name
        # The weight amax recorded in the forward is that of the pre-step weight, exactly.
        assert newest[1].item() == before[name].abs().max().item(), name
        # One step into a 1024-long "max" history: scale = fp8_max / newest amax (margin 0).
        torch.testing.assert_close(state.scale, numerator / newest, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------
# 2. Shared parameters, idempotence, revert, checkpoint keys
# --------------------------------------------------------------------------------------------


def test_parameters_are_shared_and_optimizer_built_before_conversion_trains_them():
    model = build("llama")
    params_before = list(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built BEFORE conversion

    report = convert_model(model)

    params_after = list(model.named_parameters())
    assert [n for n, _ in params_after] == [n for n, _ in params_before]
    assert [id(p) for _, p in params_after] == [id(p) for _, p in params_before]
    for name in report.converted:  # the FP8 layer holds the very Parameter the optimizer holds
        w = model.get_submodule(name).weight
        assert any(w is p for p in opt.param_groups[0]["params"]), name

    attach(model, opt)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in report.converted}
    ids = random_ids(seed=2)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    opt.step()
    for name in report.converted:
        assert not torch.equal(model.get_submodule(name).weight, before[name]), name
        assert model.get_submodule(name).fp8_scale.initialized.all(), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_convert_is_idempotent(arch):
    model = build(arch)
    first = convert_model(model)
    layers = {n: model.get_submodule(n) for n in first.converted}
    states = {n: m.fp8_scale for n, m in layers.items()}

    second = convert_model(model)

    assert second.converted == first.converted  # same 14 (Llama) / 8 (GPT-2) names, nothing new
    assert len(second.converted) == EXPECTED[arch]["converted"]
    assert second.skipped == first.skipped
    assert second.fp8_flop_fraction == first.fp8_flop_fraction
    for name, layer in layers.items():
        assert model.get_submodule(name) is layer, name  # not re-wrapped
        assert layer.fp8_scale is states[name], name  # scaling state kept
    # No FP8 layer nested in an FP8 layer, and still one scaling state per layer.
    for name, layer in layers.items():
        assert [c for c in layer.children() if not isinstance(c, DelayedScale)] == [], name
    assert len(fp8_states(model)) == len(first.converted)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_revert_restores_plain_layers_same_params_same_outputs(arch):
    model = build(arch)
    original = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    report = convert_model(model)
    ids = random_ids(seed=3)
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # FP8 state is populated

    reverted = revert_model(model)

    assert sorted(reverted) == sorted(report.converted)
    plain_cls = Conv1D if arch == "gpt2" else nn.Linear
    for name in report.converted:
        assert type(model.get_submodule(name)) is plain_cls, name
    assert fp8_states(model) == {}
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(original.state_dict())
    # Same Parameters, plain layers: bit-identical to the model that was never converted.
    model.eval()
    original.eval()
    ids = random_ids(seed=4)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, original(input_ids=ids, use_cache=False).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_state_dict_keys_only_gain_fp8_scale_buffers(arch):
    model = build(arch)
    before = model.state_dict()
    report = convert_model(model)
    after = model.state_dict()

    added = {f"{n}.fp8_scale.{b}" for n in report.converted for b in FP8_SCALE_BUFFERS}
    assert set(after) == set(before) | added
    assert len(after) == len(before) + 5 * EXPECTED[arch]["converted"]
    for key, value in before.items():  # every weight/bias keeps its key, shape and values
        assert torch.equal(after[key], value), key


# --------------------------------------------------------------------------------------------
# 3. Skips, bad input, FLOP fraction, report table
# --------------------------------------------------------------------------------------------


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.odd_in = nn.Linear(40, 64)  # in_features 40 is not a multiple of 16
        self.odd_out = nn.Linear(64, 24)  # out_features 24 is not a multiple of 16

    def forward(self, x, y):
        return self.odd_out(self.proj(x) + self.odd_in(y))


def test_layer_dims_not_multiple_of_16_are_skipped_with_reason():
    model = Toy()
    report = convert_model(model)

    assert report.converted == ["proj"]
    assert set(report.skipped) == {"odd_in", "odd_out"}
    assert "in_features=40" in report.skipped["odd_in"] and "multiple of 16" in report.skipped["odd_in"]
    assert "out_features=24" in report.skipped["odd_out"] and "multiple of 16" in report.skipped["odd_out"]
    assert type(model.odd_in) is nn.Linear and type(model.odd_out) is nn.Linear
    # proj: 2*64*64 = 8192 FLOPs/token in FP8 of 8192 + 2*40*64 + 2*64*24 = 16384 (no config: no attention row)
    assert report.fp8_flop_fraction == pytest.approx(8192 / 16384)
    assert report.context is None
    gen = torch.Generator().manual_seed(5)
    out = model(torch.randn(4, 64, generator=gen), torch.randn(4, 40, generator=gen))
    out.square().mean().backward()
    assert torch.isfinite(model.proj.weight.grad).all()


def test_custom_skip_patterns_match_full_name_and_last_component():
    # Full dotted name: a glob over every module of layer 0 (fnmatch's * also matches dots).
    model = build("llama")
    report = convert_model(model, FP8Recipe(skip=("lm_head", "model.layers.0.*")))
    assert sorted(report.converted) == sorted(f"model.layers.1.{n}" for n in LLAMA_LAYER)  # 7
    assert len(report.skipped) == 1 + 7
    assert report.skipped["model.layers.0.mlp.up_proj"] == "skip pattern 'model.layers.0.*' (recipe.skip)"

    # Last component: "down_proj" and "q_*" match the final name part of both layers' modules.
    model = build("llama")
    report = convert_model(model, FP8Recipe(skip=("lm_head", "down_proj", "q_*")))
    assert len(report.converted) == 14 - 4
    assert sorted(report.skipped) == sorted(
        ["lm_head"] + [f"model.layers.{i}.{n}" for i in range(2) for n in ("mlp.down_proj", "self_attn.q_proj")]
    )
    assert report.skipped["model.layers.1.self_attn.q_proj"] == "skip pattern 'q_*' (recipe.skip)"
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear

    # One exact full name skips exactly that module. A pattern must match the whole dotted name
    # (or the last part): "layers.1.mlp.up_proj" without the leading "model." matches nothing.
    model = build("llama")
    report = convert_model(model, FP8Recipe(skip=("lm_head", "model.layers.1.mlp.up_proj", "layers.1.mlp.gate_proj")))
    assert sorted(report.skipped) == ["lm_head", "model.layers.1.mlp.up_proj"]
    assert len(report.converted) == 13


def test_default_skip_patterns_and_custom_skip_replaces_them():
    # The default `*embed*` keeps a head named like GPT-NeoX's old `embed_out` in high precision.
    model = nn.ModuleDict({"body": nn.Linear(64, 64), "embed_out": nn.Linear(64, VOCAB)})
    report = convert_model(model)
    assert report.converted == ["body"]
    assert report.skipped == {"embed_out": "skip pattern '*embed*' (recipe.skip)"}

    # recipe.skip replaces the defaults (it is not added to them): without "lm_head" in it, the
    # 64 -> 256 LM head is converted too (14 + 1 = 15 layers).
    model = build("llama")
    report = convert_model(model, FP8Recipe(skip=("down_proj",)))
    assert len(report.converted) == 14 - 2 + 1
    assert "lm_head" in report.converted and type(model.lm_head) is FP8Linear


def test_no_eligible_layer_raises_value_error_listing_reasons():
    model = nn.ModuleDict({"odd": nn.Linear(10, 20), "lm_head": nn.Linear(64, VOCAB), "conv": nn.Conv2d(3, 16, 3)})
    with pytest.raises(ValueError) as info:
        convert_model(model)
    msg = str(info.value)
    assert "no layer of ModuleDict can run in FP8" in msg
    assert "odd: in_features=10, out_features=20 not a multiple of 16" in msg
    assert "lm_head: skip pattern 'lm_head'" in msg
    assert "conv: Conv2d holds matrix parameters (weight)" in msg
    assert type(model["odd"]) is nn.Linear and type(model["lm_head"]) is nn.Linear  # nothing swapped

    with pytest.raises(ValueError, match=r"no nn\.Linear or Conv1D layers"):
        convert_model(nn.Sequential(nn.Embedding(VOCAB, 64), nn.LayerNorm(64)))


def test_non_module_input_raises_type_error():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got str"):
        convert_model("meta-llama/Llama-3.2-1B")
    with pytest.raises(TypeError, match="got OrderedDict"):  # a state_dict is not a model
        convert_model(build("llama").state_dict())
    with pytest.raises(TypeError, match="recipe must be an hf_fp8.FP8Recipe"):
        convert_model(build("llama"), recipe={"fp8_format": "hybrid"})


def test_fp8_flop_fraction_matches_hand_count_for_llama():
    # Tiny Llama: hidden 64, 4 heads x head_dim 16, 2 KV heads (k/v out = 32), MLP 128, vocab 256,
    # 2 layers. Forward GEMM FLOPs per token = 2 * in * out:
    #   q 2*64*64 = 8192, k 2*64*32 = 4096, v 4096, o 8192, gate/up/down 3 * 2*64*128 = 49152
    #   -> 73728 per layer, 147456 for 2 layers: all FP8.
    #   lm_head 2*64*256 = 32768: high precision (skipped).
    #   attention at context C: layers * 2 * (2 * heads * head_dim * C) = 2*2*(2*4*16*C) = 256*C: high.
    fp8 = 2 * (2 * 64 * 64 + 2 * 2 * 64 * 32 + 2 * 64 * 64 + 3 * 2 * 64 * 128)
    lm_head = 2 * 64 * VOCAB
    assert (fp8, lm_head) == (147456, 32768)

    def attention(context):
        return 2 * 2 * (2 * 4 * 16 * context)

    report = convert_model(build("llama"), context=64)
    assert report.context == 64
    assert report.fp8_flop_fraction == pytest.approx(fp8 / (fp8 + lm_head + attention(64)))  # 9/13 = 0.6923

    # Default context: the config's max_position_embeddings (LlamaConfig default 2048) ...
    report = convert_model(build("llama"))
    assert report.context == 2048
    assert report.fp8_flop_fraction == pytest.approx(fp8 / (fp8 + lm_head + attention(2048)))  # 9/75 = 0.12
    # ... capped at 4096.
    report = convert_model(build("llama", max_position_embeddings=32768))
    assert report.context == 4096
    assert report.fp8_flop_fraction == pytest.approx(fp8 / (fp8 + lm_head + attention(4096)))  # 9/139


def test_report_str_is_a_table_with_fp8_and_high_rows():
    report = convert_model(build("llama"), context=64)
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "hf_fp8 coverage: 14/15 GEMM layers in FP8, 69.2% of GEMM FLOPs per token (attention counted at context 64)"
    assert lines[1] == "recipe: format=hybrid history=1024 algo=max margin=0 attention=False"
    assert lines[2].startswith("FP8 casts: eager: the PyTorch reference (cpu device)")  # which cast kernel runs
    assert lines[3].split() == ["precision", "module", "GEMM", "FLOPs", "reason"]
    rows = {line.split()[1]: line for line in lines[4:-1]}
    # Layers of the stack are grouped as layers.* with a count; q_proj: 2 * 8192 / 212992 = 7.7%.
    q_row = rows["model.layers.*.self_attn.q_proj"]
    assert q_row.split()[:6] == ["FP8", "model.layers.*.self_attn.q_proj", "(x2)", "Linear", "64->64", "7.7%"]
    assert rows["model.layers.*.mlp.down_proj"].split()[:6] == ["FP8", "model.layers.*.mlp.down_proj", "(x2)", "Linear", "128->64", "15.4%"]
    # lm_head: 32768 / 212992 = 15.4%, with its reason; attention: 32768 / 212992 = 15.4%.
    assert rows["lm_head"].split()[:5] == ["high", "lm_head", "Linear", "64->256", "15.4%"]
    assert rows["lm_head"].endswith(LM_HEAD_REASON)
    attention_row = rows["attention"]
    assert attention_row.split()[:2] == ["high", "attention"] and "(2 layers)" in attention_row
    assert attention_row.endswith("recipe.attention is False (softmax(QK^T)V in high precision)")
    assert len(lines) == 4 + 7 + 2 + 1  # 4 header lines, 7 grouped FP8 rows + lm_head + attention, then the shared input casts
    assert lines[-1].startswith("one input cast shared by: model.layers.*.self_attn: q_proj, k_proj, v_proj (x2)")


def test_root_layer_is_refused_with_the_fix():
    """Regression: convert_model(nn.Linear) used to report [""] converted while registering the
    FP8Linear as a child named "" inside the unchanged plain layer."""
    layer = nn.Linear(32, 32)
    with pytest.raises(TypeError, match=r"FP8Linear.from_linear"):
        convert_model(layer)
    assert dict(layer.named_children()) == {} and type(layer) is nn.Linear
    with pytest.raises(TypeError, match=r"to_linear"):
        revert_model(FP8Linear(32, 32))


def test_module_shared_under_two_names_is_converted_under_both():
    """Regression: named_modules() de-duplicates, so a layer registered twice (shared blocks) was
    swapped under its first name only while the report claimed 100% FP8."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 32)
            self.b = self.a  # the same layer, applied twice

        def forward(self, x):
            return self.b(self.a(x))

    model = Shared()
    report = convert_model(model)
    assert report.converted == ["a", "b"] and report.fp8_flop_fraction == 1.0
    assert isinstance(model.a, FP8Linear) and model.b is model.a  # still one shared layer, one scale state
    model(torch.randn(16, 32)).sum().backward()
    update_scales(model)
    assert model.a.fp8_scale.initialized.all()
    revert_model(model)
    assert type(model.a) is nn.Linear and model.b is model.a


# --------------------------------------------------------------------------------------------
# 4. Training parity: FP8 vs BF16, tiny Llama, 50 steps
# --------------------------------------------------------------------------------------------

PARITY_STEPS = 50


def test_training_parity_fp8_vs_bf16_tiny_llama():
    config = transformers.LlamaConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=256, vocab_size=VOCAB, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    init = transformers.LlamaForCausalLM(config).state_dict()
    batches = structured_batches(PARITY_STEPS)  # 50 steps x 2 x 32 tokens, identical for both runs

    def fresh():
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(init)  # identical initial weights
        return model

    bf16 = train_losses(fresh(), batches, recipe=None)
    fp8 = train_losses(fresh(), batches, recipe=FP8Recipe())
    end = final_loss  # mean of the last 5 steps

    print(f"\nloss start/end  bf16 {bf16[0]:.4f} -> {end(bf16):.4f}   fp8 {fp8[0]:.4f} -> {end(fp8):.4f}   ratio {end(fp8) / end(bf16):.4f}")
    # Same init and data: the first loss differs only by the FP8 forward (~1e-3 relative).
    assert fp8[0] == pytest.approx(bf16[0], rel=0.01)
    # Both runs learn: from ~5.5 nats to < 45% of the start (observed ~1.9, i.e. ~35%).
    assert end(bf16) < 0.45 * bf16[0]
    assert end(fp8) < 0.45 * fp8[0]
    # Parity: FP8 ends within 2% of BF16 (observed ratio ~0.999) ...
    assert abs(end(fp8) / end(bf16) - 1) < 0.02
    # ... and never strays far along the way: every step within 5% (observed < 1%).
    assert max(abs(f / b - 1) for f, b in zip(fp8, bf16)) < 0.05


# --------------------------------------------------------------------------------------------
# 5. torch.compile(fullgraph=True) of one converted decoder layer
# --------------------------------------------------------------------------------------------


# torch's own dynamo tracing emits this deprecation (torch/jit/_script.py), nothing of hf_fp8's.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_converted_llama_decoder_layer():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(**{**TINY, **MODELS["llama"][2]}, attn_implementation="sdpa")
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, layer_idx=0).train()
    report = convert_model(layer)
    assert sorted(report.converted) == sorted(LLAMA_LAYER)  # 7 FP8Linear, nothing skipped
    eager = copy.deepcopy(layer)  # same weights, fresh scaling state

    gen = torch.Generator().manual_seed(6)
    batch, seq = 2, 16
    hidden = torch.randn(batch, seq, 64, generator=gen)
    grad_out = torch.randn(batch, seq, 64, generator=gen)
    position_ids = torch.arange(seq).expand(batch, seq)
    cos_sin = LlamaRotaryEmbedding(config)(hidden, position_ids)

    def fwd_bwd(module):
        x = hidden.clone().requires_grad_(True)
        out = module(x, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad_out)
        grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in module.named_parameters()}
        for p in module.parameters():
            p.grad = None
        return out.detach(), x.grad, grads

    def assert_same(got, want):
        # Compiled and eager cast with identical scales, so the FP8 operands are identical; only
        # inductor's fused fp32 elementwise code (RMSNorm, RoPE, SiLU) may round differently
        # (observed max diff ~1e-6 relative). Tolerance: 1% of the largest eager magnitude.
        (o1, gx1, gp1), (o0, gx0, gp0) = got, want
        for a, b, what in [(o1, o0, "output"), (gx1, gx0, "grad input")] + [(gp1[n], gp0[n], n) for n in gp0]:
            assert (a - b).abs().max() <= 1e-2 * b.abs().max(), what

    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(copy.deepcopy(layer))(
            hidden, attention_mask=None, position_ids=position_ids, position_embeddings=cos_sin
        )
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(layer, fullgraph=True)
        grad_output_role = layer.self_attn.q_proj.fp8_scale.index("grad_output")

        # Step 1: no scale initialized yet -> every cast uses the tensor's own (dynamic) scale.
        got = fwd_bwd(compiled)
        assert_same(got, fwd_bwd(eager))
        for name, state in fp8_states(layer).items():
            # All three amaxes recorded under compile, the grad-output one by the compiled backward.
            assert state.pending_amax[grad_output_role].item() > 0, name
            assert (state.pending_amax >= 0).all(), name
            torch.testing.assert_close(state.pending_amax, fp8_states(eager)[name].pending_amax, rtol=1e-5, atol=0)

        # Step 2: after update_scales both use the delayed scales (the other torch.where branch).
        update_scales(layer)
        update_scales(eager)
        assert all(s.initialized.all() for s in fp8_states(layer).values())
        assert_same(fwd_bwd(compiled), fwd_bwd(eager))
        assert all((s.pending_amax > 0).all() for s in fp8_states(layer).values())

        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_compiled_layers_train_at_varying_lengths_without_a_graph_break(arch):
    """Per-layer torch.compile with FP8 linears and FP8 attention (shared input scales on) over two
    sequence lengths: the second length recompiles with dynamic shapes (symbolic sizes and strides),
    where hf_fp8's code once crashed dynamo and once broke the graph in FP8 attention; no graph break,
    finite losses. Backend "eager": dynamo's tracing is what is checked, without a compiler's time."""
    model = build(arch, num_hidden_layers=1).to(torch.bfloat16).train()
    convert_model(model, FP8Recipe(share_input_scales=True, attention=True))
    layers = next(m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == 1)  # the decoder layers
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        for layer in layers:
            layer.compile(backend="eager")
        for seq in (13, 24):
            ids = random_ids(seq, seq=seq)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            assert torch.isfinite(loss), (arch, seq)
        assert dict(torch._dynamo.utils.counters["graph_break"]) == {}, arch
    finally:
        torch._dynamo.reset()


def test_report_summary_is_json_ready():
    import json

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    report = convert_model(transformers.LlamaForCausalLM(config), FP8Recipe(attention=True))
    summary = json.loads(json.dumps(report.summary()))
    assert summary["fp8_layers"] == 14 and summary["gemm_layers"] == 15  # 2 x 7 linears, + lm_head
    assert summary["fp8_attention"] is True and "reference" in summary["attention_kernel"]
    assert summary["cast_kernel"].startswith("eager: the PyTorch reference (cpu device)")
    assert "FP8 casts: eager: the PyTorch reference" in str(report)
    assert summary["skipped"] == {"lm_head": "skip pattern 'lm_head' (recipe.skip)"}
    assert summary["fp8_flop_fraction"] == round(report.fp8_flop_fraction, 4)


# ---- shared input scales of sibling linears (FP8Recipe.share_input_scales) ----------------------


def _fp8_saved_per_step(share: bool, compiled: bool, steps: int = 2):
    """Losses, float8 tensors autograd saves per forward, and the final state_dict of a tiny Llama
    trained `steps` AdamW steps with share_input_scales=`share` (per-layer compile when `compiled`)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    convert_model(model, FP8Recipe(share_input_scales=share))
    if compiled:
        for layer in model.model.layers:
            layer.compile(backend="inductor")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    attach(model, opt)
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    losses, fp8_saved = [], []
    for _ in range(steps):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        fp8_saved.append(sum(t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for t in saved))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, fp8_saved, model.state_dict()


def test_sibling_linears_cast_their_shared_input_once_under_compile_with_the_same_numerics():
    """q/k/v_proj and gate/up_proj read one tensor each. With shared input scales torch.compile casts
    it once, so the FP8 copies autograd keeps for backward are fewer (here, in this FP32 model, the
    partitioner recomputes the shared casts in backward instead of keeping any: 6 -> 0 per step), and
    training is bitwise the same as with a scale per linear (their input amax histories are identical)."""
    shared_losses, shared_saved, shared_state = _fp8_saved_per_step(True, compiled=True)
    own_losses, own_saved, own_state = _fp8_saved_per_step(False, compiled=True)
    assert all(s < o for s, o in zip(shared_saved, own_saved)), (shared_saved, own_saved)
    assert shared_losses == own_losses
    assert shared_state.keys() == own_state.keys()
    assert all(torch.equal(shared_state[k], own_state[k]) for k in own_state)


def test_shared_input_scales_are_reported_and_add_no_state():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    plain_keys = set(model.state_dict())
    report = convert_model(model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert attn.q_proj._shared_input_scale is None  # the first sibling casts with its own scale
    assert attn.k_proj._shared_input_scale is attn.q_proj.fp8_scale and attn.v_proj._shared_input_scale is attn.q_proj.fp8_scale
    assert mlp.up_proj._shared_input_scale is mlp.gate_proj.fp8_scale and mlp.down_proj._shared_input_scale is None
    assert report.shared_input_scales == [f"model.layers.{i}.{m}" for i in range(2)
                                          for m in ("self_attn: q_proj, k_proj, v_proj", "mlp: gate_proj, up_proj")]
    assert "one input cast shared by: model.layers.*.self_attn: q_proj, k_proj, v_proj (x2); model.layers.*.mlp: gate_proj, up_proj (x2)" in str(report)
    # The sibling state is referenced, not registered: one fp8_scale entry set per linear, one update each.
    assert {k for k in model.state_dict() if "fp8_scale" not in k} == plain_keys
    assert len([m for m in model.modules() if isinstance(m, DelayedScale)]) == 14
    # Converting again with the option off gives every layer its own input scale back.
    report = convert_model(model, FP8Recipe(share_input_scales=False))
    assert report.shared_input_scales == [] and attn.k_proj._shared_input_scale is None


def test_shared_input_scale_covers_siblings_reading_different_inputs():
    """The shared scale is recorded from every sibling's input, so it stays a valid delayed scale when
    siblings read different tensors (cross-attention): no sibling overflows the shared range."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj = FP8Linear(32, 32), FP8Linear(32, 32)
    convert_model(parent)
    small, large = torch.randn(64, 32), 40 * torch.randn(64, 32)
    for _ in range(2):
        parent.q_proj(small).sum().backward()
        parent.k_proj(large).sum().backward()
        update_scales(parent)
    state = parent.q_proj.fp8_scale
    assert parent.k_proj._shared_input_scale is state
    assert state.amax_history[0, 0] == large.abs().max()  # the larger input sets the shared scale
    assert parent.k_proj.fp8_scale.amax_history[0, 0] == large.abs().max()  # k keeps its own history
    assert parent.q_proj.fp8_scale.amax_history[0, 0] != small.abs().max()


def test_cross_attention_shares_only_the_key_value_input():
    """BART's decoder `encoder_attn`: q reads the decoder, k/v the encoder, so only k/v share a scale
    (before, q was tied to them and cast with a scale covering the encoder states too)."""
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                     decoder_ffn_dim=128, max_position_embeddings=64)
    model = transformers.BartForConditionalGeneration(config)
    report = convert_model(model)
    assert report.shared_input_scales == ["model.encoder.layers.0.self_attn: q_proj, k_proj, v_proj",
                                          "model.decoder.layers.0.self_attn: q_proj, k_proj, v_proj",
                                          "model.decoder.layers.0.encoder_attn: k_proj, v_proj"]
    cross = model.model.decoder.layers[0].encoder_attn
    assert cross.q_proj._shared_input_scale is None and cross.v_proj._shared_input_scale is cross.k_proj.fp8_scale
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    update_scales(model)
    # q's input scale comes from the decoder states alone, k/v's from the encoder states
    assert cross.q_proj.fp8_scale.amax_history[0, 0] != cross.k_proj.fp8_scale.amax_history[0, 0]
    assert cross.k_proj.fp8_scale.amax_history[0, 0] == cross.v_proj.fp8_scale.amax_history[0, 0]
    # T5 names them q/k/v (EncDecAttention) and its gated FFN wi_0/wi_1
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=1, num_decoder_layers=1,
        feed_forward_proj="gated-gelu"))
    assert convert_model(t5).shared_input_scales == [
        "encoder.block.0.layer.0.SelfAttention: q, k, v", "encoder.block.0.layer.1.DenseReluDense: wi_0, wi_1",
        "decoder.block.0.layer.0.SelfAttention: q, k, v", "decoder.block.0.layer.1.EncDecAttention: k, v",
        "decoder.block.0.layer.2.DenseReluDense: wi_0, wi_1"]
