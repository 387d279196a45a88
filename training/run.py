"""One training run: set up the trainer from a `RunConfig`, drive its steps, log, sample and checkpoint.

Runs on one process or as one rank of a DDP job (torchrun's environment); rank 0 writes the run folder.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.config import preset
from models.denoiser import sample_heun
from models.sampling import sample, to_uint8

from . import rundir
from .config import ConfigError, RunConfig, augment_ops, schedules
from .data import load_data, subset
from .hybrid import TRAINERS, pretrained_path, run_model_config
from .loop import DistInfo, LoopConfig, StepResult, Trainer, ema_warmup_note, setup_distributed, teardown_distributed
from .state import CheckpointDir, gather_rng, restore_rng

log = logging.getLogger("training.run")

SAMPLE_SEEDS_PER_ROW = 10
GRID_HEUN_STEPS = (5, 18)  # a denoiser's grid: Heun with 9 and 35 evaluations


def sample_grid(model: nn.Module, cfg: RunConfig) -> Any:
    """Rows of 1-step samples above rows of 2-step samples, from seeds 0…; column j has class j.
    A denoiser's rows are Heun samples of GRID_HEUN_STEPS steps instead."""
    import numpy as np
    from PIL import Image

    mcfg = model.cfg
    n = 2 * SAMPLE_SEEDS_PER_ROW
    labels = [i % mcfg.num_classes for i in range(n)] if mcfg.num_classes else None
    seeds = list(range(n))
    if mcfg.kind == "denoiser":
        batches = [sample_heun(model, seeds, steps, labels) for steps in GRID_HEUN_STEPS]
    else:
        batches = [sample(model, seeds, sigmas, labels) for sigmas in schedules(cfg, mcfg).values()]
    blocks = []
    for batch in batches:
        imgs = to_uint8(batch)  # (n, H, W, C)
        rows = imgs.reshape(n // SAMPLE_SEEDS_PER_ROW, SAMPLE_SEEDS_PER_ROW, *imgs.shape[1:])
        lines = [np.concatenate(list(row), axis=1) for row in rows]  # each (H, cols*W, C)
        blocks.append(np.concatenate(lines, axis=0))  # (rows*H, cols*W, C)
    gap = np.full((2, blocks[0].shape[1], blocks[0].shape[2]), 128, dtype=np.uint8)
    grid = np.concatenate([blocks[0], gap, blocks[1]], axis=0)
    scale = max(1, 320 // grid.shape[1])
    img = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    return img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


@dataclass
class Run:
    cfg: RunConfig
    folder: Path
    trainer: Trainer
    ckpts: CheckpointDir
    class_names: list[str] | None
    dist: DistInfo

    def save(self) -> None:
        """Checkpoint the current step (a collective: every rank contributes its RNG states)."""
        step = self.trainer.step_index
        rng = gather_rng(self.trainer.device, self.dist.world_size)
        if self.dist.is_main:
            latest = self.ckpts.latest()
            if latest is None or latest.step != step:
                state = {**self.trainer.state_dict(), "rng": rng, "world_size": self.dist.world_size}

                def writer(path: Path) -> None:
                    rundir.save_model_file(path, self.trainer.ema, self.cfg, self.class_names, step)

                self.ckpts.save(step, writer, state)
                log.info("checkpoint step %d -> %s", step, self.ckpts.folder)
        if self.dist.enabled:
            torch.distributed.barrier()

    def write_samples(self) -> None:
        if not self.dist.is_main:
            return
        path = self.folder / "samples" / f"step-{self.trainer.step_index:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(self.trainer.ema, self.cfg).save(path)

    def resume_from(self, ref_state: dict[str, Any]) -> None:
        if ref_state.get("world_size") != self.dist.world_size:
            raise ConfigError(
                f"--resume: the checkpoint was written by {ref_state.get('world_size')} ranks, this job has "
                f"{self.dist.world_size}; exact resume needs the same number"
            )
        self.trainer.load_state_dict(ref_state)
        restore_rng(ref_state["rng"][self.dist.rank], self.trainer.device)


def train(
    cfg: RunConfig,
    resume: str | None = None,
    explicit: set[str] | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> Trainer:
    """Run (or continue) training as `cfg` says; `on_step` sees every step's result; returns the trainer."""
    dist_info, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, resume, explicit or set(), dist_info, device, on_step)
    finally:
        teardown_distributed()


def _train(
    cfg: RunConfig,
    resume: str | None,
    explicit: set[str],
    dist_info: DistInfo,
    device: torch.device,
    on_step: Callable[[StepResult], None] | None,
) -> Trainer:
    cfg, state = rundir.prepare(cfg, resume, explicit)
    folder = Path(cfg.out)
    rec = cfg.recipe_obj()
    base = preset(cfg.preset)
    data = subset(load_data(cfg.data, base.image_size, base.image_channels), cfg.data_fraction)
    model_cfg = run_model_config(cfg, rec, data.num_classes)
    class_names = list(data.class_names) if model_cfg.num_classes else None
    loop = LoopConfig(total_steps=cfg.steps, global_batch=cfg.batch, lr=cfg.lr, ema_decay=cfg.ema_decay,
                      ema_warmup=cfg.ema_warmup, grad_clip=cfg.grad_clip, precision=cfg.precision,
                      compile=cfg.compile, seed=cfg.seed, augment=cfg.augment, augment_ops=augment_ops(cfg),
                      pretrained=pretrained_path(cfg))
    trainer = TRAINERS[rec.objective](model_cfg, rec, loop, data, dist_info, device)
    run = Run(cfg, folder, trainer, CheckpointDir(folder / "checkpoints", cfg.keep), class_names, dist_info)
    if dist_info.is_main:
        rundir.create(run.ckpts, cfg, model_cfg, class_names)
    if state is not None:
        run.resume_from(state)
    start = trainer.step_index
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    if dist_info.is_main:
        if cfg.ema_warmup and (note := ema_warmup_note(cfg.ema_decay, cfg.steps)):  # a warning if the user set it
            log.log(logging.WARNING if "ema_decay" in explicit else logging.INFO, "%s", note)
        log.info("training %s (%.2f M parameters) with recipe %s on %s, steps %d -> %d of %d, %d rank(s)",
                 cfg.preset, trainer.student.num_parameters() / 1e6, cfg.recipe, device, start, stop, cfg.steps,
                 dist_info.world_size)
    run_steps(run, start, stop, on_step)
    return trainer


def run_steps(run: Run, start: int, stop: int, on_step: Callable[[StepResult], None] | None = None) -> None:
    from tqdm import tqdm

    cfg, trainer, main = run.cfg, run.trainer, run.dist.is_main
    metrics = rundir.MetricsLog(run.folder, start) if main else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not main, dynamic_ncols=True, unit="step",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    loss_sum, count, t0, t_log = None, 0, time.perf_counter(), time.perf_counter()
    try:
        while trainer.step_index < stop:
            result = trainer.step()
            if on_step is not None:
                on_step(result)
            loss_sum = result.loss if loss_sum is None else loss_sum + result.loss
            count += 1
            k = trainer.step_index
            bar.update(1)
            if k % cfg.log_every == 0 or k == stop:
                now = time.perf_counter()
                row = log_row(run, result, loss_sum / count, count, now - t_log, now - t0)
                if main:
                    metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", N=row["n_k"], img_s=f"{row['images_per_s']:.0f}")
                loss_sum, count, t_log = None, 0, now
            if cfg.sample_every and (k % cfg.sample_every == 0 or k == stop):
                run.write_samples()
            if k % cfg.save_every == 0 or k == stop:
                run.save()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()


def log_row(run: Run, result: StepResult, mean_loss: torch.Tensor, count: int, dt: float, elapsed: float) -> dict:
    """One metrics row; the only host synchronisation of the loop (every --log-every steps)."""
    if run.dist.enabled:
        torch.distributed.all_reduce(mean_loss)
        mean_loss = mean_loss / run.dist.world_size
    return {
        "step": run.trainer.step_index,
        "images": run.trainer.step_index * run.cfg.batch,  # training images seen by this run
        "loss": float(mean_loss.item()),
        "n_k": result.n_k,
        "stage": result.stage,
        "teacher_mu": result.teacher_decay,
        "grad_norm": float(result.grad_norm.item()) if result.grad_norm is not None else None,
        "images_per_s": count * run.cfg.batch / max(dt, 1e-9),
        "lr": run.cfg.lr,
        "elapsed_s": round(elapsed, 3),
    }
