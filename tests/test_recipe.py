"""FP8Recipe validation, file loading and the shipped recipes."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from hf_fp8 import FP8Recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_defaults_are_the_papers_recipe():
    r = FP8Recipe()
    assert (r.fp8_format, r.amax_history_len, r.amax_compute_algo, r.margin) == ("hybrid", 1024, "max", 0)
    assert r.forward_dtype == torch.float8_e4m3fn and r.backward_dtype == torch.float8_e5m2
    assert "lm_head" in r.skip and "*embed*" in r.skip


def test_e4m3_everywhere():
    r = FP8Recipe(fp8_format="e4m3")
    assert r.forward_dtype == r.backward_dtype == torch.float8_e4m3fn


def test_frozen():
    with pytest.raises(Exception):
        FP8Recipe().margin = 2


@pytest.mark.parametrize(
    "fields, error, message",
    [
        ({"fp8_format": "e5m2"}, ValueError, "fp8_format must be one of 'hybrid', 'e4m3'"),
        ({"amax_compute_algo": "mean"}, ValueError, "amax_compute_algo must be one of 'max', 'most_recent'"),
        ({"amax_history_len": 0}, ValueError, "amax_history_len must be >= 1"),
        ({"amax_history_len": "1024"}, TypeError, "amax_history_len must be int, got str"),
        ({"margin": -1}, ValueError, "margin must be >= 0"),
        ({"margin": True}, TypeError, "margin must be int, got bool"),
        ({"margin": 1.5}, TypeError, "margin must be int, got float"),
        ({"attention": "yes"}, TypeError, "attention must be bool, got str"),
        ({"skip": "lm_head"}, TypeError, "skip must be tuple"),
        ({"skip": ["lm_head", 3]}, TypeError, "skip must hold non-empty strings"),
        ({"on_nonfinite_amax": "ignore"}, ValueError, "on_nonfinite_amax must be one of 'warn', 'raise', 'skip'"),
        ({"share_input_scales": "yes"}, TypeError, "share_input_scales must be bool, got str"),
        ({"cast_weights_once": 1}, TypeError, "cast_weights_once must be bool, got int"),
    ],
)
def test_bad_fields_name_the_field_and_allowed_values(fields, error, message):
    with pytest.raises(error, match=message):
        FP8Recipe(**fields)


def test_unknown_field_in_file_is_named_with_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("amax_histroy_len: 16\n")
    with pytest.raises(ValueError, match=r"unknown FP8Recipe field 'amax_histroy_len'. Did you mean 'amax_history_len'\?"):
        FP8Recipe.from_file(path)


def test_ill_typed_field_in_file_names_the_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"margin": "0"}))
    with pytest.raises(TypeError, match=r"r.json: FP8Recipe.margin must be int, got str"):
        FP8Recipe.from_file(path)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        FP8Recipe.from_file(tmp_path / "missing.yaml")
    (tmp_path / "r.toml").write_text("")
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        FP8Recipe.from_file(tmp_path / "r.toml")
    (tmp_path / "list.yaml").write_text("- margin\n")
    with pytest.raises(TypeError, match="must be a mapping"):
        FP8Recipe.from_file(tmp_path / "list.yaml")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    recipe = FP8Recipe(fp8_format="e4m3", amax_history_len=16, amax_compute_algo="most_recent", margin=2, skip=("lm_head", "*.gate"))
    path = tmp_path / f"r{suffix}"
    path.write_text(yaml.safe_dump(recipe.to_dict()) if suffix == ".yaml" else json.dumps(recipe.to_dict()))
    assert FP8Recipe.from_file(path) == recipe
    assert recipe.replace(margin=0).margin == 0 and recipe.replace(margin=0).amax_history_len == 16


def test_empty_yaml_gives_defaults(tmp_path):
    (tmp_path / "r.yaml").write_text("# nothing\n")
    assert FP8Recipe.from_file(tmp_path / "r.yaml") == FP8Recipe()


def test_shipped_recipes_load():
    paper = FP8Recipe.from_file(RECIPES / "paper.yaml")
    assert paper == FP8Recipe(attention=True)
    finetune = FP8Recipe.from_file(RECIPES / "finetune.yaml")
    assert finetune.amax_history_len == 16 and finetune.margin == 1
