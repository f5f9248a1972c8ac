"""Checkpoints of converted models (hf_fp8/hub.py): stock-loadable weights, the FP8 state beside them,
bitwise-exact resume (plain loop, Accelerate, Trainer), model cards and the Hub upload path
(offline: HfApi.create_repo / create_commit are replaced by fakes that record the commit)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, metadata_load
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import hf_fp8
from hf_fp8 import hub
from hf_fp8.scaling import delayed_scale_states

from helpers import structured_batches

ROOT = Path(__file__).resolve().parents[1]
RECIPE = hf_fp8.FP8Recipe(amax_history_len=16)
FP8_FILES = {"fp8_state.safetensors", "fp8_recipe.json"}


@pytest.fixture(autouse=True)
def one_thread():
    # Bit-identical GEMMs between runs and processes need the same CPU blocking.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_config(layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def tiny_model(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(layers)).float()


def step(model, opt, x, sched=None) -> float:
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    loss.backward()
    opt.step()
    hf_fp8.update_scales(model)
    if sched is not None:
        sched.step()
    opt.zero_grad()
    return loss.item()


def trained_fp8_model(tmp_path=None, steps: int = 2, layers: int = 2, recipe=RECIPE):
    model = tiny_model(layers=layers)
    original_keys = set(model.state_dict())
    hf_fp8.convert_model(model, recipe)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x in structured_batches(steps):
        step(model, opt, x)
    return model, original_keys


def fp8_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".fp8_scale." in k or ".fp8_attention_scale." in k}


def safetensors_keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


# ---------------------------------------------------------------------------------------------
# save_pretrained: stock-loadable weights + FP8 state beside them
# ---------------------------------------------------------------------------------------------


def test_save_pretrained_writes_original_keys_and_fp8_state(tmp_path):
    model, original_keys = trained_fp8_model()
    assert any(".fp8_scale." in k for k in model.state_dict())  # the buffers are in the state_dict...
    model.save_pretrained(tmp_path)
    assert FP8_FILES <= set(os.listdir(tmp_path))
    assert safetensors_keys(tmp_path / "model.safetensors") == original_keys  # ...but not in the weights
    weights = load_file(tmp_path / "model.safetensors")
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in weights.values())
    state = load_file(tmp_path / "fp8_state.safetensors")
    assert state.keys() == fp8_state(model).keys()
    assert all(torch.equal(state[k], v) for k, v in fp8_state(model).items())
    meta = json.loads((tmp_path / "fp8_recipe.json").read_text())
    assert meta["format_version"] == hub.FORMAT_VERSION
    assert hf_fp8.FP8Recipe.from_dict(meta["recipe"]) == RECIPE
    assert len(meta["fp8_linear_modules"]) == 14 and meta["fp8_attention_modules"] == []
    # Idempotent installation, and existing patterns are kept.
    before = list(model._keys_to_ignore_on_save)
    hf_fp8.convert_model(model, RECIPE)
    assert model._keys_to_ignore_on_save == before
    assert model.__dict__["save_pretrained"].func is hub._save_pretrained


def test_converted_model_survives_deepcopy_and_pickle(tmp_path):
    """A converted model's FP8-aware save_pretrained is bound to the model it belongs to after
    copy.deepcopy and after a pickle round trip (torch.save(model), multiprocessing). It was a bound
    method in the model's __dict__, which pickle cannot rebuild (AttributeError: no attribute
    '_save_pretrained'); now a partial of the module-level function. (In memory only: hf_fp8's own
    checkpoints are safetensors.)"""
    import pickle

    model = tiny_model()
    hf_fp8.convert_model(model, RECIPE)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other.save_pretrained.args[0] is other and other.push_to_hub.args[0] is other
        other.save_pretrained(tmp_path)
        state = load_file(tmp_path / "fp8_state.safetensors")
        assert all(torch.equal(state[k], v) for k, v in fp8_state(other).items())


def test_existing_keys_to_ignore_on_save_are_kept(tmp_path):
    model = tiny_model()
    model._keys_to_ignore_on_save = ["lm_head.weight"]
    hf_fp8.convert_model(model, RECIPE)
    assert model._keys_to_ignore_on_save[0] == "lm_head.weight"
    model.save_pretrained(tmp_path)
    keys = safetensors_keys(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in keys and not any("fp8" in k for k in keys)


STOCK_RELOAD = textwrap.dedent(
    """
    import sys
    sys.modules["hf_fp8"] = None  # `import hf_fp8` raises ImportError: stock transformers only
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    try:
        import hf_fp8
        raise SystemExit("hf_fp8 importable")
    except ImportError:
        pass
    d = sys.argv[1]
    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM", type(model)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    expected = load_file(sys.argv[2])
    state = model.state_dict()
    assert set(state) == set(expected), set(state) ^ set(expected)
    bad = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not bad, bad
    ids = load_file(sys.argv[3])["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_file({"logits": logits.contiguous()}, sys.argv[4])
    print("stock reload ok", "hf_fp8" in sys.modules and sys.modules["hf_fp8"] is None)
    """
)


def test_stock_transformers_reloads_identical_weights_and_logits(tmp_path):
    model, original_keys = trained_fp8_model()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    # Expected: the trained weights, computed in high precision (the same Parameters as nn.Linear).
    plain = copy.deepcopy(model)
    hf_fp8.revert_model(plain)
    plain.eval()
    expected = {k: v.contiguous() for k, v in plain.state_dict().items()}
    assert set(expected) == original_keys
    ids = structured_batches(1, batch=2, seq=16, seed=7)[0]
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
    save_file(expected, tmp_path / "expected.safetensors")
    save_file({"input_ids": ids}, tmp_path / "ids.safetensors")
    script = tmp_path / "stock_reload.py"
    script.write_text(STOCK_RELOAD)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(script), str(ckpt), str(tmp_path / "expected.safetensors"),
         str(tmp_path / "ids.safetensors"), str(tmp_path / "logits.safetensors")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stock reload ok True" in out.stdout
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], logits)


# ---------------------------------------------------------------------------------------------
# load_fp8_state: restores, and refuses what does not match
# ---------------------------------------------------------------------------------------------


def test_load_fp8_state_round_trip_and_margin(tmp_path):
    model, _ = trained_fp8_model()
    from hf_fp8.integrations.trainer import raise_margin

    raise_margin(model)
    model.save_pretrained(tmp_path)
    fresh = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    hf_fp8.convert_model(fresh, hub.read_fp8_recipe(tmp_path))
    restored = hub.load_fp8_state(fresh, tmp_path)
    assert set(restored) == set(fp8_state(model))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in fp8_state(model).items())
    for (_, a), (_, b) in zip(delayed_scale_states(model), delayed_scale_states(fresh)):
        assert a.margin == b.margin == 1 and torch.equal(a.scale_numerator, b.scale_numerator)
        # The GEMMs multiply by the stored inverse: it must follow the loaded scales.
        assert not torch.equal(b.scale, torch.ones_like(b.scale)) and torch.equal(b.inv_scale, b.scale.reciprocal())


def test_public_functions_act_on_the_model_inside_torch_compile(tmp_path):
    """torch.compile(model) wraps the model (names prefixed "_orig_mod.", no save_pretrained on the
    wrapper's type). Converting the wrapper converted it with prefixed names, and save_pretrained then
    wrote no FP8 state at all. Every public function now works on the model inside."""
    model = tiny_model()
    compiled = torch.compile(model, backend="eager")
    report = hf_fp8.convert_model(compiled, RECIPE)
    assert sorted(report.converted) == sorted(hf_fp8.convert_model(tiny_model(), RECIPE).converted)
    assert not any("_orig_mod" in name for name in [*report.converted, *report.skipped])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    hf_fp8.attach(compiled, opt)
    with pytest.raises(RuntimeError, match="already attached"):
        hf_fp8.attach(model, opt)  # the same model: a second hook would roll the histories twice
    for x in structured_batches(2):
        compiled(input_ids=x, labels=x, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
    assert set(hf_fp8.fp8_stats(compiled)) == set(hf_fp8.fp8_stats(model)) == set(report.converted)
    with hf_fp8.collect_fp8_stats(compiled) as stats:
        x = structured_batches(1)[0]
        compiled(input_ids=x, labels=x, use_cache=False).loss.backward()
    assert set(stats.layers) == set(report.converted)
    assert not any("_orig_mod" in k for k in hub.model_card(compiled).content.split("---")[1].splitlines())

    compiled.save_pretrained(tmp_path)  # the wrapper forwards to the model's FP8-aware save_pretrained
    assert FP8_FILES <= set(os.listdir(tmp_path))
    assert load_file(tmp_path / "fp8_state.safetensors").keys() == fp8_state(model).keys()
    fresh = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    fresh_compiled = torch.compile(fresh, backend="eager")
    hf_fp8.convert_model(fresh_compiled, hub.read_fp8_recipe(tmp_path))
    assert set(hub.load_fp8_state(fresh_compiled, tmp_path)) == set(fp8_state(model))
    assert sorted(hf_fp8.revert_model(compiled)) == sorted(report.converted)


def test_load_fp8_state_refuses_mismatches(tmp_path):
    model, _ = trained_fp8_model()
    model.save_pretrained(tmp_path / "two")

    bigger = tiny_model(layers=3)  # another model size: layer 2 has no saved state
    hf_fp8.convert_model(bigger, RECIPE)
    with pytest.raises(ValueError, match=r"first mismatch: the model's FP8 state 'model\.layers\.2\.self_attn\.q_proj\.fp8_scale\.amax_history'"):
        hub.load_fp8_state(bigger, tmp_path / "two")

    smaller = tiny_model(layers=1)  # the file holds layers the model does not have
    hf_fp8.convert_model(smaller, RECIPE)
    with pytest.raises(ValueError, match=r"first mismatch: .* holds 'model\.layers\.1\.self_attn\.q_proj\.fp8_scale\.amax_history'"):
        hub.load_fp8_state(smaller, tmp_path / "two")

    short = tiny_model()  # another history length
    hf_fp8.convert_model(short, RECIPE.replace(amax_history_len=8))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj\.fp8_scale\.amax_history' is \(3, 16\).*\(3, 8\).*history length 16 saved vs 8.*read_fp8_recipe"):
        hub.load_fp8_state(short, tmp_path / "two")

    # A renamed module: the model's name is missing, and the file's odd name is named too.
    state = load_file(tmp_path / "two" / "fp8_state.safetensors")
    renamed = {k.replace("layers.0.mlp.up_proj.", "layers.0.mlp.upper_proj."): v for k, v in state.items()}
    (tmp_path / "renamed").mkdir()
    save_file(renamed, tmp_path / "renamed" / "fp8_state.safetensors")
    target = tiny_model()
    hf_fp8.convert_model(target, RECIPE)
    before = fp8_state(target)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.up_proj\.fp8_scale\.amax_history' is not in .*'model\.layers\.0\.mlp\.upper_proj\.fp8_scale\.amax_history'"):
        hub.load_fp8_state(target, tmp_path / "renamed")
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing copied

    with pytest.raises(ValueError, match="no FP8 layers"):
        hub.load_fp8_state(tiny_model(), tmp_path / "two")
    with pytest.raises(FileNotFoundError, match="no fp8_state.safetensors"):
        hub.load_fp8_state(target, tmp_path)


def test_no_pickle_loads_in_package():
    import re

    # Code, not prose: torch.load, any pickle/dill/joblib/cloudpickle import or call, np.load(allow_pickle).
    loads = re.compile(r"torch\.load\s*\(|^\s*(import|from)\s+(pickle|dill|joblib|cloudpickle)\b|\b(pickle|dill|joblib)\.loads?\s*\(|allow_pickle\s*=\s*True", re.M)
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in (ROOT / "hf_fp8").rglob("*.py") for m in loads.finditer(p.read_text())]
    assert not offenders, offenders


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------

STEPS, RESUME_AT = 6, 3


def lr_lambda(i):
    return 1.0 - i / (STEPS + 1)


def test_plain_loop_resume_is_bitwise(tmp_path):
    batches = structured_batches(STEPS)

    def setup(model):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    model = tiny_model()
    hf_fp8.convert_model(model, RECIPE)
    opt, sched = setup(model)
    losses = []
    for i, x in enumerate(batches):
        if i == RESUME_AT:
            model.save_pretrained(tmp_path)
            saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
        losses.append(step(model, opt, x, sched))

    def resume(load_state: bool):
        fresh = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).train()  # from_pretrained -> eval()
        hf_fp8.convert_model(fresh, hub.read_fp8_recipe(tmp_path))
        if load_state:
            hub.load_fp8_state(fresh, tmp_path)
        opt2, sched2 = setup(fresh)
        opt2.load_state_dict(copy.deepcopy(saved_opt))
        sched2.load_state_dict(saved_sched)
        return fresh, [step(fresh, opt2, x, sched2) for x in batches[RESUME_AT:]]

    resumed, resumed_losses = resume(True)
    assert resumed_losses == losses[RESUME_AT:]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    # Control: without the FP8 state the run is not the same (the test can tell).
    _, cold_losses = resume(False)
    assert cold_losses != losses[RESUME_AT:]


def test_accelerate_save_state_load_state_is_bitwise(tmp_path):
    from accelerate import Accelerator

    batches = structured_batches(STEPS)

    def run(resume_from=None, save_to=None):
        accelerator = Accelerator(cpu=True)
        model = tiny_model()
        hf_fp8.convert_model(model, RECIPE)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        model, opt, sched = accelerator.prepare(model, opt, sched)
        start = 0
        if resume_from is not None:
            accelerator.load_state(resume_from)
            start = RESUME_AT
        losses = []
        for i in range(start, STEPS):
            if save_to is not None and i == RESUME_AT:
                accelerator.save_state(save_to)
                saved = fp8_state(model)
            loss = model(input_ids=batches[i], labels=batches[i], use_cache=False).loss
            accelerator.backward(loss)
            opt.step()
            hf_fp8.update_scales(model)
            sched.step()
            opt.zero_grad()
            losses.append(loss.item())
        if resume_from is not None:
            return model, losses, None
        return model, losses, saved

    full, losses, saved_state = run(save_to=tmp_path / "state")
    resumed, resumed_losses, _ = run(resume_from=tmp_path / "state")
    # save_state wrote the model's state_dict, FP8 buffers included.
    weights = [p for p in (tmp_path / "state").iterdir() if p.name.startswith("model") and p.suffix == ".safetensors"]
    assert weights and set(saved_state) <= set().union(*(safetensors_keys(p) for p in weights))
    assert resumed_losses == losses[RESUME_AT:]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.items = [x for b in structured_batches(n, batch=1, seed=3) for x in b]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i], "labels": self.items[i]}


def test_trainer_resume_from_checkpoint_is_bitwise(tmp_path):
    from transformers import Trainer, TrainingArguments

    class RecordingTrainer(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            self.losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
            return loss

    def run(out, resume=None):
        args = TrainingArguments(
            output_dir=str(out), max_steps=STEPS, save_steps=RESUME_AT, save_strategy="steps",
            per_device_train_batch_size=2, learning_rate=3e-3, lr_scheduler_type="linear", logging_steps=1,
            report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        )
        callback = hf_fp8.FP8TrainerCallback(RECIPE, verbose=False)
        trainer = RecordingTrainer(model=tiny_model(), args=args, train_dataset=_Dataset(2 * STEPS), callbacks=[callback])
        trainer.losses = []
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    full, full_cb = run(tmp_path / "full")
    ckpt = tmp_path / "full" / f"checkpoint-{RESUME_AT}"
    assert FP8_FILES <= set(os.listdir(ckpt))
    assert not any("fp8" in k for k in safetensors_keys(ckpt / "model.safetensors"))
    assert full_cb.resumed_fp8_state_from is None
    resumed, resumed_cb = run(tmp_path / "resumed", resume=str(ckpt))
    assert resumed_cb.resumed_fp8_state_from == str(ckpt)
    assert len(full.losses) == STEPS
    assert resumed.losses == full.losses[RESUME_AT:]
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def test_template_copies_are_identical():
    assert (ROOT / "model_cards" / "fp8_model_card.md").read_bytes() == hub.template_path().read_bytes()


def test_model_card_content_and_front_matter(tmp_path):
    model = tiny_model()
    report = hf_fp8.convert_model(model, RECIPE)
    bench = json.loads((ROOT / "benchmarks" / "results" / "train_throughput.json").read_text())
    card = hub.model_card(
        model, report, base_model="meta-llama/Llama-3.2-1B", hardware="1x NVIDIA H200",
        training_summary={"final_loss": 2.345, "steps": 300, "kurtosis": {"qkv": [3.0, 3.5, 4.25]}},
        benchmark=bench, tags=["llama"], license="apache-2.0",
    )
    assert isinstance(card, ModelCard)
    text = str(card)
    for needle in ("`LlamaForCausalLM`", "amax history length | 16", "amax compute algo | `max`", "margin | 0",
                   "`float8_e4m3fn`", "`float8_e5m2`", f"{100 * report.fp8_flop_fraction:.1f}%",
                   "model.layers.*.mlp.down_proj (x2)", "`lm_head`: skip pattern", "recipe.attention is False",
                   *(f"| {mode} | {bench['1.5b'][mode]['tokens_per_s']:,.0f} | {bench['1.5b'][mode]['ratio_vs_bf16']:.3f}x"
                     for mode in ("hf_fp8", "hf_fp8_attn")), "1.5b, NVIDIA H200", "final loss: 2.345", "kurtosis trend `qkv`: 3 -> 4.25",
                   "1x NVIDIA H200", '"amax_history_len": 16'):
        assert needle in text, needle
    # Front matter: parsed back by huggingface_hub, offline.
    card.save(tmp_path / "README.md")
    meta = metadata_load(tmp_path / "README.md")
    assert {"fp8", "hf_fp8", "torchao", "llama"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["base_model"] == "meta-llama/Llama-3.2-1B"
    data = ModelCardData(**meta)
    assert data.license == "apache-2.0"
    reparsed = ModelCard.load(tmp_path / "README.md")
    assert reparsed.data.tags == meta["tags"]


def test_model_card_attention_and_stability():
    model = tiny_model()
    model.config.hf_fp8_attention_stability = None
    report = hf_fp8.convert_model(model, RECIPE.replace(attention=True))
    text = str(hub.model_card(model, report))
    assert "FP8 attention (QK^T and P.V in FP8" in text and "in 2 modules" in text


def test_attached_card_is_written_by_save_pretrained(tmp_path):
    model, _ = trained_fp8_model()
    card = hub.model_card(model, attach=True, training_summary={"final_loss": 1.5})
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == str(card)


# ---------------------------------------------------------------------------------------------
# Upload (offline: the HfApi calls that would reach the network are recorded instead)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    calls = {"create_repo": [], "commits": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append((repo_id, kwargs))
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            src = op.path_or_fileobj
            files[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str) else bytes(src)
        calls["commits"].append({"repo_id": repo_id, "files": files, **kwargs})
        return "commit-info"

    def no_network(self, *args, **kwargs):
        raise AssertionError("network call")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "create_branch", no_network)
    monkeypatch.setattr(HfApi, "preupload_lfs_files", no_network)
    return calls


EXPECTED_UPLOAD = {"model.safetensors", "config.json", "generation_config.json", "fp8_state.safetensors", "fp8_recipe.json", "README.md"}


def test_push_to_hub_uploads_weights_card_and_fp8_state(fake_hub):
    model, original_keys = trained_fp8_model()
    assert model.push_to_hub("user/tiny-fp8", private=True) == "commit-info"
    assert fake_hub["create_repo"] == [("user/tiny-fp8", {"private": True, "token": None, "exist_ok": True, "repo_type": "model"})]
    (commit,) = fake_hub["commits"]
    assert commit["repo_id"] == "user/tiny-fp8"
    assert set(commit["files"]) == EXPECTED_UPLOAD
    card = commit["files"]["README.md"].decode()
    assert "amax history length | 16" in card and "- hf_fp8" in card
    state = commit["files"]["fp8_state.safetensors"]
    from safetensors.torch import load as load_bytes

    assert set(load_bytes(state)) == set(fp8_state(model))
    assert set(load_bytes(commit["files"]["model.safetensors"])) == original_keys


def test_save_pretrained_push_to_hub_includes_fp8_files(fake_hub, tmp_path):
    model, _ = trained_fp8_model()
    hub.model_card(model, attach=True)
    model.save_pretrained(tmp_path / "tiny-fp8", push_to_hub=True, repo_id="user/tiny-fp8")
    (commit,) = fake_hub["commits"]
    assert commit["repo_id"] == "user/tiny-fp8" and set(commit["files"]) == EXPECTED_UPLOAD
