"""ECT (training/ect.py, training.hybrid.ECTTrainer): the formulas by hand, one step replayed, the flags, resume."""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.consistency import ConsistencyModel
from models.denoiser import Denoiser
from tests.conftest import randomize
from training import ect
from training.config import ConfigError
from training.data import Dataset, load_digits_train
from training.hybrid import load_pretrained, pretrained_file
from training.recipe import RECIPES
from training.train import resolve

from .hybrid_helpers import assert_resume_is_exact, edm_by_hand, make_trainer, save_denoiser, small_cfg


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits_train()


@pytest.fixture(scope="module")
def denoiser_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_denoiser(tmp_path_factory.mktemp("pretrained"))


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


@pytest.mark.parametrize(("k", "stage"), [(0, 0), (12, 0), (13, 1), (50, 4), (99, 7)])
def test_stage_advances_evenly_over_the_run(k: int, stage: int) -> None:
    """⌊k·S/K⌋ with S = 8 stages over K = 100 steps: 12·8 = 96 → 0, 13·8 = 104 → 1."""
    assert ect.stage(k, 100, 8) == stage


@pytest.mark.parametrize(("k", "stage"), [(0, 0), (374, 0), (375, 1), (1124, 2), (1125, 3), (4000, 3)])
def test_stage_advances_every_d_steps_and_keeps_the_last(k: int, stage: int) -> None:
    """--ect-stage-steps 375 with S = 4: ⌊k/375⌋, capped at 3, whatever the run's K."""
    assert ect.stage(k, 4295, 4, every=375) == stage


def test_n_of_t_is_one_plus_eight_sigmoid_minus_t() -> None:
    got = ect.n_of_t(torch.tensor([0.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([5.0, 1 + 8 * sigmoid(-2.0)], dtype=torch.float64))


@pytest.mark.parametrize(
    ("t", "stage", "r"),
    [
        (2.0, 0, 2.0 * (1 - (1 + 8 * sigmoid(-2.0)) / 2)),  # 2·(1 − 1.9536/2) = 0.0464
        (2.0, 3, 2.0 * (1 - (1 + 8 * sigmoid(-2.0)) / 16)),  # 2·(1 − 1.9536/16) = 1.7558
        (0.1, 0, 0.0),  # n(0.1) = 4.8 > 2: the ratio is negative, clamped to r = 0
        (80.0, 7, 80.0 * (1 - (1 + 8 * sigmoid(-80.0)) / 256)),
    ],
)
def test_r_of_t_is_the_mapping_function(t: float, stage: int, r: float) -> None:
    got = ect.r_of_t(torch.tensor([t], dtype=torch.float64), stage, 2.0)
    assert got.item() == pytest.approx(r, rel=1e-12, abs=1e-15)


def test_r_is_below_t_and_the_gap_shrinks_stage_by_stage() -> None:
    t = torch.logspace(-3, 2, 50, dtype=torch.float64)
    gaps = [t - ect.r_of_t(t, s) for s in range(8)]
    assert all((g > 0).all() for g in gaps)
    assert all((later <= earlier).all() for earlier, later in itertools.pairwise(gaps))


def test_weights_and_target() -> None:
    torch.testing.assert_close(ect.loss_weights(torch.tensor([2.0]), torch.tensor([1.5])), torch.tensor([2.0]))
    # EDM's λ(t) = (t² + σ_d²)/(t·σ_d)²: t = 2 → 4.25/1; t = 0.5 → 0.5/0.0625 = 8 (σ_d = 0.5)
    torch.testing.assert_close(ect.edm_weights(torch.tensor([2.0, 0.5]), 0.5), torch.tensor([4.25, 8.0]))
    t, r = torch.tensor([2.0]), torch.tensor([1.5])
    assert ect.weights("gap", t, r, 0.5).item() == 2.0 and ect.weights("edm", t, r, 0.5).item() == 4.25
    f_r, y = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    target = ect.target(f_r, y, torch.tensor([0.0, 0.3]))
    assert torch.equal(target[0], y[0]) and torch.equal(target[1], f_r[1])  # y where r = 0


def test_the_student_starts_as_the_denoiser_and_trains_with_edm_scalings(digits: Dataset, denoiser_file: Path) -> None:
    trainer = make_trainer("ect", RECIPES["ect"], digits, small_cfg(), denoiser_file)
    denoiser = checkpoint.load(denoiser_file).model
    assert isinstance(trainer.student, ConsistencyModel) and isinstance(trainer.forward, Denoiser)
    assert trainer.forward.backbone is trainer.student.backbone  # ECT trains f under EDM's unshifted scalings
    for name, value in denoiser.state_dict().items():
        assert torch.equal(trainer.student.state_dict()[name], value)
        assert torch.equal(trainer.ema.state_dict()[name], value)


@pytest.mark.parametrize(  # stage 0 (many r = 0) and stage 4; ECT §3's weight and EDM's λ(t); CM's EMA target θ⁻
    ("k", "dropout", "weighting", "teacher"),
    [
        (0, 0.0, "gap", "student"),
        (0, 0.3, "gap", "student"),
        (40, 0.3, "gap", "student"),
        (40, 0.3, "edm", "student"),
        (0, 0.3, "gap", "ema"),
        (40, 0.3, "gap", "ema"),
    ],
)
def test_ect_step_loss_and_gradients_match_the_ect_objective(
    digits: Dataset, denoiser_file: Path, k: int, dropout: float, weighting: str, teacher: str
) -> None:
    recipe = RECIPES["ect"].replace(ect_weighting=weighting, teacher=teacher)
    trainer = make_trainer("ect", recipe, digits, small_cfg(dropout), denoiser_file)
    if teacher == "ema":  # make θ⁻ differ from θ, so that the replay can tell which one gave the target
        randomize(trainer.teacher, seed=3)
    trainer.step_index = k
    stage = k * 8 // 80
    model = copy.deepcopy(trainer.student)
    target_model = copy.deepcopy(trainer.teacher) if teacher == "ema" else model
    y, labels = trainer.batch(k)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    # Written out from the paper: t ~ lognormal(−1.1, 2), r = max(0, t(1 − n(t)/2^(stage+1))), shared ε.
    t = torch.exp(torch.randn(8) * 2.0 - 1.1)
    r = torch.clamp(t * (1 - (1 + 8 * torch.sigmoid(-t)) / 2 ** (stage + 1)), min=0)
    if k == 0:
        assert (r == 0).any() and (r > 0).any()  # both branches of the target
    eps = torch.randn_like(y)
    before = torch.get_rng_state()
    f_t = edm_by_hand(model.backbone, y + t[:, None, None, None] * eps, t, labels)
    torch.set_rng_state(before)  # the target replays the student's dropout masks
    x_r = y + r[:, None, None, None] * eps
    f_r = edm_by_hand(target_model.backbone, x_r, torch.where(r > 0, r, t), labels).detach()
    target = torch.where((r > 0)[:, None, None, None], f_r, y)
    c = 0.00054 * 8
    distance = (((f_t - target) ** 2).sum(dim=(1, 2, 3)) + c * c).sqrt() - c
    sd = trainer.cfg.sigma_data
    weight = 1 / (t - r) if weighting == "gap" else (t * t + sd * sd) / (t * sd) ** 2
    expected = (distance * weight).mean()
    grads = torch.autograd.grad(expected, list(model.parameters()))
    target_before = [p.clone() for p in trainer.teacher.parameters()] if teacher == "ema" else []
    torch.set_rng_state(state)
    result = trainer.step()
    assert (result.stage, result.teacher_decay) == (stage, 0.95 if teacher == "ema" else 0.0)
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-5, atol=0)
    for p, g in zip(trainer.student.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    if teacher == "ema":  # θ⁻ ← μθ⁻ + (1 − μ)θ with CD's fixed μ = 0.95
        after = zip(target_before, trainer.teacher.parameters(), trainer.student.parameters(), strict=True)
        for before_p, after_p, student_p in after:
            torch.testing.assert_close(after_p, 0.95 * before_p + 0.05 * student_p)


def test_init_only_with_ect_which_needs_an_existing_denoiser(tmp_path: Path, denoiser_file: Path) -> None:
    out = ["--out", str(tmp_path / "run")]
    cases = [
        (["--init", str(denoiser_file)], r"^--init is only used with --recipe ect, not --recipe ict$"),
        (["--recipe", "ect"], r"^--recipe ect needs --init RUN_OR_FILE"),
        (["--recipe", "ect", "--init", str(tmp_path / "nope")], rf"^--init {tmp_path / 'nope'}: no such file"),
        (
            ["--recipe", "ect", "--init", str(denoiser_file), "--model-channels", "8"],
            r"^--model-channels: --recipe ect keeps the architecture of --init",
        ),
        (["--recipe", "ect", "--init", str(denoiser_file), "--cd-levels", "40"], r"^--cd-levels is only used"),
        (["--ect-weighting", "edm"], r"^--ect-weighting is only used with --recipe ect, not --recipe ict$"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            resolve([*out, *argv])
    cfg, _, _ = resolve([*out, "--recipe", "ect", "--init", str(denoiser_file), "--ect-stages", "4"])
    assert cfg.recipe_obj().ect_stages == 4 and cfg.recipe_obj().objective == "ect"
    cfg, _, _ = resolve([*out, "--recipe", "ect", "--init", str(denoiser_file), "--ect-stage-steps", "375"])
    assert cfg.recipe_obj().ect_stage_steps == 375 and cfg.recipe_obj().ect_weighting == "gap"
    cfg, _, _ = resolve([*out, "--recipe", "ect", "--init", str(denoiser_file), "--ect-weighting", "edm"])
    assert cfg.recipe_obj().ect_weighting == "edm" and cfg.recipe_obj().teacher == "student"
    cfg, _, _ = resolve([*out, "--recipe", "ect", "--init", str(denoiser_file), "--teacher", "ema", "--mu0", "0.99"])
    assert (cfg.recipe_obj().teacher, cfg.recipe_obj().mu0) == ("ema", 0.99)


def test_init_names_a_denoiser_file_or_a_run_folder(tmp_path: Path, denoiser_file: Path) -> None:
    assert pretrained_file(str(denoiser_file), "init") == denoiser_file
    with pytest.raises(ConfigError, match=r"^--init .*: a folder without checkpoints"):
        pretrained_file(str(tmp_path), "init")
    consistency = checkpoint.save(tmp_path / "cm.safetensors", ConsistencyModel.from_config(small_cfg()))
    with pytest.raises(ConfigError, match=r"^--init .*cm.safetensors: a consistency model, not a denoiser"):
        load_pretrained(str(consistency), "init")


@pytest.mark.parametrize("teacher", ["student", "ema"])
def test_an_ect_run_resumes_exactly_and_exports_a_consistency_model(
    tmp_path: Path, denoiser_file: Path, teacher: str
) -> None:
    assert_resume_is_exact(tmp_path, "--recipe", "ect", "--init", str(denoiser_file), "--teacher", teacher)
    exported = checkpoint.load(tmp_path / "straight" / "checkpoints" / "step-00000008.safetensors")
    assert isinstance(exported.model, ConsistencyModel) and exported.meta.config.kind == "consistency"
    assert exported.meta.schedules[1] == [80.0]
