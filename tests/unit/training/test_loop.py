"""The training step is the iCT loss: per-sample pseudo-Huber, stop-gradient teacher, same z and dropout masks."""

from __future__ import annotations

import copy

import pytest
import torch

from models.config import ModelConfig, preset
from models.sampling import karras_sigmas
from tests.conftest import randomize
from training import ict
from training.config import ConfigError
from training.data import Dataset, load_digits_train
from training.loop import DistInfo, LoopConfig, Trainer, consistency_loss, rng_devices, setup_distributed
from training.recipe import RECIPES, Recipe


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits_train()


def small_cfg(dropout: float = 0.0) -> ModelConfig:
    return preset("digits").replace(model_channels=16, num_groups=4, dropout=dropout)


def make_trainer(digits: Dataset, recipe: Recipe, dropout: float = 0.0, batch: int = 8, **loop: object) -> Trainer:
    settings = {"total_steps": 80, "global_batch": batch, "lr": 1e-3, "ema_decay": 0.9, "grad_clip": 0.0} | loop
    trainer = Trainer(small_cfg(dropout), recipe, LoopConfig(**settings), digits, DistInfo(), torch.device("cpu"))
    randomize(trainer.student, seed=1)  # zero-initialised output layers would hide the teacher's gradient
    trainer.ema.load_state_dict(trainer.student.state_dict())
    return trainer


def replay_step(trainer: Trainer, rng_state: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The expected loss and gradients of step k, written out by hand from the paper, on a copy of the weights."""
    model = copy.deepcopy(trainer.student)
    k = trainer.step_index
    x, labels = trainer.batch(k)
    n = ict.discretization_steps(k, trainer.loop.total_steps)
    sigmas = karras_sigmas(n)  # float64
    torch.set_rng_state(rng_state)
    probs = ict.timestep_probabilities(sigmas).float()
    idx = torch.multinomial(probs, x.shape[0], replacement=True)
    z = torch.randn_like(x)
    s_i, s_next = sigmas[idx].float(), sigmas[idx + 1].float()
    before_student = torch.get_rng_state()
    student = model(x + s_next[:, None, None, None] * z, s_next, labels)
    torch.set_rng_state(before_student)  # the teacher replays the student's dropout masks
    teacher = model(x + s_i[:, None, None, None] * z, s_i, labels).detach()
    c = 0.00054 * 8  # D = 64
    norm_sq = ((student - teacher) ** 2).sum(dim=(1, 2, 3))  # over the whole sample
    weights = 1 / (sigmas[idx + 1] - sigmas[idx])
    loss = (weights.float() * ((norm_sq + c * c).sqrt() - c)).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), list(grads)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_step_loss_and_gradients_match_the_ict_objective(digits: Dataset, dropout: float) -> None:
    trainer = make_trainer(digits, RECIPES["ict"], dropout=dropout)
    trainer.step_index = 40  # a later curriculum stage: N = 161
    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected_loss, expected_grads = replay_step(trainer, state)
    torch.set_rng_state(state)
    result = trainer.step()
    assert result.n_k == 161
    torch.testing.assert_close(result.loss, expected_loss, rtol=1e-5, atol=0)
    for p, g in zip(trainer.student.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_a_teacher_with_gradients_would_change_the_step(digits: Dataset) -> None:
    """The replay above can tell: the gradient through a differentiable teacher is different."""
    trainer = make_trainer(digits, RECIPES["ict"])
    model = trainer.student
    x, labels = trainer.batch(0)
    s_i, s_next = torch.full((8,), 0.5), torch.full((8,), 0.7)
    z = torch.randn_like(x)
    loss = consistency_loss(model, model, x, labels, s_i, s_next, z, torch.ones(8), ict.pseudo_huber, 0.00432, [])
    stopgrad = torch.autograd.grad(loss, list(model.parameters()))
    student = model(x + 0.7 * z, s_next, labels)
    teacher = model(x + 0.5 * z, s_i, labels)  # not detached: the mistake
    wrong = torch.autograd.grad(ict.pseudo_huber(student, teacher, 0.00432).mean(), list(model.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(stopgrad, wrong, strict=True))


def test_student_and_teacher_passes_share_dropout_masks(digits: Dataset) -> None:
    """With σ_i = σ_{i+1} the two passes see the same input: the loss is exactly 0 only if the masks agree."""
    trainer = make_trainer(digits, RECIPES["ict"], dropout=0.5)
    model = trainer.student.train()
    x, labels = trainer.batch(0)
    sigma = torch.full((x.shape[0],), 1.5)
    z = torch.randn_like(x)
    first, second = model(x + 1.5 * z, sigma, labels), model(x + 1.5 * z, sigma, labels)
    assert not torch.equal(first, second)  # dropout is really on
    loss = consistency_loss(model, model, x, labels, sigma, sigma, z, torch.ones_like(sigma), ict.pseudo_huber, 0.0, [])
    assert loss.item() == 0.0


@pytest.mark.parametrize(("k", "decay"), [(5, 6 / 15), (400, 0.9)])  # min(0.9, (1 + k)/(10 + k))
def test_ema_follows_the_student_and_ict_has_no_teacher_copy(digits: Dataset, k: int, decay: float) -> None:
    trainer = make_trainer(digits, RECIPES["ict"])
    trainer.step_index = k
    ema_before = [p.clone() for p in trainer.ema.parameters()]
    trainer.step()
    for e0, e1, s in zip(ema_before, trainer.ema.parameters(), trainer.student.parameters(), strict=True):
        torch.testing.assert_close(e1, decay * e0 + (1 - decay) * s)
    assert not any(p.requires_grad for p in trainer.ema.parameters())
    assert trainer.teacher is None  # iCT: the teacher is the student itself (iCT §3.2)


def test_ct_recipe_uses_an_ema_teacher_with_mu_k(digits: Dataset) -> None:
    trainer = make_trainer(digits, RECIPES["ct"])
    assert trainer.teacher is not None
    teacher_before = [p.clone() for p in trainer.teacher.parameters()]
    result = trainer.step()
    mu = result.teacher_decay
    assert result.n_k == 2 and mu == pytest.approx(0.9)  # CT: N(0) = s0 = 2, μ(0) = exp(2 ln 0.9 / 2)
    for t0, t1, s in zip(teacher_before, trainer.teacher.parameters(), trainer.student.parameters(), strict=True):
        torch.testing.assert_close(t1, mu * t0 + (1 - mu) * s)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_steps_run(digits: Dataset, precision: str) -> None:
    trainer = make_trainer(digits, RECIPES["ict"], precision=precision, grad_clip=1.0)
    for _ in range(2):
        result = trainer.step()
    assert torch.isfinite(result.loss)
    assert (trainer.scaler is not None) == (precision == "fp16")
    assert all(p.dtype == torch.float32 for p in trainer.student.parameters())


def test_batch_is_the_rank_slice_of_one_global_batch(digits: Dataset) -> None:
    whole = make_trainer(digits, RECIPES["ict"], batch=8)
    x_all, y_all = whole.batch(5)
    for rank in range(2):
        part = make_trainer(digits, RECIPES["ict"], batch=8)
        part.dist, part.local_batch = DistInfo(rank=rank, world_size=2), 4
        x, y = part.batch(5)
        assert torch.equal(x, x_all[rank * 4 : (rank + 1) * 4]) and torch.equal(y, y_all[rank * 4 : (rank + 1) * 4])


def test_global_batch_must_split_evenly_across_ranks(digits: Dataset) -> None:
    loop = LoopConfig(total_steps=8, global_batch=15, lr=1e-3, ema_decay=0.9, grad_clip=0.0)
    with pytest.raises(ConfigError, match=r"^--batch 15 is not divisible by the 2 ranks$"):
        Trainer(small_cfg(), RECIPES["ict"], loop, digits, DistInfo(rank=0, world_size=2), torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--device cuda: CUDA is not available on this machine$"):
        setup_distributed("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dropout_masks_need_the_cuda_generator_forked(digits: Dataset) -> None:
    """On a GPU the masks come from the CUDA generator: forking only the CPU one gives different masks."""
    device = torch.device("cuda")
    loop = LoopConfig(total_steps=80, global_batch=16, lr=1e-3, ema_decay=0.9, grad_clip=1.0, precision="bf16")
    trainer = Trainer(small_cfg(0.5), RECIPES["ict"], loop, digits, DistInfo(), device)
    model = trainer.student.train()
    with torch.no_grad():  # no zero-initialised layer after a dropout, or every mask gives the same output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, labels = trainer.batch(0)
    sigma = torch.full((x.shape[0],), 1.5, device=device)
    z = torch.randn_like(x)
    args = (x, labels, sigma, sigma, z, torch.ones_like(sigma), ict.pseudo_huber, 0.0)
    assert consistency_loss(model, model, *args, rng_devices(device)).item() == 0.0
    assert consistency_loss(model, model, *args, []).item() > 0.0  # pitfall 4 of the recipe notes
    for _ in range(3):
        result = trainer.step()  # bf16 autocast, channels_last
    assert torch.isfinite(result.loss) and result.loss.device.type == "cuda"
