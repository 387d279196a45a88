"""Run config: Literal choices match the registries, the one validation pass, config files, merging, derived model."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import get_args

import pytest

from models.config import PRESETS
from training.config import (
    PRESET_DEFAULTS,
    ConfigError,
    Precision,
    PresetName,
    RecipeName,
    RunConfig,
    choices,
    model_config,
    read_config_file,
    resolve_options,
    schedules,
    validate,
)
from training.loop import AUTOCAST_DTYPES
from training.recipe import RECIPES


def test_choice_types_name_exactly_the_registries() -> None:
    assert sorted(get_args(PresetName)) == sorted(PRESETS) == sorted(PRESET_DEFAULTS)
    assert sorted(get_args(RecipeName)) == sorted(RECIPES)
    assert sorted(get_args(Precision)) == sorted(AUTOCAST_DTYPES)
    assert choices("distance") == ["pseudo_huber", "l2"] and choices("class_cond") == ["auto", "yes", "no"]
    assert choices("lr") is None


def test_defaults_are_the_digits_preset_and_valid() -> None:
    cfg = RunConfig(out="run")
    assert {k: getattr(cfg, k) for k in PRESET_DEFAULTS["digits"]} == PRESET_DEFAULTS["digits"]
    validate(cfg)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 0.0}, "--lr 0.0 must be > 0"),
        ({"lr": float("nan")}, "--lr nan must be > 0"),
        ({"batch": 0}, "--batch 0 must be >= 1"),
        ({"ema_decay": 1.0}, "--ema-decay 1.0 must be in [0, 1)"),
        ({"sample_every": -1}, "--sample-every -1 must be >= 0 (0 = never)"),
        ({"stop_after": 0}, "--stop-after 0 must be >= 1"),
        ({"model_channels": 2}, "--model-channels 2 must be >= 4"),
        ({"mid_sigma": 80.0}, "--mid-sigma 80.0 must be strictly between sigma_min and sigma_max"),
        ({"precision": "fp8"}, "--precision 'fp8' is not one of ['fp32', 'bf16', 'fp16']"),
        ({"preset": "mnist"}, "--preset 'mnist' is not one of ['digits', 'cifar10', 'imagenet64']"),
        ({"distance": "lpips"}, "--distance 'lpips' is not one of ['pseudo_huber', 'l2']"),
        ({"steps": "abc"}, "--steps 'abc' must be of type int"),
        ({"steps": True}, "--steps True must be of type int"),
        ({"lr": "0.1"}, "--lr '0.1' must be of type float"),
        ({"compile": 1}, "--compile 1 must be of type bool"),
        ({"dropout": 1.5}, "recipe dropout 1.5 is not in [0, 1) (see --recipe and the technique flags)"),
        ({"s0": 5, "s1": 4}, "recipe needs 1 <= s0 <= s1, got s0=5, s1=4"),
        ({"recipe": "ect", "init": "x", "ect_stage_steps": 0}, "--ect-stage-steps 0 must be >= 1"),
        ({"ect_stage_steps": 5}, "--ect-stage-steps is only used with --recipe ect, not --recipe ict"),
    ],
)
def test_validation_names_the_flag_the_value_and_what_is_allowed(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(RunConfig(out="run", **change))
    assert message in str(info.value)


def test_validation_accepts_ints_for_floats_and_none_for_optional_choices() -> None:
    validate(RunConfig(out="run", lr=1, ema_decay=0, distance=None, stop_after=None))


def test_type_errors_of_file_values_name_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^--config run\.json: option steps = 'abc' must be of type int$"):
        validate(RunConfig(out="run", steps="abc"), {"steps": "--config run.json"})


def test_config_files_json_and_toml_with_dashes_or_underscores(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text('steps = 2\nema-decay = 0.5\nrecipe = "ct"\n')
    (tmp_path / "b.json").write_text('{"ema_decay": 0.5, "stop-after": 3}')
    assert read_config_file(str(tmp_path / "a.toml")) == {"steps": 2, "ema_decay": 0.5, "recipe": "ct"}
    assert read_config_file(str(tmp_path / "b.json")) == {"ema_decay": 0.5, "stop_after": 3}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.json", '{"learning_rate": 0.1}', "unknown options ['learning_rate']; allowed: ["),
        ("bad.json", "[1, 2]", "must hold a table/object of options"),
        ("bad.json", "{not json", "not valid JSON"),
        ("bad.toml", "steps = ", "not valid TOML"),
        ("missing.json", None, "cannot read"),
    ],
)
def test_bad_config_files_name_the_file(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=r"^--config .*" + name) as info:
        read_config_file(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_flags_win_over_the_file_which_wins_over_preset_defaults(tmp_path: Path) -> None:
    (tmp_path / "run.toml").write_text('preset = "cifar10"\nlr = 0.5\nsteps = 7\n')
    cfg, explicit = resolve_options({"out": "run", "lr": 0.25}, str(tmp_path / "run.toml"))
    assert (cfg.preset, cfg.lr, cfg.steps) == ("cifar10", 0.25, 7)
    assert cfg.batch == PRESET_DEFAULTS["cifar10"]["batch"]  # not given: the preset's default
    assert explicit == {"out", "preset", "lr", "steps"}


def test_merged_options_are_validated_and_out_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--out RUN_FOLDER is required$"):
        resolve_options({"steps": 3})
    (tmp_path / "run.json").write_text('{"preset": ["x"]}')  # unhashable: no preset defaults to look up
    with pytest.raises(ConfigError, match=re.escape("--preset ['x'] is not one of ['digits', 'cifar10'")):
        resolve_options({"out": "run"}, str(tmp_path / "run.json"))


def test_model_config_applies_overrides_and_class_conditioning() -> None:
    cfg = RunConfig(out="run", model_channels=8, recipe="ct")
    mcfg = model_config(cfg, cfg.recipe_obj(), num_data_classes=10)
    assert (mcfg.model_channels, mcfg.fourier_scale, mcfg.dropout, mcfg.num_classes) == (8, 16.0, 0.0, 10)
    unconditional = dataclasses.replace(cfg, class_cond="no")
    assert model_config(unconditional, cfg.recipe_obj(), 10).num_classes == 0
    with pytest.raises(ConfigError, match=r"^--class-cond yes needs labelled data; --data digits has no labels$"):
        model_config(dataclasses.replace(cfg, class_cond="yes"), cfg.recipe_obj(), 0)


def test_schedules_are_one_and_two_steps_from_sigma_max() -> None:
    cfg = RunConfig(out="run", mid_sigma=1.5)
    mcfg = model_config(cfg, cfg.recipe_obj(), 10)
    assert schedules(cfg, mcfg) == {1: [mcfg.sigma_max], 2: [mcfg.sigma_max, 1.5]}
