"""EDM's augmentation pipeline: p = 0 is the identity, each op does what its label says, the labels are zero for
ops not applied, and everything follows from the generator; plus --augment in the run config and a short run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training.augment import AUGMENT_DIM, OPS, AugmentPipe, resample_reflect, rotate2d, scale2d
from training.config import ConfigError, RunConfig, model_config, validate
from training.data import load_digits_train, subset
from training.run import train
from training.state import CheckpointDir, load_state

NO_OPS = {"xflip": 0.0, "yflip": 0.0, "translate": 0.0, "scale": 0.0, "rotate": 0.0, "aniso": 0.0}
TINY = {"model_channels": 8, "batch": 16, "sample_every": 0, "log_every": 2, "device": "cpu"}


def images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def run_pipe(pipe: AugmentPipe, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return pipe(x, torch.Generator().manual_seed(seed))


def only(op: str, p: float = 1.0) -> AugmentPipe:
    return AugmentPipe(p, **(NO_OPS | {op: 1.0}))


def test_p_zero_returns_the_batch_unchanged_with_zero_labels() -> None:
    x = images()
    out, labels = run_pipe(AugmentPipe(0.0), x)
    assert out is x and torch.equal(out, images())
    assert labels.shape == (64, AUGMENT_DIM) and not labels.any()


@pytest.mark.parametrize(("op", "dim", "column"), [("xflip", -1, 0), ("yflip", -2, 1)])
def test_a_flip_flips_and_its_label_says_so(op: str, dim: int, column: int) -> None:
    x = images()
    out, labels = run_pipe(only(op), x)
    flipped = labels[:, column] == 1
    assert 10 < int(flipped.sum()) < 54  # a fair coin at p = 1
    assert torch.equal(out[flipped], torch.flip(x, [dim])[flipped])
    assert torch.equal(out[~flipped], x[~flipped])
    others = torch.ones(AUGMENT_DIM, dtype=torch.bool)
    others[column] = False
    assert not labels[:, others].any()


def test_x_flips_happen_for_half_the_images_whenever_p_is_positive() -> None:
    """EDM's xflip multiplier 1e8: the x-flip coin is always tossed once p > 0."""
    _, labels = run_pipe(AugmentPipe(0.01), images(2000))
    assert abs(float(labels[:, 0].mean()) - 0.5) < 0.05


def test_translation_moves_whole_pixels_reflecting_at_the_border() -> None:
    x = images()
    out, labels = run_pipe(only("translate"), x)
    tx, ty = (labels[:, 7:] * 0.125 * 8).round().long().unbind(1)  # labels in units of 0.125 · size
    assert torch.equal(labels[:, 7:] * 0.125 * 8, torch.stack([tx, ty], 1).float())  # whole pixels
    assert bool((tx != 0).any()) and not labels[:, :7].any()
    for i in range(len(x)):
        a, b = abs(int(tx[i])), abs(int(ty[i]))
        assert a < 8 and b < 8  # 7 sigma for this seed; the reference below reflects once
        padded = F.pad(x[i : i + 1], (a, a, b, b), mode="reflect")
        expected = padded[..., b - int(ty[i]) : b - int(ty[i]) + 8, a - int(tx[i]) : a - int(tx[i]) + 8]
        assert torch.equal(out[i : i + 1], expected), i


@pytest.mark.parametrize(("op", "columns"), [("scale", [2]), ("rotate", [3, 4]), ("aniso", [5, 6])])
def test_each_resampling_op_labels_only_itself_and_leaves_the_others_exact(op: str, columns: list[int]) -> None:
    x = images()
    out, labels = run_pipe(only(op, p=0.5), x)
    applied = labels[:, columns].ne(0).any(1)
    assert 10 < int(applied.sum()) < 54
    assert torch.equal(out[~applied], x[~applied])  # bit for bit where the op was not drawn
    assert not (out[applied] - x[applied]).abs().amax(dim=(1, 2, 3)).lt(1e-6).any()
    others = [c for c in range(AUGMENT_DIM) if c not in columns]
    assert not labels[:, others].any()
    if op == "rotate":  # (cos θ − 1, sin θ) lies on the unit circle shifted by one
        torch.testing.assert_close((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(64))


def test_labels_are_zero_for_ops_not_applied_and_such_images_are_untouched() -> None:
    x = images(256)
    out, labels = run_pipe(AugmentPipe(0.2), x)
    untouched = ~labels.ne(0).any(1)
    assert 0 < int(untouched.sum()) < 256
    assert torch.equal(out[untouched], x[untouched])
    # Every op shows up in its own columns somewhere in the batch.
    for columns in ([0], [1], [2], [3, 4], [5, 6], [7, 8]):
        assert labels[:, columns].ne(0).any()


def test_the_generator_determines_everything() -> None:
    x = images()
    pipe = AugmentPipe(0.5)
    a, b, c = run_pipe(pipe, x, seed=5), run_pipe(pipe, x, seed=5), run_pipe(pipe, x, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_resampling_is_exact_for_the_identity_and_a_quarter_turn() -> None:
    x = images(4)
    eye = torch.eye(2).expand(4, 2, 2)
    torch.testing.assert_close(resample_reflect(x, eye), x, rtol=0, atol=1e-6)
    quarter = rotate2d(torch.full((4,), math.pi / 2))
    torch.testing.assert_close(resample_reflect(x, quarter), torch.rot90(x, 1, (2, 3)), rtol=0, atol=1e-5)
    half_size = scale2d(torch.full((4,), 0.5), torch.full((4,), 0.5))  # out(p) = in(p/2): a 2x zoom
    zoomed = resample_reflect(x, half_size)
    torch.testing.assert_close(zoomed[..., 3:5, 3:5].mean((2, 3)), x[..., 3:5, 3:5].mean((2, 3)), rtol=0, atol=1e-5)


def test_the_pipe_refuses_a_probability_outside_zero_one() -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        AugmentPipe(1.5)


def test_a_pipe_of_some_ops_applies_only_those_and_of_all_is_edms() -> None:
    assert AugmentPipe.of(0.12) == AugmentPipe.of(0.12, OPS) == AugmentPipe(0.12)
    pipe = AugmentPipe.of(1.0, ("translate", "scale", "aniso"))
    assert pipe == AugmentPipe(1.0, **(NO_OPS | {"translate": 1.0, "scale": 1.0, "aniso": 1.0}))
    _, labels = run_pipe(pipe, images(500))
    assert not labels[:, [0, 1, 3, 4]].any()  # no flip, no rotation
    assert labels[:, 2].any() and labels[:, 5:7].any() and labels[:, 7:9].any()
    with pytest.raises(ValueError, match="unknown augmentation ops \\['mirror'\\]"):
        AugmentPipe.of(0.1, ("mirror",))


# --- the run config and the loop -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"augment": -0.1}, "--augment -0.1 must be in [0, 1] (0 = off)"),
        ({"augment": 1.5}, "--augment 1.5 must be in [0, 1] (0 = off)"),
        ({"augment": float("nan")}, "--augment nan must be in [0, 1] (0 = off)"),
        ({"augment": "yes"}, "--augment 'yes' must be of type float"),
        ({"data_fraction": 0.0}, "--data-fraction 0.0 must be in (0, 1]"),
        ({"data_fraction": 1.5}, "--data-fraction 1.5 must be in (0, 1]"),
        ({"augment_ops": "translate"}, "--augment-ops needs --augment P > 0 (the probability of each op)"),
        ({"augment": 0.1, "augment_ops": "translate,mirror"},
         "--augment-ops 'translate,mirror': each op once, from xflip, yflip, translate, scale, rotate, aniso"),
        ({"augment": 0.1, "augment_ops": "scale,scale"},
         "--augment-ops 'scale,scale': each op once, from xflip, yflip, translate, scale, rotate, aniso"),
        ({"augment": 0.1, "augment_ops": 3}, "--augment-ops 3 must be of type str | None"),
    ],
)
def test_augment_and_data_fraction_are_validated(change: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(RunConfig(out="run", **change))
    assert str(info.value) == message


def test_augment_gives_the_model_nine_augmentation_inputs() -> None:
    validate(RunConfig(out="run", augment=1))
    rec = RunConfig(out="run").recipe_obj()
    assert model_config(RunConfig(out="run"), rec, 10).augment_dim == 0
    assert model_config(RunConfig(out="run", augment=0.12), rec, 10).augment_dim == AUGMENT_DIM


def test_a_data_fraction_is_a_fixed_stratified_subset() -> None:
    digits = load_digits_train()
    tenth = subset(digits, 0.1)
    assert subset(digits, 1.0) is digits
    assert abs(len(tenth) - 0.1 * len(digits)) <= 10
    assert sorted(tenth.labels.unique().tolist()) == list(range(10))
    assert torch.equal(subset(digits, 0.1).images, tenth.images)  # the same images every time
    rows = {tuple(r.flatten().tolist()) for r in digits.images}
    assert all(tuple(r.flatten().tolist()) in rows for r in tenth.images)


def final_state(out: Path) -> dict:
    return load_state(CheckpointDir(out / "checkpoints").latest().state)


def test_a_short_augmented_run_trains_and_resumes_exactly(tmp_path: Path) -> None:
    common = {"steps": 4, "save_every": 2, "augment": 0.5, "data_fraction": 0.1, **TINY}
    train(RunConfig(out=str(tmp_path / "straight"), **common))
    train(RunConfig(out=str(tmp_path / "halves"), stop_after=2, **common))
    train(RunConfig(out=str(tmp_path / "halves"), **common), resume="latest", explicit=set(common))
    straight, halves = final_state(tmp_path / "straight"), final_state(tmp_path / "halves")
    assert straight["step"] == halves["step"] == 4
    assert "backbone.augment_emb.weight" in straight["student"]
    assert straight["student"]["backbone.augment_emb.weight"].abs().sum() > 0  # the labels were used
    for key in ("student", "ema"):
        for name, value in straight[key].items():
            assert torch.equal(value, halves[key][name]), f"{key}.{name}"


def test_ops_left_out_never_reach_the_model(tmp_path: Path) -> None:
    """The augmentation input is zero-initialised: only the labels of ops that applied move its weights."""
    cfg = RunConfig(out=str(tmp_path / "run"), steps=4, save_every=4, augment=1.0, augment_ops="translate",
                    data_fraction=0.1, **TINY)
    train(cfg)
    weight = final_state(tmp_path / "run")["student"]["backbone.augment_emb.weight"]  # (channels, 9)
    assert not weight[:, :7].any()  # flips, scale, rotation, anisotropy: never applied
    assert weight[:, 7:].abs().sum() > 0  # translation
