"""Run folder: config.json round trip, the resume checks, provenance, metrics.csv on resume."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from training import rundir
from training.config import ConfigError, RunConfig, model_config
from training.state import CheckpointDir, atomic_write_bytes


def saved_run(folder: Path, **options) -> RunConfig:
    """A run folder as training leaves it: config.json and one checkpoint pair at step 2."""
    cfg = RunConfig(out=str(folder), model_channels=8, **options)
    ckpts = CheckpointDir(folder / "checkpoints")
    rundir.create(ckpts, cfg, model_config(cfg, cfg.recipe_obj(), 10), [str(d) for d in range(10)])
    ckpts.save(2, lambda path: atomic_write_bytes(path, b"model"), {"step": 2})
    return cfg


def test_create_writes_the_resolved_config_and_read_saved_reads_it(tmp_path: Path) -> None:
    cfg = saved_run(tmp_path / "run", recipe="ct")
    saved, doc = rundir.read_saved(tmp_path / "run")
    assert saved == cfg
    assert doc["model"]["model_channels"] == 8 and doc["recipe"]["distance"] == "l2"
    assert doc["class_names"] == [str(d) for d in range(10)]


def test_create_removes_half_written_checkpoints(tmp_path: Path) -> None:
    stale = tmp_path / "run" / "checkpoints" / ".step-00000004.state.pt.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    saved_run(tmp_path / "run")
    assert not stale.exists()


def test_fresh_folder_starts_fresh_unless_resume_insists(tmp_path: Path) -> None:
    cfg = RunConfig(out=str(tmp_path / "new"))
    assert rundir.prepare(cfg, None, {"out"}) == (cfg, None)
    assert rundir.prepare(cfg, "auto", {"out"}) == (cfg, None)
    with pytest.raises(ConfigError, match=r"^--resume: .*new holds no checkpoint \(use --resume auto"):
        rundir.prepare(cfg, "latest", {"out"})


def test_existing_run_needs_resume(tmp_path: Path) -> None:
    cfg = saved_run(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^--out .*run already holds a run; pass --resume"):
        rundir.prepare(cfg, None, {"out"})


def test_resume_takes_the_saved_config_with_only_the_allowed_changes(tmp_path: Path) -> None:
    cfg = saved_run(tmp_path / "run", lr=0.002)
    asked = RunConfig(out=str(tmp_path / "run"), save_every=7)  # lr left at its default: not explicit
    resumed, state = rundir.prepare(asked, "latest", {"out", "save_every"})
    assert resumed == dataclasses.replace(cfg, save_every=7) and state["step"] == 2
    changed = dataclasses.replace(asked, lr=0.5)
    with pytest.raises(ConfigError, match=re.escape("--lr 0.5 differs from the resumed run's 0.002; a resumed run")):
        rundir.prepare(changed, "latest", {"out", "lr"})


def test_unreadable_checkpoint_pointer_is_a_resume_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(ConfigError, match=r"^--resume: .*latest\.json is unreadable"):
        rundir.prepare(RunConfig(out=str(tmp_path)), "latest", {"out"})


def test_provenance_records_the_recipe_and_budget() -> None:
    prov = rundir.provenance(RunConfig(out="run", recipe="ct", steps=10, data="digits"), step=4)
    assert prov["recipe_name"] == "ct" and prov["recipe"]["teacher"] == "ema"
    assert (prov["steps"], prov["total_steps"], prov["data"]) == (4, 10, "digits") and "git_commit" in prov
    json.dumps(prov)  # stored as JSON in the model file


def test_metrics_log_drops_rows_after_the_resumed_checkpoint(tmp_path: Path) -> None:
    log = rundir.MetricsLog(tmp_path, resume_step=0)
    for step in (2, 4, 6):
        log.write({"step": step, "loss": 1.0, "n_k": 11, "teacher_mu": 0.0, "grad_norm": None,
                   "images_per_s": 1.0, "lr": 0.001, "elapsed_s": 0.1})
    log.close()
    rundir.MetricsLog(tmp_path, resume_step=4).close()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,") and [r.split(",")[0] for r in rows[1:]] == ["2", "4"]
