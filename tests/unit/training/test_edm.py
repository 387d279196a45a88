"""EDM pretraining (training/edm.py, training.hybrid.EDMTrainer): the formulas by hand, one step replayed, resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.denoiser import Denoiser
from training import edm
from training.config import ConfigError
from training.data import Dataset, load_digits_train
from training.recipe import RECIPES
from training.state import CheckpointDir
from training.train import resolve

from .hybrid_helpers import assert_resume_is_exact, edm_by_hand, make_trainer, small_cfg


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits_train()


def test_edm_constants_are_table_1s() -> None:
    assert (edm.P_MEAN, edm.P_STD) == (-1.2, 1.2)
    assert (RECIPES["edm"].objective, RECIPES["edm"].p_mean, RECIPES["edm"].p_std) == ("edm", -1.2, 1.2)


def test_sigmas_are_exp_of_p_mean_plus_p_std_times_a_normal() -> None:
    torch.manual_seed(3)
    sigma = edm.sample_sigmas(5, -1.2, 1.2)
    torch.manual_seed(3)
    torch.testing.assert_close(sigma, torch.exp(-1.2 + 1.2 * torch.randn(5)))
    logs = edm.sample_sigmas(200_000, -1.2, 1.2).log()
    assert abs(logs.mean().item() + 1.2) < 0.01 and abs(logs.std().item() - 1.2) < 0.01


@pytest.mark.parametrize(("sigma", "weight"), [(0.5, 0.5 / 0.0625), (2.0, 4.25 / 1.0), (0.1, 0.26 / 0.0025)])
def test_loss_weight_is_sigma_sq_plus_sigma_data_sq_over_sigma_sigma_data_sq(sigma: float, weight: float) -> None:
    """(σ² + σ_d²)/(σ·σ_d)²: σ = 0.5 → 0.5/0.0625 = 8; σ = 2 → 4.25/1; σ = 0.1 → 0.26/0.0025 = 104."""
    assert edm.loss_weight(torch.tensor(sigma, dtype=torch.float64), 0.5).item() == pytest.approx(weight)


def test_denoising_loss_is_weighted_mean_squared_error_per_image() -> None:
    y = torch.zeros(2, 1, 8, 8)
    denoised = y.clone()
    denoised[0] += 0.1  # every element off by 0.1: mean square 0.01
    denoised[1, 0, 0, 0] = 0.8  # one element of 64 off by 0.8: 0.64/64 = 0.01
    loss = edm.denoising_loss(denoised, y, torch.tensor([0.5, 2.0]), 0.5)
    torch.testing.assert_close(loss, torch.tensor([8 * 0.01, 4.25 * 0.01]))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_edm_step_loss_and_gradients_match_the_edm_objective(digits: Dataset, dropout: float) -> None:
    trainer = make_trainer("edm", RECIPES["edm"], digits, small_cfg(dropout, kind="denoiser"))
    assert isinstance(trainer.student, Denoiser) and trainer.student.cfg.kind == "denoiser"
    model = copy.deepcopy(trainer.student)
    y, labels = trainer.batch(0)
    torch.manual_seed(11)
    state = torch.get_rng_state()
    sigma = torch.exp(torch.randn(8) * 1.2 - 1.2)  # EDM Table 1
    noise = sigma[:, None, None, None] * torch.randn_like(y)
    denoised = edm_by_hand(model.backbone, y + noise, sigma, labels)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = (weight * ((denoised - y) ** 2).mean(dim=(1, 2, 3))).mean()
    grads = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    torch.set_rng_state(state)
    result = trainer.step()
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-5, atol=0)
    for p, g in zip(trainer.student.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g if g is not None else torch.zeros_like(p), rtol=1e-4, atol=1e-6)
    assert (result.n_k, result.teacher_decay, result.stage, trainer.step_index) == (0, 0.0, None, 1)


def test_edm_run_resumes_exactly_and_exports_a_denoiser(tmp_path: Path) -> None:
    assert_resume_is_exact(tmp_path, "--recipe", "edm", "--model-channels", "8")
    latest = checkpoint.load(CheckpointDir(tmp_path / "halves" / "checkpoints").latest().model)
    assert isinstance(latest.model, Denoiser) and latest.meta.config.kind == "denoiser"
    assert latest.meta.schedules == {}  # a denoiser samples by Heun: no consistency schedules


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--teacher", "ema"], r"^--teacher is only used with --recipe ict or ct or ect or cd, not --recipe edm$"),
        (["--curriculum", "ct"], r"^--curriculum is only used with --recipe ict or ct, not --recipe edm$"),
        (["--distance", "l2"], r"^--distance is only used with --recipe ict or ct or ect or cd, not --recipe edm$"),
    ],
)
def test_options_edm_does_not_read_are_refused(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(["--out", str(tmp_path / "run"), "--recipe", "edm", *argv])
