"""Checkpoints, FP8 training state, model cards and Hub uploads of converted models.

How `model.save_pretrained(dir)` behaves on a converted model (no change in user code)
-------------------------------------------------------------------------------------
`convert_model` calls `install_save_hooks(model, report)` on a transformers `PreTrainedModel`:

1. `model._keys_to_ignore_on_save` (set on the *instance*; the class attribute is not touched) becomes
   the patterns the model already had plus the state_dict key of every persistent `DelayedScale`
   buffer (`...q_proj.fp8_scale.amax_history`, `...self_attn.fp8_attention_scale.scale`, ...).
   transformers drops those keys before writing `model.safetensors`, so the weights file holds
   exactly the keys of the original model, as plain tensors (the FP8 layers keep plain Parameters),
   and stock transformers (without hf_fp8) loads it into the original class with identical weights.
   The keys are plain names: they work whether transformers matches them exactly or as regexes.
2. `model.save_pretrained` and `model.push_to_hub` are replaced on the instance (bound methods in
   `model.__dict__`, so `copy.deepcopy(model)` gets wrappers bound to the copy; installing twice
   is a no-op). The `save_pretrained` wrapper refreshes the ignore list (layers converted or
   reverted since), calls the original method, then on the main process writes beside the weights
       fp8_state.safetensors  every persistent DelayedScale buffer (amax_history, scale,
                              pending_amax, initialized, nonfinite_skips), keyed by its
                              state_dict key (`<module>.fp8_scale.<buffer>`)
       fp8_recipe.json        format version, hf_fp8 version, the FP8Recipe, each scaled module
                              (roles, FP8 dtypes, history length, algo, current margin), the
                              linear / attention module lists and the attention stability mode
       README.md              only if a card was attached (`model_card(..., attach=True)` or
                              `attach_card`)
   With `push_to_hub=True` it saves without transformers' upload and uploads the folder itself
   (`upload_folder`), so the FP8 files are part of the commit.
   The `push_to_hub` wrapper is `push(model, repo_id, ...)`: save_pretrained into a temporary
   directory, write the card (the attached one, else `model_card(model)`), upload every file in
   one commit. (transformers' own push_to_hub would replace README.md with a generic card.)

Trainer checkpoints are written by `save_pretrained`, so `fp8_state.safetensors` lands in every
`checkpoint-N/`; `FP8TrainerCallback` loads it back on `resume_from_checkpoint`.
`load_fp8_state(model, dir)` restores the state into a converted model (safetensors only; there is
no pickle load anywhere in hf_fp8).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .recipe import FP8Recipe
from .scaling import DelayedScale, delayed_scale_states, scale_buffers, without_compile_wrapper

__all__ = [
    "FP8_RECIPE_NAME",
    "FP8_STATE_NAME",
    "FORMAT_VERSION",
    "attach_card",
    "install_save_hooks",
    "load_fp8_state",
    "model_card",
    "push",
    "read_fp8_recipe",
    "save_fp8_state",
    "upload_folder",
]

FP8_STATE_NAME = "fp8_state.safetensors"
FP8_RECIPE_NAME = "fp8_recipe.json"
CARD_NAME = "README.md"
FORMAT_VERSION = 1
TAGS = ("fp8", "hf_fp8", "torchao")
TEMPLATE_NAME = "fp8_model_card.md"

# Attributes kept in the model's __dict__ (not modules, not buffers, not in the state_dict).
_ORIGINAL_IGNORE = "_hf_fp8_original_keys_to_ignore_on_save"
_REPORT = "_hf_fp8_report"
_CARD = "_hf_fp8_model_card"
_WRAPPED = "_hf_fp8_save_wrapped"


# ---------------------------------------------------------------------------------------------
# Which keys are FP8 state
# ---------------------------------------------------------------------------------------------


def fp8_state_keys(model: nn.Module, *, remove_duplicate: bool = True) -> list[str]:
    """state_dict keys of every persistent DelayedScale buffer of `model`, in module order.
    `remove_duplicate=False`: also every alias of a module registered under several names (as
    `model.state_dict()` lists them)."""
    return [key for key, _ in scale_buffers(model, persistent_only=True, remove_duplicate=remove_duplicate)]


def _fp8_state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: t.detach().to("cpu").contiguous().clone() for key, t in scale_buffers(model, persistent_only=True)}


def _refresh_ignore_list(model: nn.Module) -> None:
    original = model.__dict__.get(_ORIGINAL_IGNORE) or []
    keys = [k for k in fp8_state_keys(model, remove_duplicate=False) if k not in original]
    model._keys_to_ignore_on_save = list(original) + keys if (original or keys) else None


# ---------------------------------------------------------------------------------------------
# save_pretrained / push_to_hub behaviour installed at conversion
# ---------------------------------------------------------------------------------------------


def install_save_hooks(model: nn.Module, report=None) -> None:
    """Make `model.save_pretrained` / `model.push_to_hub` FP8-aware (module docstring). Called by
    `convert_model`; idempotent. Models without `save_pretrained` (plain nn.Module) are left alone."""
    if report is not None:
        model.__dict__[_REPORT] = report
    if not callable(getattr(type(model), "save_pretrained", None)):
        return
    if _ORIGINAL_IGNORE not in model.__dict__:
        model.__dict__[_ORIGINAL_IGNORE] = list(getattr(model, "_keys_to_ignore_on_save", None) or [])
    _refresh_ignore_list(model)
    if model.__dict__.get(_WRAPPED):
        return
    # Partials of module-level functions, not bound methods: pickle (torch.save of a whole model,
    # multiprocessing) can rebuild them, and deepcopy rebinds them to the copy.
    model.__dict__["save_pretrained"] = functools.partial(_save_pretrained, model)
    if callable(getattr(type(model), "push_to_hub", None)):
        model.__dict__["push_to_hub"] = functools.partial(_push_to_hub, model)
    model.__dict__[_WRAPPED] = True


def _save_pretrained(self, save_directory, *args, **kwargs):
    """transformers' save_pretrained, plus fp8_state.safetensors, fp8_recipe.json (and README.md
    when a card is attached) beside the weights; the FP8 buffers stay out of model.safetensors."""
    _refresh_ignore_list(self)
    ignore = set(fp8_state_keys(self, remove_duplicate=False))
    state_dict = kwargs.get("state_dict")
    if state_dict is not None:  # e.g. the Trainer passes model.state_dict()
        kwargs["state_dict"] = {k: v for k, v in state_dict.items() if k not in ignore}
    push_to_hub = kwargs.pop("push_to_hub", False)
    hub_kwargs = {k: kwargs.pop(k) for k in ("repo_id", "commit_message", "private", "token", "create_pr", "revision", "commit_description") if k in kwargs}
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        save_fp8_state(self, save_directory)
        card = self.__dict__.get(_CARD)
        if card is not None:
            card.save(os.path.join(save_directory, CARD_NAME))
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or str(save_directory).rstrip("/").split(os.path.sep)[-1]
            upload_folder(save_directory, repo_id, **hub_kwargs)
    return result


def _push_to_hub(self, repo_id: str, **kwargs):
    return push(self, repo_id, **kwargs)


# ---------------------------------------------------------------------------------------------
# FP8 state files
# ---------------------------------------------------------------------------------------------


def _recipe_of(model: nn.Module) -> FP8Recipe | None:
    report = model.__dict__.get(_REPORT)
    return getattr(report, "recipe", None)


def save_fp8_state(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Write fp8_state.safetensors and fp8_recipe.json of `model` into `directory` (what the
    save_pretrained wrapper does). Returns the written paths; nothing is written for a model
    without FP8 layers."""
    from safetensors.torch import save_file

    from . import __version__

    model = without_compile_wrapper(model)
    tensors = _fp8_state_tensors(model)
    if not tensors:
        return []
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_path, recipe_path = directory / FP8_STATE_NAME, directory / FP8_RECIPE_NAME
    save_file(tensors, str(state_path), metadata={"format": "pt", "hf_fp8_format_version": str(FORMAT_VERSION)})
    recipe = _recipe_of(model)
    report = model.__dict__.get(_REPORT)
    modules, linear, attention = {}, [], []
    for owner, state in delayed_scale_states(model):
        name = next(n for n, m in model.named_modules() if m is state)
        modules[name] = {
            "owner": owner,
            "roles": list(state.roles),
            "dtypes": [str(d).removeprefix("torch.") for d in state.dtypes],
            "amax_history_len": int(state.amax_history.shape[1]),
            "amax_compute_algo": state.amax_compute_algo,
            "margin": int(state.margin),
        }
        (attention if name.endswith(".fp8_attention_scale") else linear).append(owner)
    config = getattr(model, "config", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "hf_fp8_version": __version__,
        "state_file": FP8_STATE_NAME,
        "recipe": recipe.to_dict() if recipe is not None else None,
        "fp8_linear_modules": linear,
        "fp8_attention_modules": attention,
        "skipped": dict(report.skipped) if report is not None else None,
        "fp8_flop_fraction": report.fp8_flop_fraction if report is not None else None,
        "attention_stability": getattr(config, "hf_fp8_attention_stability", None),
        "modules": modules,
    }
    recipe_path.write_text(json.dumps(meta, indent=2) + "\n")
    return [str(state_path), str(recipe_path)]


def _fp8_paths(path: str | os.PathLike) -> tuple[Path, Path | None]:
    path = Path(path)
    if path.is_dir():
        state, meta = path / FP8_STATE_NAME, path / FP8_RECIPE_NAME
    else:
        state, meta = path, path.with_name(FP8_RECIPE_NAME)
    if not state.is_file():
        raise FileNotFoundError(
            f"load_fp8_state: no {FP8_STATE_NAME} in {path}. It is written by save_pretrained of a model converted "
            "with hf_fp8.convert_model (and by Trainer checkpoints of such a model)."
        )
    return state, meta if meta.is_file() else None


def read_fp8_recipe(path: str | os.PathLike) -> FP8Recipe:
    """The FP8Recipe saved in `path`/fp8_recipe.json (a directory or the file itself): convert a
    reloaded model with it before `load_fp8_state`."""
    path = Path(path)
    meta_path = path / FP8_RECIPE_NAME if path.is_dir() else path
    meta = json.loads(meta_path.read_text())
    _check_version(meta, meta_path)
    if meta.get("recipe") is None:
        raise ValueError(f"{meta_path}: no recipe recorded (the model was converted outside convert_model)")
    return FP8Recipe.from_dict(meta["recipe"], source=str(meta_path))


def _check_version(meta: dict, where) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{where}: FP8 state format version {version!r}; this hf_fp8 reads versions <= {FORMAT_VERSION} (upgrade hf_fp8)"
        )


def load_fp8_state(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Restore the FP8 training state written by save_pretrained (fp8_state.safetensors, and the
    margins from fp8_recipe.json) into the converted `model`. `path`: the checkpoint directory or
    the .safetensors file. Every name, shape and dtype is checked before anything is copied; the
    first mismatch raises ValueError naming it. Returns the restored keys."""
    from safetensors import safe_open

    model = without_compile_wrapper(model)
    state_path, meta_path = _fp8_paths(path)
    meta = None
    if meta_path is not None:
        meta = json.loads(meta_path.read_text())
        _check_version(meta, meta_path)
    expected = dict(scale_buffers(model, persistent_only=True))
    owners = {name: module for name, module in model.named_modules() if isinstance(module, DelayedScale)}
    hint = (
        "Convert the same architecture (same config) with the recipe saved beside it "
        "(hf_fp8.convert_model(model, hf_fp8.hub.read_fp8_recipe(dir))), apply the same attention stability mode, "
        "then call load_fp8_state."
    )
    if not expected:
        raise ValueError(f"load_fp8_state: {type(model).__name__} has no FP8 layers (no DelayedScale state). {hint}")
    with safe_open(str(state_path), framework="pt", device="cpu") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
    # safetensors lists keys alphabetically; "first" follows the saved module order when known.
    saved_order = {name: i for i, name in enumerate(((meta or {}).get("modules") or {}))}
    extra = sorted(set(loaded) - set(expected), key=lambda k: (saved_order.get(k.rpartition(".")[0], len(saved_order)), k))
    for key, buf in expected.items():
        if key not in loaded:
            also = f" (the file has {extra[0]!r}, which the model does not)" if extra else ""
            raise ValueError(
                f"load_fp8_state: first mismatch: the model's FP8 state {key!r} is not in {state_path}{also}. "
                f"The file holds {len(loaded)} entries, the model needs {len(expected)}. {hint}"
            )
        got = loaded[key]
        if tuple(got.shape) != tuple(buf.shape) or got.dtype != buf.dtype:
            why = ""
            if key.endswith("amax_history") and got.dim() == 2 and buf.dim() == 2 and got.shape[1] != buf.shape[1]:
                why = f" (amax history length {got.shape[1]} saved vs {buf.shape[1]} in the model's recipe)"
            raise ValueError(
                f"load_fp8_state: first mismatch: {key!r} is {tuple(got.shape)} {got.dtype} in {state_path} but "
                f"{tuple(buf.shape)} {buf.dtype} in the model{why}. {hint}"
            )
    for key in extra:
        if key not in expected:
            raise ValueError(
                f"load_fp8_state: first mismatch: {state_path} holds {key!r}, which the model has no FP8 state for. {hint}"
            )
    with torch.no_grad():
        for key, buf in expected.items():
            buf.copy_(loaded[key])
        for module in owners.values():
            module.forget_host_flags()
            module.sync_inverse_scale()
        for name, module in owners.items():
            margin = ((meta or {}).get("modules") or {}).get(name, {}).get("margin")
            if margin is not None and margin != module.margin:
                module.set_margin(margin)
    return list(expected)


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def template_path() -> Path:
    """The card template shipped in the package (hf_fp8/data/fp8_model_card.md, a copy of
    model_cards/fp8_model_card.md)."""
    return Path(str(resources.files("hf_fp8").joinpath("data", TEMPLATE_NAME)))


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _benchmark_rows(benchmark: dict | str | os.PathLike | None) -> tuple[list[dict], str | None]:
    if benchmark is None:
        return [], None
    if isinstance(benchmark, (str, os.PathLike)):
        benchmark = json.loads(Path(benchmark).read_text())
    if "results" not in benchmark and not any(isinstance(v, dict) and "tokens_per_s" in v for v in benchmark.values()):
        # train_throughput.py's file for several shapes: shape -> {device, torch, batch, mode -> numbers};
        # the card shows one shape, the paper's 1.5B when present.
        shape = "1.5b" if "1.5b" in benchmark else next(iter(benchmark), None)
        benchmark = {"shape": shape, **benchmark[shape]} if shape is not None else {}
    results = benchmark.get("results", benchmark)
    base = results.get("bf16", {}).get("tokens_per_s")
    rows = []
    for name, r in results.items():
        if not isinstance(r, dict) or "tokens_per_s" not in r:
            continue
        ratio = r.get("ratio_vs_bf16") or (r["tokens_per_s"] / base if base else None)
        rows.append({
            "name": name,
            "tokens_per_s": f"{r['tokens_per_s']:,.0f}",
            "ratio": f"{ratio:.3f}x" if ratio else "n/a",
            "peak_mem_gib": f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "n/a",
            "loss": f"{r['loss']:.4f}" if "loss" in r else "n/a",
        })
    where = ", ".join(str(benchmark[k]) for k in ("shape", "device", "torch") if benchmark.get(k))
    return rows, where or None


def _trend(values) -> str:
    values = [float(v) for v in values]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{values[0]:.3g} -> {values[-1]:.3g} (max {max(values):.3g}, {len(values)} points)"


def _summary_lines(summary: dict | None) -> list[str]:
    if not summary:
        return []
    lines = []
    for key, value in summary.items():
        if key == "kurtosis":
            if isinstance(value, dict):
                for site, series in value.items():
                    lines.append(f"kurtosis trend `{site}`: {_trend(series if isinstance(series, (list, tuple)) else [series])}")
            else:
                lines.append(f"kurtosis trend: {_trend(value)}")
        elif isinstance(value, float):
            lines.append(f"{key.replace('_', ' ')}: {value:.4g}")
        else:
            lines.append(f"{key.replace('_', ' ')}: {value}")
    return lines


def model_card(
    model: nn.Module,
    report=None,
    *,
    base_model: str | None = None,
    training_summary: dict | None = None,
    benchmark: dict | str | os.PathLike | None = None,
    hardware: str | None = None,
    model_name: str | None = None,
    license: str | None = None,
    datasets: list[str] | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    description: str | None = None,
    attach: bool = False,
):
    """A `huggingface_hub.ModelCard` for the converted `model`, from model_cards/fp8_model_card.md.

    report: the FP8Report of convert_model (default: the one recorded on the model at conversion).
    training_summary: e.g. {"final_loss": 2.31, "steps": 300, "kurtosis": {"qkv": [..]}} (every
        entry is listed; "kurtosis" lists or dicts of lists are shown as trends).
    benchmark: a dict (or JSON path) in the format of benchmarks/results/train_throughput.json (for a
      file with several shapes, the 1.5B one is shown).
    attach: also keep the card on the model, so save_pretrained writes it as README.md and
        push_to_hub uploads it.
    Front matter: library_name transformers, tags fp8/hf_fp8/torchao (+ `tags`), base_model, ...
    """
    from huggingface_hub import ModelCard, ModelCardData

    model = without_compile_wrapper(model)
    report = report if report is not None else model.__dict__.get(_REPORT)
    recipe = getattr(report, "recipe", None) or _recipe_of(model) or FP8Recipe()
    config = getattr(model, "config", None)
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    n_params = sum(p.numel() for p in model.parameters())
    states = delayed_scale_states(model)
    linear = [n for n, s in states if not any(r == "query" for r in s.roles)]
    attn_modules = [n for n, s in states if any(r == "query" for r in s.roles)]
    stability = getattr(config, "hf_fp8_attention_stability", None)
    if recipe.attention and attn_modules:
        attention_mode = f"FP8 attention (QK^T and P.V in FP8, `attn_implementation=\"hf_fp8\"`) in {len(attn_modules)} modules"
    elif recipe.attention:
        why = (getattr(report, "skipped", None) or {}).get("attention", "not available for this model")
        attention_mode = f"high precision (FP8 attention requested, but: {why})"
    else:
        attention_mode = "high precision (recipe.attention is False)"
    bench_rows, bench_where = _benchmark_rows(benchmark)
    all_tags = list(TAGS) + [t for t in (tags or []) if t not in TAGS]
    card_data = ModelCardData(
        library_name="transformers",
        tags=all_tags,
        base_model=base_model,
        license=license,
        datasets=datasets,
        language=language,
        pipeline_tag="text-generation" if arch.endswith("ForCausalLM") else None,
    )
    skipped = report.skipped_by_pattern() if report is not None else {}
    text = template_path().read_text()
    card = ModelCard.from_template(
        card_data,
        template_str=text,
        model_name=model_name or (base_model.split("/")[-1] + "-fp8" if base_model else f"{arch} (FP8)"),
        description=description,
        base_model=base_model,
        architecture=arch,
        model_type=getattr(config, "model_type", None) or "n/a",
        num_parameters=f"{n_params:,}",
        forward_dtype=str(recipe.forward_dtype).removeprefix("torch."),
        backward_dtype=str(recipe.backward_dtype).removeprefix("torch."),
        recipe=recipe,
        recipe_json=json.dumps(recipe.to_dict()),
        fp8_linear_count=len(linear),
        high_precision=skipped,
        flop_fraction=_fmt_pct(getattr(report, "fp8_flop_fraction", None)),
        context=getattr(report, "context", None),
        coverage_table=str(report) if report is not None else None,
        attention_mode=attention_mode,
        stability=stability,
        benchmark_rows=bench_rows,
        benchmark_where=bench_where,
        training_summary=_summary_lines(training_summary),
        hardware=hardware,
        hf_fp8_version=_version(),
    )
    if attach:
        attach_card(model, card)
    return card


def _version() -> str:
    from . import __version__

    return __version__


def attach_card(model: nn.Module, card) -> None:
    """Keep `card` on `model`: save_pretrained writes it as README.md, push_to_hub uploads it."""
    model.__dict__[_CARD] = card


# ---------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    extra: dict[str, bytes] | None = None,
    api=None,
) -> Any:
    """Upload every file under `folder` to the model repo `repo_id` in one commit (create_repo with
    exist_ok, then create_commit of CommitOperationAdd's). `extra`: path in repo -> bytes, added
    to the commit (replacing a file of that name in `folder`). dry_run: contact nothing, return
    the sorted list of paths in the repo that would be uploaded."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"upload: {folder} is not a directory")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)
    extra = dict(extra or {})
    pairs = [(p.relative_to(folder).as_posix(), str(p)) for p in files]
    pairs = [(rel, p) for rel, p in pairs if rel not in extra] + list(extra.items())
    pairs.sort(key=lambda x: x[0])
    if dry_run:
        return [rel for rel, _ in pairs]
    api = api or HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=src) for rel, src in pairs]
    return api.create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message or "Upload FP8-trained model (hf_fp8)",
        commit_description=commit_description,
        token=token,
        create_pr=create_pr,
        revision=revision,
    )


def push(
    model: nn.Module,
    repo_id: str,
    *,
    card=None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    revision: str | None = None,
    max_shard_size: int | str | None = "50GB",
    dry_run: bool = False,
    **card_kwargs,
):
    """Upload weights (stock-loadable), config, fp8_state.safetensors, fp8_recipe.json and a
    model card (`card`, else the attached one, else `model_card(model, **card_kwargs)`) to
    `repo_id` in one commit. What `model.push_to_hub` does on a converted model."""
    card = card or model.__dict__.get(_CARD) or model_card(model, **card_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        model.save_pretrained(tmp, **kwargs)
        if not (Path(tmp) / FP8_STATE_NAME).is_file():
            save_fp8_state(model, tmp)  # a model whose save_pretrained is not wrapped
        card.save(os.path.join(tmp, CARD_NAME))
        return upload_folder(
            tmp, repo_id, private=private, token=token, commit_message=commit_message,
            commit_description=commit_description, create_pr=create_pr, revision=revision, dry_run=dry_run,
        )
