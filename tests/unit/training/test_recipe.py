"""Recipes: iCT and CT presets, one switch per technique, the registries they name."""

from __future__ import annotations

import pytest

from training import ct, ict
from training.recipe import (
    DISTANCES,
    RECIPES,
    TECHNIQUE_FLAGS,
    TIMESTEPS,
    WEIGHTINGS,
    Recipe,
    ablation_variants,
    recipe,
)
from training.train import resolve


def test_ict_preset_is_the_papers_recipe() -> None:
    r = RECIPES["ict"]
    choices = (r.distance, r.timesteps, r.curriculum, r.teacher, r.weighting)
    assert choices == ("pseudo_huber", "lognormal", "ict", "student", "ict")
    assert r.fourier_scale == 0.02 and r.dropout is None
    assert r.curriculum_bounds == (10, 1280)
    assert r.discretization_steps(0, 8000) == 11 and r.discretization_steps(7000, 8000) == 1281
    assert r.teacher_decay(1281) == 0.0  # no EMA teacher
    assert r.distance_fn() is ict.pseudo_huber and r.weighting_fn() is ict.loss_weights


def test_ct_preset_is_the_original_recipe() -> None:
    r = RECIPES["ct"]
    assert (r.distance, r.timesteps, r.curriculum, r.teacher, r.weighting) == ("l2", "uniform", "ct", "ema", "uniform")
    assert r.fourier_scale == 16.0 and r.dropout == 0.0
    assert r.curriculum_bounds == (2, 150)
    assert r.discretization_steps(1000, 1000) == 151
    assert r.teacher_decay(2) == pytest.approx(0.9)
    assert r.distance_fn() is ct.squared_l2 and r.weighting_fn() is ct.uniform_weights


def test_registries_cover_every_choice() -> None:
    assert set(DISTANCES) == {"pseudo_huber", "l2"}
    assert set(TIMESTEPS) == {"lognormal", "uniform"}
    assert set(WEIGHTINGS) == {"ict", "uniform"}


def test_unknown_choices_are_errors_naming_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"distance 'lpips' is not one of \['pseudo_huber', 'l2'\]"):
        Recipe(distance="lpips")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown recipe 'lcm'"):
        recipe("lcm")
    with pytest.raises(ValueError, match="unknown recipe keys"):
        Recipe.from_dict({"distance": "l2", "lpips_net": "vgg"})
    with pytest.raises(ValueError, match="s0 <= s1"):
        Recipe(s0=100, s1=10)


@pytest.mark.parametrize(
    ("flag", "value", "field", "expected"),
    [
        ("--distance", "l2", "distance", "l2"),
        ("--timesteps", "uniform", "timesteps", "uniform"),
        ("--curriculum", "ct", "curriculum", "ct"),
        ("--teacher", "ema", "teacher", "ema"),
        ("--weighting", "uniform", "weighting", "uniform"),
        ("--fourier-scale", "16", "fourier_scale", 16.0),
        ("--dropout", "0.2", "dropout", 0.2),
    ],
)
def test_each_cli_switch_changes_one_technique(flag: str, value: str, field: str, expected: object) -> None:
    assert TECHNIQUE_FLAGS[flag] == field
    cfg, _, _ = resolve(["--out", "unused", flag, value])
    got = cfg.recipe_obj()
    assert getattr(got, field) == expected
    others = {k: v for k, v in got.to_dict().items() if k != field}
    assert others == {k: v for k, v in RECIPES["ict"].to_dict().items() if k != field}


def test_ablation_variants_switch_one_technique_each() -> None:
    variants = ablation_variants()
    assert variants["ict"] == RECIPES["ict"] and variants["ct"] == RECIPES["ct"]
    singles = {k: v for k, v in variants.items() if k.startswith("ict/")}
    assert len(singles) == 7
    for v in singles.values():
        diff = [k for k, x in v.to_dict().items() if x != RECIPES["ict"].to_dict()[k]]
        assert len(diff) == 1


def test_huber_c_defaults_to_icts_formula_and_can_be_set() -> None:
    assert RECIPES["ict"].huber_c is None
    assert RECIPES["ict"].pseudo_huber_c(64) == ict.pseudo_huber_c(64)  # 0.00054·√64
    assert recipe("ict", huber_c=0.01).pseudo_huber_c(64) == 0.01
    cfg, _, _ = resolve(["--out", "unused", "--huber-c", "0.02"])
    assert cfg.huber_c == 0.02 and cfg.recipe_obj().pseudo_huber_c(3072) == 0.02
    with pytest.raises(ValueError, match=r"huber_c 0\.0 must be > 0"):
        Recipe(huber_c=0.0)
