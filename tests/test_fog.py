"""FOG architectures (hf_fp8.models.fog) on CPU, built from the tiny recipes in recipes/models.

Sections:
  1. structure: the block of fp8-background.md 1.1 (no pre-norm / final norm, frozen-gain QK
     RMSNorm or learnable tanh alpha, post-norm gains 1/sqrt(L), xIELU at a_p = a_n = 0.8 with its
     formula checked by hand, x50 input scaling, no biases, normal(0, init_std) init).
  2. the model works: a few AdamW steps lower the loss, padding is invisible to real tokens,
     eager == sdpa, generate() with the KV cache matches a full forward.
  3. save_pretrained -> from_pretrained through the Auto classes (registered), and through STOCK
     transformers with trust_remote_code=True in a subprocess where hf_fp8 cannot be imported.
  4. FP8: convert_model(..., FP8Recipe(attention=True)) puts all 6 linears of every layer and the
     attention in FP8, and the model trains a few steps with finite, falling loss.
  5. configs: every shipped JSON loads; bad values raise naming the field.

Inputs are fresh random token ids from seeded generators; no hub access anywhere.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import hf_fp8
from hf_fp8.models.fog import FOGConfig, FOGForCausalLM, FOGModel, register
from hf_fp8.models.fog.modeling_fog import FOGAttention, FOGHeadRMSNorm, FOGRMSNorm, FOGTanh, FOGXIELU

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "models"
VARIANTS = ("fog-max", "fog-opt", "fog-flash")

register()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are far too small for several threads: on a 2-core machine with any
    other busy process, OpenMP threads waiting for each other made these tests ~15x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(recipe_variant: str, **overrides) -> FOGConfig:
    """The shipped tiny recipe of a variant, with field overrides (possibly bad ones)."""
    data = json.loads((RECIPES / f"{recipe_variant}-tiny.json").read_text())
    data.update(overrides)
    return FOGConfig.from_dict(data)


def tiny_model(variant: str, seed: int = 0, **overrides) -> FOGForCausalLM:
    torch.manual_seed(seed)
    return FOGForCausalLM(tiny_config(variant, **overrides)).eval()


def random_ids(batch: int, seq: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def learnable_batches(steps: int, batch: int = 4, seq: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Sequences following a fixed random permutation of 64 token ids (next = perm[current])."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(64, generator=gen)
    batches = []
    for _ in range(steps):
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, 64, (batch,), generator=gen)
        for t in range(1, seq):
            x[:, t] = perm[x[:, t - 1]]
        batches.append(x)
    return batches


def train(model: nn.Module, steps: int, lr: float = 3e-3, fp8: bool = False) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    if fp8:
        hf_fp8.attach(model, opt)
    losses = []
    for x in learnable_batches(steps):
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------
# 1. Structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_structure(variant):
    model = tiny_model(variant)
    config = model.config
    layers = model.model.layers
    assert len(layers) == config.num_hidden_layers == 2

    # 1. No pre-norm before attention or MLP, no final norm before the LM head.
    for layer in layers:
        assert not hasattr(layer, "input_layernorm")
        assert not hasattr(layer, "pre_feedforward_layernorm")
    assert not hasattr(model.model, "norm")
    norms = [name for name, m in model.named_modules() if isinstance(m, FOGRMSNorm)]
    assert norms == [f"model.layers.{i}.{n}" for i in range(2) for n in ("post_attention_layernorm", "post_feedforward_layernorm")]

    # 5. Post-norm gains start at 1/sqrt(L) and are learnable.
    for name in norms:
        weight = model.get_submodule(name).weight
        assert isinstance(weight, nn.Parameter) and weight.requires_grad
        torch.testing.assert_close(weight.detach(), torch.full((64,), 1 / math.sqrt(2)))

    # 2. The attention entropy guard.
    for layer in layers:
        attn = layer.self_attn
        assert isinstance(attn, FOGAttention)
        assert attn.is_causal and attn.head_dim == 16 and attn.num_key_value_groups == 2 and attn.layer_idx in (0, 1)
        for guard in (attn.q_guard, attn.k_guard):
            if variant == "fog-flash":
                assert isinstance(guard, FOGTanh)
                assert isinstance(guard.alpha, nn.Parameter) and guard.alpha.requires_grad
                assert guard.alpha.item() == 0.5
            else:
                # Frozen gains: the guard holds no parameter (and no gain buffer) at all.
                assert isinstance(guard, FOGHeadRMSNorm)
                assert list(guard.parameters()) == [] and list(guard.buffers()) == []
    guard_params = [n for n, _ in model.named_parameters() if "_guard" in n]
    assert len(guard_params) == (4 if variant == "fog-flash" else 0)

    # 3. Raised softmax scale: the default rule sqrt(2 / head_dim), above 1/sqrt(head_dim).
    assert config.softmax_scale == pytest.approx(math.sqrt(2 / 16))
    assert all(layer.self_attn.scaling == config.softmax_scale for layer in layers)
    assert config.softmax_scale > 16**-0.5

    # 6. Non-gated MLP, no biases anywhere.
    for layer in layers:
        assert {n for n, _ in layer.mlp.named_children()} == {"up_proj", "down_proj", "act_fn"}
        assert layer.mlp.up_proj.out_features == config.intermediate_size == 384
        assert isinstance(layer.mlp.act_fn, FOGXIELU if variant == "fog-max" else nn.GELU)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 6 + 1
    assert all(m.bias is None for m in linears)
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_statistics(variant):
    """normal(0, init_std) for linears and embeddings (big enough samples to pin the std)."""
    config = tiny_config(variant, vocab_size=4096, intermediate_size=1024)
    torch.manual_seed(1)
    model = FOGForCausalLM(config)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert abs(p.std().item() - 0.02) < 0.002, name
            assert abs(p.mean().item()) < 0.002, name


def test_input_scaling_times_50():
    model = tiny_model("fog-opt")
    assert model.config.init_std == 0.02 and model.config.input_scale == 50.0
    ids = random_ids(2, 8, seed=3)
    seen = {}
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    torch.testing.assert_close(seen["x"], model.model.embed_tokens(ids) * 50.0)


def test_xielu_init_and_formula():
    model = tiny_model("fog-max")
    for layer in model.model.layers:
        act = layer.mlp.act_fn
        a_p, a_n = act.coefficients()
        torch.testing.assert_close(a_p, torch.tensor([0.8]))
        torch.testing.assert_close(a_n, torch.tensor([0.8]))
        assert isinstance(act.alpha_p, nn.Parameter) and isinstance(act.alpha_n, nn.Parameter)
    # The paper's formula, by hand, on fresh random inputs incl. negatives, tiny negatives and 0,
    # with non-initial a_p, a_n (p, n moved) so that a_p and a_n are told apart.
    act = model.model.layers[0].mlp.act_fn
    with torch.no_grad():
        act.alpha_p.fill_(0.3)
        act.alpha_n.fill_(-0.7)
    x = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(5)) * 3, torch.tensor([0.0, -1e-7, -1e-5, 1e-7])])
    a_p = math.log1p(math.exp(0.3))
    a_n = 0.5 + math.log1p(math.exp(-0.7))
    expected = [
        a_p * v * v + 0.5 * v if v > 0 else a_n * math.expm1(min(v, -1e-6)) - a_n * v + 0.5 * v for v in x.double().tolist()
    ]
    torch.testing.assert_close(act(x).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert (x < 0).sum() > 400  # negatives really were covered


def test_guards_bound_logits():
    """After the guard every head vector has |q.k| <= head_dim (the reason FP8 scales stay valid)."""
    x = torch.randn(2, 5, 4, 16, generator=torch.Generator().manual_seed(2)) * 100
    norm = FOGHeadRMSNorm(1e-6)(x)
    torch.testing.assert_close(norm.pow(2).mean(-1), torch.ones(2, 5, 4))
    assert FOGTanh(0.5)(x).abs().max() <= 1.0


# ---------------------------------------------------------------------------------------------
# 2. The model works: training, padding, attention implementations, generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_trains_with_adamw(variant):
    model = tiny_model(variant)
    losses = train(model, steps=12)
    assert all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(256), abs=0.3)
    assert sum(losses[-3:]) / 3 < losses[0] - 1.0, losses
    # The FOG scalars train too.
    if variant == "fog-flash":
        assert model.model.layers[0].self_attn.q_guard.alpha.item() != 0.5
    if variant == "fog-max":
        assert model.model.layers[0].mlp.act_fn.alpha_p.grad is None  # zeroed by set_to_none
        assert model.model.layers[0].mlp.act_fn.coefficients()[0].item() != pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_is_invisible(variant):
    """Changing tokens at left-padded positions leaves the real tokens' logits unchanged (sdpa)."""
    model = tiny_model(variant, attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"
    ids = random_ids(2, 12, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # row 0: 5 pad positions on the left
    other = ids.clone()
    other[0, :5] = random_ids(1, 5, seed=8)[0]
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(other, attention_mask=mask).logits
    torch.testing.assert_close(a[0, 5:], b[0, 5:], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    # And the mask matters at all: without it the real tokens do see the changed pads.
    with torch.no_grad():
        c = model(ids).logits
        d = model(other).logits
    assert not torch.allclose(c[0, 5:], d[0, 5:], atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_matches_sdpa(variant):
    model = tiny_model(variant, attn_implementation="eager")
    ids = random_ids(2, 10, seed=11)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        eager = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(eager[0], sdpa[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eager[1, 3:], sdpa[1, 3:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_cache(variant):
    model = tiny_model(variant)
    prompt = random_ids(1, 6, seed=13)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape == (1, 12)
        # Greedy decoding with the KV cache picks, at every step, the argmax of a full forward.
        logits = model(out[:, :-1], use_cache=False).logits
    torch.testing.assert_close(out[0, 6:], logits[0, 5:].argmax(-1))
    # Incremental forward with an explicit cache == full forward.
    with torch.no_grad():
        first = model(out[:, :8], use_cache=True)
        cache = first["cache"] if "cache" in first else first["past_key_values"]
        step = model(out[:, 8:10], cache=cache, use_cache=True).logits
        full = model(out[:, :10], use_cache=False).logits
    torch.testing.assert_close(step, full[:, 8:10], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 3. Save and reload: Auto classes, and stock transformers with trust_remote_code
# ---------------------------------------------------------------------------------------------

# Runs in a fresh interpreter where hf_fp8 cannot be imported (sys.modules entry None makes any
# `import hf_fp8` raise): the saved modeling code alone must rebuild the model.
REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["hf_fp8"] = None
    import torch
    torch.set_num_threads(1)  # as in the test process: same GEMM blocking, bit-identical logits
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    out = {}
    for i, path in enumerate(sys.argv[1:]):
        config = AutoConfig.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        assert not any(m.startswith("hf_fp8.") for m in sys.modules), "hf_fp8 was imported"
        ids = load_file(path + "/inputs.safetensors")["input_ids"]
        with torch.no_grad():
            out[f"logits{i}"] = model(ids).logits.contiguous()
        print(type(config).__name__, type(model).__name__, config.variant)
    save_file(out, sys.argv[1] + "/remote_logits.safetensors")
    """
)


def test_save_and_reload(tmp_path):
    dirs, expected = [], []
    for variant in VARIANTS:
        model = tiny_model(variant, seed=21)
        # Move the FOG scalars off their init values, so a reload that re-initializes them fails.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() < 2:
                    p.add_(0.125)
        ids = random_ids(2, 9, seed=22)
        with torch.no_grad():
            logits = model(ids).logits
        path = tmp_path / variant
        model.save_pretrained(path)
        save_file({"input_ids": ids}, str(path / "inputs.safetensors"))

        # The code travels with the weights, and config.json says where to find it.
        assert (path / "configuration_fog.py").is_file() and (path / "modeling_fog.py").is_file()
        saved = json.loads((path / "config.json").read_text())
        assert saved["model_type"] == "fog" and saved["variant"] == variant
        assert saved["auto_map"] == {
            "AutoConfig": "configuration_fog.FOGConfig",
            "AutoModel": "modeling_fog.FOGModel",
            "AutoModelForCausalLM": "modeling_fog.FOGForCausalLM",
        }

        # In this process (registered): the Auto classes give hf_fp8's classes back.
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        assert type(reloaded) is FOGForCausalLM
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, logits, rtol=0, atol=0)
        base = AutoConfig.from_pretrained(path)
        assert type(base) is FOGConfig
        dirs.append(str(path))
        expected.append(logits)

    # Stock transformers, hf_fp8 not importable, code from the saved directory.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, *dirs], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split("\n")[:3] == [f"FOGConfig FOGForCausalLM {v}" for v in VARIANTS]
    remote = load_file(str(tmp_path / "fog-max" / "remote_logits.safetensors"))
    for i, logits in enumerate(expected):
        torch.testing.assert_close(remote[f"logits{i}"], logits, rtol=0, atol=0)


def test_tied_embeddings_round_trip(tmp_path):
    """The 390M recipes tie the LM head to the embedding (the paper unties only at >= 1.5B)."""
    assert json.loads((RECIPES / "fog-max-390m.json").read_text())["tie_word_embeddings"] is True
    model = tiny_model("fog-flash", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = random_ids(2, 7, seed=31)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_register_is_idempotent_and_auto_classes_build_fog():
    register()
    register()
    config = AutoConfig.for_model("fog", variant="fog-flash", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=256)
    assert type(config) is FOGConfig
    assert type(AutoModelForCausalLM.from_config(config)) is FOGForCausalLM
    from transformers import AutoModel

    assert type(AutoModel.from_config(config)) is FOGModel


# ---------------------------------------------------------------------------------------------
# 4. FP8
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_fp8_convert_and_train(variant):
    model = tiny_model(variant)
    report = hf_fp8.convert_model(model, hf_fp8.FP8Recipe(attention=True))
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"]
    assert report.converted == [f"model.layers.{i}.{n}" for i in range(2) for n in per_layer]
    assert all(isinstance(model.get_submodule(n), hf_fp8.FP8Linear) for n in report.converted)
    assert set(report.skipped) == {"lm_head"}
    assert report.attention_modules == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert model.config._attn_implementation == "hf_fp8"
    attention_rows = [r for r in report.rows if r.kind == "attention"]
    assert len(attention_rows) == 1 and attention_rows[0].fp8
    assert "attention (2 layers)" in str(report)

    losses = train(model, steps=8, fp8=True)
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


# ---------------------------------------------------------------------------------------------
# 5. Configs
# ---------------------------------------------------------------------------------------------


def test_shipped_configs_load():
    files = sorted(RECIPES.glob("fog-*.json"))
    names = {f.stem for f in files}
    assert {f"{v}-tiny" for v in VARIANTS} <= names
    assert {"fog-flash-390m", "fog-max-390m"} <= names
    assert {f"{v}-{s}" for v in VARIANTS for s in ("1.5b", "8b")} <= names
    for f in files:
        data = json.loads(f.read_text())
        a = AutoConfig.for_model(**data)
        b = FOGConfig.from_json_file(f)
        assert type(a) is FOGConfig and a.to_dict() == b.to_dict()
        assert f.stem.startswith(a.variant + "-")
        gemm_dims = (a.hidden_size, a.intermediate_size, a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim)
        assert all(d % 16 == 0 for d in gemm_dims), (f.name, gemm_dims)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("variant", "fog-ultra", "FOGConfig.variant must be one of 'fog-max', 'fog-opt', 'fog-flash'"),
        ("attention_dropout", 0.1, "FOGConfig.attention_dropout must be 0"),
        ("num_key_value_heads", 3, "FOGConfig.num_key_value_heads (3) must divide num_attention_heads (4)"),
        ("head_dim", 15, "FOGConfig.head_dim must be even"),
        ("hidden_size", 0, "FOGConfig.hidden_size must be a positive integer"),
        ("intermediate_size", 1.5, "FOGConfig.intermediate_size must be a positive integer"),
        ("num_hidden_layers", True, "FOGConfig.num_hidden_layers must be a positive integer"),
        ("softmax_scale", -0.1, "FOGConfig.softmax_scale must be a finite number > 0"),
        ("softmax_scale", float("nan"), "FOGConfig.softmax_scale must be a finite number > 0"),
        ("init_std", 0, "FOGConfig.init_std must be a finite number > 0"),
        ("input_scale", "50", "FOGConfig.input_scale must be a finite number > 0"),
        ("rope_theta", -1.0, "FOGConfig.rope_theta must be a finite number > 0"),
        ("xielu_eps", 1e-6, "FOGConfig.xielu_eps must be a negative number"),
        ("xielu_alpha_init", 0.4, "FOGConfig.xielu_alpha_init (0.4) must exceed xielu_beta (0.5)"),
        ("tie_word_embeddings", "yes", "FOGConfig.tie_word_embeddings must be true or false"),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value, message):
    with pytest.raises(ValueError) as error:
        tiny_config("fog-max", **{field: value})
    assert message in str(error.value)


def test_config_defaults():
    config = FOGConfig()
    assert (config.variant, config.hidden_size, config.num_hidden_layers) == ("fog-max", 2048, 16)
    assert config.intermediate_size == 12288  # 1.5 x the 8192-wide gated MLP of the paper's 1.5B
    assert config.head_dim == 128 and config.softmax_scale == pytest.approx(0.125)
    assert config.rope_theta == 500000 and config.input_scale == 50.0 and config.attention_dropout == 0
    assert FOGConfig(init_std=0.01).input_scale == 100.0
    assert FOGConfig(variant="fog-flash").qk_guard == "tanh" and FOGConfig(variant="fog-opt").mlp_activation == "gelu"
