"""Shared pieces of the hybrid-recipe tests (test_edm, test_ect, test_cd): a tiny pretrained denoiser file,
EDM's scalings written out by hand, a trainer factory and the exact-resume check."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from models import checkpoint
from models.config import ModelConfig, preset
from models.denoiser import Denoiser
from tests.conftest import randomize
from training import train
from training.data import Dataset
from training.hybrid import TRAINERS
from training.loop import DistInfo, LoopConfig, Trainer
from training.recipe import Recipe
from training.state import CheckpointDir, load_state

SIGMA_DATA = 0.5
RUN_FLAGS = ["--batch", "8", "--sample-every", "0", "--log-every", "2", "--device", "cpu"]


def small_cfg(dropout: float = 0.0, kind: str = "consistency") -> ModelConfig:
    return preset("digits").replace(model_channels=16, num_groups=4, dropout=dropout, kind=kind)


def save_denoiser(folder: Path, seed: int = 7) -> Path:
    """A randomly initialised (every layer non-zero) denoiser file that ECT and CD can start from."""
    torch.manual_seed(seed)
    model = randomize(Denoiser.from_config(small_cfg(kind="denoiser")), seed=seed)
    return checkpoint.save(
        folder / "denoiser.safetensors", model, preset="digits", class_names=[str(d) for d in range(10)]
    )


def edm_by_hand(backbone: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """D(x; σ) = c_skip·x + c_out·F(c_in·x, ¼ ln σ) with EDM Table 1's unshifted scalings, written out."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2)
    c_out = s * SIGMA_DATA / (s**2 + SIGMA_DATA**2).sqrt()
    c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
    return c_skip * x + c_out * backbone(c_in * x, 0.25 * sigma.log(), labels)


def make_trainer(
    kind: str, recipe: Recipe, data: Dataset, cfg: ModelConfig, pretrained: Path | None = None, **loop: object
) -> Trainer:
    settings = {"total_steps": 80, "global_batch": 8, "lr": 1e-3, "ema_decay": 0.9, "grad_clip": 0.0} | loop
    config = LoopConfig(**settings, pretrained=None if pretrained is None else str(pretrained))
    return TRAINERS[kind](cfg, recipe, config, data, DistInfo(), torch.device("cpu"))


def final_state(out: Path) -> dict:
    return load_state(CheckpointDir(out / "checkpoints").latest().state)


def assert_resume_is_exact(tmp_path: Path, *flags: str) -> None:
    """8 steps in one go == 4 steps, stop, resume for 4 (dropout on, so the RNG states matter too)."""
    common = [*RUN_FLAGS, "--steps", "8", "--save-every", "4", "--dropout", "0.2", *flags]
    train.main(["--out", str(tmp_path / "straight"), *common])
    train.main(["--out", str(tmp_path / "halves"), *common, "--stop-after", "4"])
    assert CheckpointDir(tmp_path / "halves" / "checkpoints").latest().step == 4
    train.main(["--out", str(tmp_path / "halves"), *common, "--resume"])
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "halves")
    assert a["step"] == b["step"] == 8
    for key in ("student", "ema", "teacher"):
        assert (a[key] is None) == (b[key] is None)
        for name in a[key] or {}:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    rows = (tmp_path / "halves" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6", "8"]
    images = [int(r.split(",")[header.index("images")]) for r in rows[1:]]
    elapsed = [float(r.split(",")[header.index("elapsed_s")]) for r in rows[1:]]
    assert images == [16, 32, 48, 64] and all(math.isfinite(e) and e >= 0 for e in elapsed)
