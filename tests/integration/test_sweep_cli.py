"""`python -m training.sweep` end to end on a shrunken digits model: a tiny study's files, and a killed and an
interrupted sweep continued by rerunning the same command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from training import evaluate, sweep

ROOT = Path(__file__).resolve().parents[2]

TINY_SPACE = """
[study]
name = "tiny"
trials = 3
steps = {steps}
report_every = {report_every}
report_samples = 100
eval_samples = 100
startup_trials = 10  # no pruning: every trial runs to the end

[train]
model_channels = 8
batch = 16
log_every = 2
device = "cpu"

[space.lr]
type = "float"
low = 1e-4
high = 1e-2
log = true

[space.huber_c]
type = "float"
low = 1e-3
high = 1e-1
log = true
"""


@pytest.fixture(scope="module")
def classifier_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache folder for the module (the digits classifier is trained once), also for subprocesses."""
    folder = tmp_path_factory.mktemp("cm-cache")
    evaluate._digits_reference.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CM_CACHE_DIR", str(folder))
        yield folder
    evaluate._digits_reference.cache_clear()


def space_file(tmp_path: Path, steps: int, report_every: int) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(TINY_SPACE.format(steps=steps, report_every=report_every))
    return path


def load(study_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}")


def test_a_tiny_sweep_writes_the_database_run_folders_results_and_plots(tmp_path: Path, classifier_cache: Path) -> None:
    out = tmp_path / "study"
    sweep.main([str(space_file(tmp_path, steps=6, report_every=2)), "--out", str(out)])
    trials = load(out).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    for t in trials:
        run = out / "trials" / f"{t.number:04d}"
        assert t.user_attrs["run"] == f"trials/{t.number:04d}" and (run / "config.json").is_file()
        assert (run / "checkpoints" / "step-00000006.safetensors").is_file()
        assert set(t.intermediate_values) == {2, 4}  # the checkpoints before the last
        assert t.value == pytest.approx((t.user_attrs["fd_1step"] + t.user_attrs["fd_2step"]) / 2)
        assert t.user_attrs["train_s"] > 0
    assert len({t.params["lr"] for t in trials}) == 3
    md = (out / "results.md").read_text()
    assert md.count("| COMPLETE |") == 3 and "(best)" in md
    assert len((out / "results.csv").read_text().splitlines()) == 4
    for name in ("history.png", "importances.png", "intermediate.png"):
        assert (out / name).stat().st_size > 0, name

    sweep.main([str(tmp_path / "space.toml"), "--out", str(out)])  # already finished: nothing runs
    assert len(load(out).trials) == 3


def start(space: Path, out: Path, trials: int, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "CM_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "training.sweep", str(space), "--out", str(out), "--trials", str(trials)]
    return subprocess.Popen(
        [*argv, "--heartbeat", "1"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Until `path` exists (the trial is under way); fails if the sweep ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before {path} appeared: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


def test_killed_and_interrupted_sweeps_continue_with_their_finished_trials(
    tmp_path: Path, classifier_cache: Path
) -> None:
    space, out = space_file(tmp_path, steps=60, report_every=20), tmp_path / "study"
    mid_trial = "trials/{:04d}/checkpoints/latest.json"  # step 20 of 60 written: the trial is under way

    # A worker killed outright leaves its trial RUNNING ...
    proc = start(space, out, 2, classifier_cache)
    wait_for(out / mid_trial.format(1), proc)
    proc.kill()
    proc.wait()
    killed_at = time.monotonic()
    trials = load(out).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    first_value, killed_params = trials[0].value, trials[1].params

    # ... until its heartbeat is stale (2 × 1 s; SQLite's clock counts whole seconds): no event to await.
    time.sleep(max(0.0, killed_at + 3.5 - time.monotonic()))
    # The rerun fails it, retries its parameters as a new trial, and goes on; SIGTERM fails the trial it is in.
    proc = start(space, out, 3, classifier_cache)
    wait_for(out / mid_trial.format(3), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, proc.stderr.read()[-3000:]
    trials = load(out).trials
    states = [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]
    assert [t.state for t in trials] == states
    assert trials[0].value == first_value
    assert trials[2].params == killed_params and trials[2].system_attrs["failed_trial"] == 1

    # Rerunning the same command reaches 3 finished trials; the earlier ones are kept.
    proc = start(space, out, 3, classifier_cache)
    assert proc.wait(timeout=180) == 0, proc.stderr.read()[-3000:]
    trials = load(out).trials
    assert [t.state for t in trials] == [*states, TrialState.COMPLETE]
    assert trials[0].value == first_value
    md = (out / "results.md").read_text()
    assert md.count("| COMPLETE |") == 3 and md.count("| FAIL |") == 2
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002", "0003", "0004"]
