"""The run driver: a tiny run writes its folder and stops where asked; sample grids; resume needs the same ranks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from models.config import preset
from models.consistency import ConsistencyModel
from training.config import ConfigError, RunConfig
from training.loop import DistInfo, ema_decay_at, ema_warmup_note
from training.run import SAMPLE_SEEDS_PER_ROW, Run, sample_grid, train
from training.state import CheckpointDir

TINY = {"model_channels": 8, "batch": 16, "sample_every": 0, "log_every": 2, "device": "cpu"}


def test_a_tiny_run_writes_its_folder_and_stops_after(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = RunConfig(out=str(tmp_path / "run"), steps=6, save_every=2, stop_after=3, **TINY)
    seen = []
    with caplog.at_level(logging.INFO, logger="training.run"):
        trainer = train(cfg, on_step=lambda r: seen.append(r.n_k))
    note = [r for r in caplog.records if "--ema-decay 0.999 is never reached" in r.message]  # ends at 6/15
    assert len(note) == 1 and note[0].levelno == logging.INFO  # the preset's decay: not the user's doing
    assert trainer.step_index == 3 and len(seen) == 3
    folder = tmp_path / "run"
    assert (folder / "config.json").is_file()
    assert CheckpointDir(folder / "checkpoints").latest().step == 3  # the stop is checkpointed too
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["2", "3"]


def test_sample_grid_stacks_one_step_rows_over_two_step_rows() -> None:
    model = ConsistencyModel.from_config(preset("digits").replace(model_channels=8)).eval()
    image = sample_grid(model, RunConfig(out="unused"))
    width, height = 8 * SAMPLE_SEEDS_PER_ROW, 2 * (2 * 8) + 2  # two rows of 8x8 per schedule, a 2-pixel gap
    scale = 320 // width
    assert image.size == (width * scale, height * scale)


def test_resume_needs_the_same_number_of_ranks(tmp_path: Path) -> None:
    run = Run(RunConfig(out=str(tmp_path)), tmp_path, None, CheckpointDir(tmp_path), None, DistInfo())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^--resume: the checkpoint was written by 2 ranks, this job has 1;"):
        run.resume_from({"world_size": 2})


def test_a_decay_the_user_set_and_the_warmup_never_reaches_is_a_warning(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    cfg = RunConfig(out=str(tmp_path / "run"), steps=2, save_every=2, ema_decay=0.99, **TINY)
    with caplog.at_level(logging.INFO, logger="training.run"):
        train(cfg, explicit={"ema_decay"})
    note = [r for r in caplog.records if "--ema-decay 0.99 is never reached" in r.message]
    assert len(note) == 1 and note[0].levelno == logging.WARNING


def test_the_ema_warmup_note_says_when_the_decay_is_reached() -> None:
    note = ema_warmup_note(0.999, 5011)
    assert note is not None
    assert "needs 8,991 steps" in note and f"{ema_decay_at(5010, 0.999):.5f}" in note and "--no-ema-warmup" in note
    assert ema_decay_at(8989, 0.999) < 0.999 == ema_decay_at(8990, 0.999)  # step index 8,990: the 8,991st step
    assert ema_warmup_note(0.999, 8990) is not None
    assert ema_warmup_note(0.999, 8991) is None
    assert ema_warmup_note(0.9, 100) is None
