"""CD (training/cd.py, training.hybrid.CDTrainer): the teacher's Heun step by hand, one step replayed, the flags."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.consistency import ConsistencyModel
from models.sampling import karras_sigmas
from tests.conftest import randomize
from training import cd
from training.config import ConfigError
from training.data import Dataset, load_digits_train
from training.recipe import RECIPES
from training.train import resolve

from .hybrid_helpers import assert_resume_is_exact, edm_by_hand, make_trainer, save_denoiser, small_cfg


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits_train()


@pytest.fixture(scope="module")
def denoiser_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_denoiser(tmp_path_factory.mktemp("pretrained"))


def test_cd_defaults_are_cms() -> None:
    rec = RECIPES["cd"]
    assert (cd.LEVELS, cd.MU, rec.cd_levels, rec.mu0) == (18, 0.95, 18, 0.95)
    assert (rec.timesteps, rec.weighting, rec.teacher, rec.distance) == (
        "uniform",
        "uniform",
        "student",
        "pseudo_huber",
    )
    assert cd.target_decay("ema") == 0.95 and cd.target_decay("ema", 0.9) == 0.9 and cd.target_decay("student") == 0


def test_teacher_step_is_one_heun_step_by_hand() -> None:
    """Data N(0, 1), so D(x; σ) = x/(1 + σ²). From x = 1 at t = 2 to t′ = 1: d = (1 − 1/5)/2 = 0.4,
    x′ = 1 − 0.4 = 0.6, d′ = (0.6 − 0.6/2)/1 = 0.3, x_t′ = 1 − (0.4 + 0.3)/2 = 0.65."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: object = None) -> torch.Tensor:
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)

    x = torch.ones(2, 1, 2, 2)
    x_prev = cd.teacher_step(denoise, x, torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(x_prev, torch.full_like(x, 0.65))


@pytest.mark.parametrize(("teacher", "dropout"), [("student", 0.0), ("student", 0.3), ("ema", 0.3)])
def test_cd_step_loss_and_gradients_match_the_cd_objective(
    digits: Dataset, denoiser_file: Path, teacher: str, dropout: float
) -> None:
    trainer = make_trainer("cd", RECIPES["cd"].replace(teacher=teacher), digits, small_cfg(dropout), denoiser_file)
    if teacher == "ema":  # make θ⁻ differ from θ, so that the replay can tell which one gave the target
        randomize(trainer.teacher, seed=3)
    denoiser = checkpoint.load(denoiser_file).model  # the frozen teacher D_φ
    model = copy.deepcopy(trainer.student)
    target_model = copy.deepcopy(trainer.teacher) if teacher == "ema" else model
    y, labels = trainer.batch(0)
    torch.manual_seed(9)
    state = torch.get_rng_state()
    # Written out from CM Algorithm 2: n ~ U[1, N−1] on N = 18 Karras levels, x_t = y + t·z, one Heun step.
    sigmas = karras_sigmas(18).float()
    idx = torch.multinomial(torch.full((17,), 1 / 17, dtype=torch.float64).float(), 8, replacement=True)
    t_prev, t = sigmas[idx], sigmas[idx + 1]
    z = torch.randn_like(y)
    x_t = y + t[:, None, None, None] * z
    col, col_prev = t[:, None, None, None], t_prev[:, None, None, None]
    with torch.no_grad():
        d = (x_t - edm_by_hand(denoiser.backbone, x_t, t, labels)) / col
        x_euler = x_t + (col_prev - col) * d
        d_prime = (x_euler - edm_by_hand(denoiser.backbone, x_euler, t_prev, labels)) / col_prev
        x_prev = x_t + (col_prev - col) * (d + d_prime) / 2
    before = torch.get_rng_state()
    f_t = model(x_t, t, labels)
    torch.set_rng_state(before)  # the target replays the student's dropout masks
    target = target_model(x_prev, t_prev, labels).detach()
    c = 0.00054 * 8
    expected = ((((f_t - target) ** 2).sum(dim=(1, 2, 3)) + c * c).sqrt() - c).mean()  # λ = 1
    grads = torch.autograd.grad(expected, list(model.parameters()))
    ema_target_before = [p.clone() for p in trainer.teacher.parameters()] if teacher == "ema" else []
    torch.set_rng_state(state)
    result = trainer.step()
    torch.testing.assert_close(result.loss, expected.detach(), rtol=1e-5, atol=0)
    for p, g in zip(trainer.student.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert (result.n_k, result.teacher_decay) == (18, 0.95 if teacher == "ema" else 0.0)
    if teacher == "ema":  # θ⁻ ← μθ⁻ + (1 − μ)θ
        after = zip(ema_target_before, trainer.teacher.parameters(), trainer.student.parameters(), strict=True)
        for before_p, after_p, student_p in after:
            torch.testing.assert_close(after_p, 0.95 * before_p + 0.05 * student_p)


def test_the_student_starts_as_the_teacher_which_stays_frozen(digits: Dataset, denoiser_file: Path) -> None:
    trainer = make_trainer("cd", RECIPES["cd"], digits, small_cfg(), denoiser_file)
    assert isinstance(trainer.student, ConsistencyModel) and trainer.forward is trainer.student
    before = {k: v.clone() for k, v in trainer.denoiser.state_dict().items()}
    for name, value in before.items():
        assert torch.equal(trainer.student.state_dict()[name], value)
    trainer.step()
    assert all(torch.equal(trainer.denoiser.state_dict()[k], v) for k, v in before.items())
    assert not trainer.denoiser.training and not any(p.requires_grad for p in trainer.denoiser.parameters())


def test_teacher_model_only_with_cd_which_needs_an_existing_denoiser(tmp_path: Path, denoiser_file: Path) -> None:
    out = ["--out", str(tmp_path / "run")]
    cases = [
        (["--teacher-model", str(denoiser_file)], r"^--teacher-model is only used with --recipe cd, not --recipe ict$"),
        (["--recipe", "ect", "--teacher-model", str(denoiser_file)], r"^--teacher-model is only used with --recipe cd"),
        (["--recipe", "cd"], r"^--recipe cd needs --teacher-model RUN_OR_FILE"),
        (["--recipe", "cd", "--teacher-model", str(tmp_path / "x.safetensors")], r"^--teacher-model .*: no such file"),
        (["--recipe", "cd", "--teacher-model", str(denoiser_file), "--init", str(denoiser_file)], r"^--init is only"),
        (["--cd-levels", "40"], r"^--cd-levels is only used with --recipe cd"),
    ]
    for argv, message in cases:
        with pytest.raises(ConfigError, match=message):
            resolve([*out, *argv])
    cfg, _, _ = resolve([*out, "--recipe", "cd", "--teacher-model", str(denoiser_file), "--cd-levels", "40"])
    assert cfg.recipe_obj().cd_levels == 40


def test_a_missing_teacher_file_is_a_one_line_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training import train

    with pytest.raises(SystemExit) as info:
        train.main(["--out", str(tmp_path / "r"), "--recipe", "cd", "--teacher-model", str(tmp_path / "gone")])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "--teacher-model" in err[0] and "gone" in err[0], err


@pytest.mark.parametrize("teacher", ["student", "ema"])
def test_a_cd_run_resumes_exactly(tmp_path: Path, denoiser_file: Path, teacher: str) -> None:
    assert_resume_is_exact(tmp_path, "--recipe", "cd", "--teacher-model", str(denoiser_file), "--teacher", teacher)
