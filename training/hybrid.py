"""The hybrid recipes' trainers: EDM pretraining, consistency tuning (ECT) and consistency distillation (CD).

Each is a `Trainer` (training/loop.py) with its own step, in the paper's phases; batches, the EMA, checkpoints,
resume and DDP are the base class's. The formulas are training/edm.py, ect.py and cd.py; the denoiser and its
Heun step are models/denoiser.py. `TRAINERS` maps a recipe's objective to its trainer.

- edm: the student is a `Denoiser` (EDM's scalings); its export is a denoiser file, sampled by Heun.
- ect: the student is a `ConsistencyModel` initialised from the denoiser (--init); the loss evaluates its backbone
  (and the EMA target's, --teacher ema) under EDM's unshifted scalings (ECT trains D_θ), the export samples with
  the σ_min-shifted ones.
- cd: the student is a `ConsistencyModel` initialised from the denoiser (--teacher-model), which stays frozen
  as the teacher whose probability-flow ODE it distils.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import checkpoint
from models.checkpoint import CheckpointError, LoadedCheckpoint
from models.config import ModelConfig, preset
from models.consistency import ConsistencyModel
from models.denoiser import Denoiser

from . import cd, ect, edm
from .config import PRETRAINED_OPTIONS, ConfigError, RunConfig, flag, model_config
from .loop import StepResult, Trainer, ema_decay_at, lerp_params, rng_devices
from .recipe import Recipe
from .state import CheckpointDir

log = logging.getLogger(__name__)

Distance = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
ModelFn = Callable[..., torch.Tensor]  # f(x, σ, class_labels, augment_labels=...)


# --- the pretrained denoiser ------------------------------------------------------------------------------------


def pretrained_file(value: str, option: str) -> Path:
    """The model file `value` names: the file itself, or a run folder's newest checkpoint (its EMA weights)."""
    path = Path(value)
    if path.is_dir():
        try:
            ref = CheckpointDir(path / "checkpoints").latest()
        except ValueError as e:
            raise ConfigError(f"{flag(option)} {value}: {e}") from None
        if ref is None or not ref.model.is_file():
            raise ConfigError(f"{flag(option)} {value}: a folder without checkpoints (not a training run folder)")
        return ref.model
    if not path.is_file():
        raise ConfigError(f"{flag(option)} {value}: no such file or run folder")
    return path


def pretrained_config(value: str, option: str) -> ModelConfig:
    """The architecture of the denoiser `value` names, from its header alone; anything else is an error."""
    file = pretrained_file(value, option)
    try:
        cfg = checkpoint.read_meta_file(file).config
    except CheckpointError as e:
        raise ConfigError(f"{flag(option)}: {e}") from None
    if cfg.kind != "denoiser":
        raise ConfigError(f"{flag(option)} {file}: a {cfg.kind} model, not a denoiser; pretrain one with --recipe edm")
    return cfg


def load_pretrained(value: str, option: str, device: torch.device | str = "cpu") -> LoadedCheckpoint:
    """The denoiser `value` names, loaded (frozen, eval mode); anything else is an error naming the option."""
    pretrained_config(value, option)
    file = pretrained_file(value, option)
    try:
        loaded = checkpoint.load(file, device=device)
    except CheckpointError as e:
        raise ConfigError(f"{flag(option)}: {e}") from None
    log.info(
        "%s %s: starting from %s (sha256 %s…, step %d)",
        flag(option),
        value,
        file,
        loaded.sha256[:12],
        loaded.meta.training_step,
    )
    return loaded


def pretrained_option(cfg: RunConfig) -> str | None:
    """The option naming the run's pretrained denoiser (ECT: init, CD: teacher_model), or None."""
    return PRETRAINED_OPTIONS.get(cfg.recipe)


def pretrained_path(cfg: RunConfig) -> str | None:
    """The file the run starts from, resolved once (a run folder may gain checkpoints later)."""
    option = pretrained_option(cfg)
    return None if option is None else str(pretrained_file(getattr(cfg, option), option))


def run_model_config(cfg: RunConfig, rec: Recipe, num_data_classes: int) -> ModelConfig:
    """The model a run trains: the preset's (iCT, CT), as a denoiser (EDM), or the pretrained denoiser's
    architecture as a consistency model (ECT, CD), with the recipe's dropout where it sets one."""
    option = pretrained_option(cfg)
    if option is None:
        kind = "denoiser" if rec.objective == "edm" else "consistency"
        return model_config(cfg, rec, num_data_classes).replace(kind=kind)
    pretrained = pretrained_config(getattr(cfg, option), option)
    check_pretrained(cfg, option, pretrained, num_data_classes)
    dropout = pretrained.dropout if rec.dropout is None else rec.dropout
    return pretrained.replace(kind="consistency", dropout=dropout)


def check_pretrained(cfg: RunConfig, option: str, pretrained: ModelConfig, num_data_classes: int) -> None:
    """The denoiser fits the data: its image shape, and its classes (none, or the data's labels)."""
    where = f"{flag(option)} {getattr(cfg, option)}"
    wanted = preset(cfg.preset).image_shape
    if pretrained.image_shape != wanted:
        raise ConfigError(f"{where}: images {pretrained.image_shape}, but --preset {cfg.preset} trains on {wanted}")
    classes = pretrained.num_classes
    if classes and classes != num_data_classes:
        raise ConfigError(f"{where}: a model of {classes} classes; --data {cfg.data} has {num_data_classes} labels")
    if (cfg.class_cond == "yes" and not classes) or (cfg.class_cond == "no" and classes):
        raise ConfigError(f"--class-cond {cfg.class_cond}: {where} is {'un' if not classes else ''}conditional")


def consistency_from(denoiser: nn.Module, cfg: ModelConfig) -> ConsistencyModel:
    """A consistency model with the denoiser's backbone weights (same names and c_noise: they transfer as they are)."""
    model = ConsistencyModel.from_config(cfg)
    model.backbone.load_state_dict(denoiser.backbone.state_dict())
    return model


# --- losses on a batch -----------------------------------------------------------------------------------------


def tuning_loss(
    student: ModelFn,
    target_fn: ModelFn,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    t: torch.Tensor,
    r: torch.Tensor,
    eps: torch.Tensor,
    weights: torch.Tensor,
    distance: Distance,
    c: float,
    devices: list[int],
    **extra: Any,
) -> torch.Tensor:
    """E[w·d(f_θ(y + t·ε, t), stopgrad f_θ(y + r·ε, r))], the target y where r = 0 (ECT §3); w of shape (B,)."""
    x_t = y + t[:, None, None, None] * eps  # (B, C, H, W), the same ε in both terms
    x_r = y + r[:, None, None, None] * eps
    # Student pass from a forked RNG: the target pass replays its dropout masks (CPU and CUDA).
    with torch.random.fork_rng(devices=devices):
        f_t = student(x_t, t, labels, **extra)
    # Target pass, stop-gradient; where r = 0 it is replaced by y, so it is evaluated at t there (any valid level).
    with torch.no_grad():
        f_r = target_fn(x_r, torch.where(r > 0, r, t), labels, **extra)
    target = ect.target(f_r.float(), y.float(), r)
    return (weights * distance(f_t.float(), target, c)).mean()


def distillation_loss(
    student: ModelFn,
    target_fn: ModelFn,
    denoiser: ModelFn,
    y: torch.Tensor,
    labels: torch.Tensor | None,
    t_prev: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    weights: torch.Tensor,
    distance: Distance,
    c: float,
    devices: list[int],
    **extra: Any,
) -> torch.Tensor:
    """E[λ·d(f_θ(x_t, t), stopgrad f_θ⁻(x̂_t′, t′))], x̂_t′ one Heun step of the teacher from x_t (CM Algorithm 2)."""
    x_t = y + t[:, None, None, None] * z  # (B, C, H, W)
    # The teacher: eval mode (no dropout, no RNG drawn), no augmentation labels (it denoises x_t as it is).
    x_prev = cd.teacher_step(denoiser, x_t, t, t_prev, labels)
    with torch.random.fork_rng(devices=devices):
        f_t = student(x_t, t, labels, **extra)
    with torch.no_grad():
        f_prev = target_fn(x_prev, t_prev, labels, **extra)
    return (weights * distance(f_t.float(), f_prev.float(), c)).mean()


# --- the trainers ----------------------------------------------------------------------------------------------


class HybridTrainer(Trainer):
    """What the hybrid steps share besides the base class's batches and augmentation: the EMA update."""

    def update_ema(self, k: int) -> None:
        decay = ema_decay_at(k, self.loop.ema_decay) if self.loop.ema_warmup else self.loop.ema_decay
        lerp_params(self.ema, self.student, 1.0 - decay)

    def update_target(self) -> float:
        """θ⁻ ← μθ⁻ + (1 − μ)θ with a fixed μ (CM Algorithm 2) when the target is an EMA; its μ, 0 without one."""
        mu = cd.target_decay(self.recipe.teacher, self.recipe.mu0)
        if self.teacher is not None:
            lerp_params(self.teacher, self.student, 1.0 - mu)
        return mu


class EDMTrainer(HybridTrainer):
    """EDM pretraining: the denoising loss on the preset's backbone under EDM's scalings (EDM §5, Table 1)."""

    def build_student(self) -> nn.Module:
        return Denoiser.from_config(self.cfg)

    def step(self) -> StepResult:
        k = self.step_index
        y, labels = self.batch(k)
        y, extra = self.augmented(y, k)
        # Phase 1: σ ~ lognormal(P_mean, P_std), n ~ N(0, σ²I) (EDM Table 1).
        sigma = edm.sample_sigmas(y.shape[0], self.recipe.p_mean, self.recipe.p_std, self.device)  # (B,)
        noise = sigma[:, None, None, None] * torch.randn_like(y)
        # Phase 2: denoiser pass, λ(σ)-weighted squared error (EDM eq. 2).
        with self.autocast():
            denoised = self.student_fn(y + noise, sigma, labels, **extra)
        loss = edm.denoising_loss(denoised.float(), y.float(), sigma, self.cfg.sigma_data).mean()
        # Phase 3: backward, clip, RAdam step; EMA.
        grad_norm = self.optimizer_step(loss)
        self.update_ema(k)
        self.step_index = k + 1
        return StepResult(loss.detach(), grad_norm, 0, 0.0)


class PretrainedTrainer(HybridTrainer):
    """A consistency model whose backbone starts as the pretrained denoiser's (LoopConfig.pretrained)."""

    option = "init"  # the flag that named the denoiser, for messages

    def load_denoiser(self) -> Denoiser:
        assert self.loop.pretrained is not None, "ECT and CD need LoopConfig.pretrained"
        model = load_pretrained(self.loop.pretrained, self.option, self.device).model
        assert isinstance(model, Denoiser)
        return model

    def build_student(self) -> nn.Module:
        return consistency_from(self.load_denoiser(), self.cfg)


class ECTTrainer(PretrainedTrainer):
    """Easy Consistency Tuning (Geng et al. 2024): r from the mapping function, stage by stage over the run."""

    def trained_function(self, model: nn.Module) -> nn.Module:
        # ECT trains f with EDM's unshifted scalings; the exported student samples with the σ_min-shifted ones.
        return Denoiser(model.backbone, self.cfg)

    def step(self) -> StepResult:
        k = self.step_index
        y, labels = self.batch(k)
        y, extra = self.augmented(y, k)
        # Phase 1: the stage, t ~ lognormal(P_mean, P_std), r = max(0, t·(1 − n(t)/q^(stage+1))) (ECT §3).
        stage = ect.stage(k, self.loop.total_steps, self.recipe.ect_stages, self.recipe.ect_stage_steps)
        t = edm.sample_sigmas(y.shape[0], self.recipe.p_mean, self.recipe.p_std, self.device)  # (B,)
        r = ect.r_of_t(t, stage, self.recipe.ect_q)
        # Phase 2: one shared ε; f(x_t, t) and the stop-gradient f(x_r, r) from the same RNG state; the loss.
        eps = torch.randn_like(y)
        with self.autocast():
            loss = tuning_loss(
                self.student_fn,
                self.teacher_fn,
                y,
                labels,
                t,
                r,
                eps,
                ect.weights(self.recipe.ect_weighting, t, r, self.cfg.sigma_data),
                self.recipe.distance_fn(),
                self.c,
                rng_devices(self.device),
                **extra,
            )
        # Phase 3: backward, clip, RAdam step; EMA; the EMA target with a fixed μ (--teacher ema, as CD's).
        grad_norm = self.optimizer_step(loss)
        self.update_ema(k)
        mu = self.update_target()
        self.step_index = k + 1
        return StepResult(loss.detach(), grad_norm, 0, mu, stage=stage)


class CDTrainer(PretrainedTrainer):
    """Consistency distillation (CM Algorithm 2) from the pretrained denoiser, which stays frozen as the teacher."""

    option = "teacher_model"

    def build_student(self) -> nn.Module:
        self.denoiser = self.load_denoiser()  # the teacher D_φ (CM's "teacher"; self.teacher is the EMA target)
        return consistency_from(self.denoiser, self.cfg)

    def step(self) -> StepResult:
        k = self.step_index
        y, labels = self.batch(k)
        y, extra = self.augmented(y, k)
        # Phase 1: the fixed Karras grid of N levels with its sampling law p(i) and weights λ.
        n = self.recipe.cd_levels
        grid = self.grid(n)
        # Phase 2: adjacent levels t′ = σ_i < t = σ_{i+1}, i ~ p(i); one z, x_t = y + t·z.
        idx = torch.multinomial(grid.probs, y.shape[0], replacement=True)  # (B,) 0-based i
        t_prev, t, weights = grid.sigmas[idx], grid.sigmas[idx + 1], grid.weights[idx]
        z = torch.randn_like(y)
        # Phase 3: the teacher's Heun step to x̂_t′; student and target passes (same RNG state); the loss.
        with self.autocast():
            loss = distillation_loss(
                self.student_fn,
                self.teacher_fn,
                self.denoiser,
                y,
                labels,
                t_prev,
                t,
                z,
                weights,
                self.recipe.distance_fn(),
                self.c,
                rng_devices(self.device),
                **extra,
            )
        # Phase 4: backward, clip, RAdam step; EMA of the student; CD's EMA target with a fixed μ (--teacher ema).
        grad_norm = self.optimizer_step(loss)
        self.update_ema(k)
        mu = self.update_target()
        self.step_index = k + 1
        return StepResult(loss.detach(), grad_norm, n, mu)


TRAINERS: dict[str, type[Trainer]] = {  # Recipe.objective -> its trainer
    "ct": Trainer,
    "edm": EDMTrainer,
    "ect": ECTTrainer,
    "cd": CDTrainer,
}
