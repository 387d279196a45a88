"""The run folder: its resolved config.json, the resume checks, metrics.csv and the provenance of saved models.

RUN/config.json holds the run's options, the derived model config and recipe, and the class names;
RUN/checkpoints/ the model files and training states (training.state); RUN/metrics.csv one row per
--log-every steps (and RUN/tb/ when tensorboard is installed); RUN/samples/ the sample grids.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import subprocess
from pathlib import Path
from typing import Any

from torch import nn

from models import checkpoint
from models.config import ModelConfig

from .config import ConfigError, RunConfig, flag, schedules
from .state import CheckpointDir, load_state

# Settings a resumed run may change; every other explicit flag must equal the saved value.
RESUMABLE_CHANGES = {"out", "save_every", "sample_every", "log_every", "keep", "stop_after", "compile", "device"}


def read_saved(folder: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The run config saved in `folder`/config.json, and the whole document (model, recipe, class names)."""
    doc = json.loads((folder / "config.json").read_text())
    return RunConfig(**doc["run"]), doc


def prepare(cfg: RunConfig, resume: str | None, explicit: set[str]) -> tuple[RunConfig, dict[str, Any] | None]:
    """Check the run folder against the resume mode; on resume, the saved config (with allowed changes) and state."""
    folder = Path(cfg.out)
    try:
        latest = CheckpointDir(folder / "checkpoints").latest()
    except ValueError as e:
        raise ConfigError(f"--resume: {e}") from None
    if latest is None:
        if resume == "latest":
            raise ConfigError(f"--resume: {folder} holds no checkpoint (use --resume auto to start fresh)")
        return cfg, None
    if resume is None:
        raise ConfigError(f"--out {folder} already holds a run; pass --resume to continue it or choose another")
    saved, _ = read_saved(folder)
    for name in sorted(explicit - RESUMABLE_CHANGES):
        if getattr(cfg, name) != getattr(saved, name):
            raise ConfigError(
                f"{flag(name)} {getattr(cfg, name)} differs from the resumed run's {getattr(saved, name)}; "
                f"a resumed run may change only {sorted(flag(n) for n in RESUMABLE_CHANGES - {'out'})}"
            )
    changes = {n: getattr(cfg, n) for n in explicit & RESUMABLE_CHANGES}
    return dataclasses.replace(saved, **changes), load_state(latest.state)


def create(ckpts: CheckpointDir, cfg: RunConfig, model_cfg: ModelConfig, class_names: list[str] | None) -> None:
    """Make the folders, drop half-written checkpoints, and (re)write config.json."""
    ckpts.folder.mkdir(parents=True, exist_ok=True)
    ckpts.remove_stale_temporaries()
    doc = {"run": cfg.to_dict(), "model": model_cfg.to_dict(), "recipe": cfg.recipe_obj().to_dict(),
           "class_names": class_names}
    checkpoint.atomic_write_bytes(Path(cfg.out) / "config.json", (json.dumps(doc, indent=2) + "\n").encode())


def git_commit() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}
    if head.returncode:
        return {"git_commit": None}
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def provenance(cfg: RunConfig, step: int) -> dict[str, Any]:
    """What a model file records about how it was trained."""
    return {
        "trainer": "cmserve training.train",
        **git_commit(),
        "recipe_name": cfg.recipe,
        "recipe": cfg.recipe_obj().to_dict(),
        "steps": step,
        "total_steps": cfg.steps,
        "batch": cfg.batch,
        "lr": cfg.lr,
        "ema_decay": cfg.ema_decay,
        "seed": cfg.seed,
        "data": cfg.data,
        "data_fraction": cfg.data_fraction,
        "augment": cfg.augment,
    }


def save_model_file(path: Path, model: nn.Module, cfg: RunConfig, class_names: list[str] | None, step: int) -> None:
    checkpoint.save(path, model, preset=cfg.preset, class_names=class_names, training_step=step,
                    schedules=schedules(cfg, model.cfg), provenance=provenance(cfg, step))


class MetricsLog:
    """metrics.csv (and TensorBoard events when tensorboard is installed), written by rank 0."""

    FIELDS = ("step", "loss", "n_k", "teacher_mu", "grad_norm", "images_per_s", "lr", "elapsed_s", "images", "stage")

    def __init__(self, run: Path, resume_step: int) -> None:
        self.path = run / "metrics.csv"
        rows = []
        if self.path.is_file() and resume_step > 0:  # drop rows logged after the checkpoint we resume from
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.tb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tb"), purge_step=resume_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
