"""The training command end to end on a shrunken digits model: run folder, exact resume, export, bad flags."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import checkpoint
from training import export, train
from training.state import CheckpointDir, load_state

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--model-channels", "8", "--batch", "16", "--sample-every", "0", "--log-every", "2", "--device", "cpu"]


def run(out: Path, *extra: str) -> None:
    train.main(["--out", str(out), *TINY, *extra])


def cli_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the command expecting a mistake: exit code 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert re.match(r"(python -m training\.train: )?error: ", err[0]), err[0]
    return err[0]


def final_state(out: Path) -> dict:
    return load_state(CheckpointDir(out / "checkpoints").latest().state)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("student", "ema", "teacher"):
        if a[key] is None:
            assert b[key] is None
            continue
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for index, slot in opt_a["state"].items():
        for name, value in slot.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][index][name])), name
    for rank_a, rank_b in zip(a["rng"], b["rng"], strict=True):
        assert torch.equal(rank_a["torch"], rank_b["torch"])


@pytest.mark.parametrize("recipe", ["ict", "ct"])
def test_resume_is_bit_exact(tmp_path: Path, recipe: str) -> None:
    """K steps in one go == K/2 steps, stop, resume for K/2 (dropout on, so RNG states matter)."""
    common = ["--steps", "8", "--save-every", "4", "--recipe", recipe, "--dropout", "0.2"]
    run(tmp_path / "straight", *common)
    run(tmp_path / "halves", *common, "--stop-after", "4")
    assert CheckpointDir(tmp_path / "halves" / "checkpoints").latest().step == 4
    run(tmp_path / "halves", *common, "--resume")
    straight, halves = final_state(tmp_path / "straight"), final_state(tmp_path / "halves")
    assert straight["step"] == 8
    assert_same_training_state(straight, halves)
    rows = (tmp_path / "halves" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,n_k") and [r.split(",")[0] for r in rows[1:]] == ["2", "4", "6", "8"]


def test_run_folder_contents_and_export(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out, "--steps", "4", "--save-every", "2", "--sample-every", "4", "--mid-sigma", "1.5")
    doc = json.loads((out / "config.json").read_text())
    assert (
        doc["run"]["steps"] == 4 and doc["model"]["model_channels"] == 8 and doc["recipe"]["distance"] == "pseudo_huber"
    )
    assert doc["class_names"] == [str(d) for d in range(10)]
    assert (out / "samples" / "step-00000004.png").is_file()
    names = ["latest.json"] + [f"step-0000000{k}.{ext}" for k in (2, 4) for ext in ("safetensors", "state.pt")]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == names

    exported = tmp_path / "digits.safetensors"
    export.main([str(out), "--out", str(exported)])
    ck = checkpoint.load(exported)
    assert ck.meta.class_names == [str(d) for d in range(10)] and ck.meta.training_step == 4
    assert ck.meta.schedules == {1: [80.0], 2: [80.0, 1.5]}
    prov = ck.meta.provenance
    assert prov["recipe_name"] == "ict" and prov["steps"] == 4 and prov["data"] == "digits" and "git_commit" in prov
    ema = final_state(out)["ema"]
    for name, value in ck.model.state_dict().items():
        assert torch.equal(value, ema[name]), name  # the EMA weights, not the student's
    export.main([str(out), "--out", str(exported), "--step", "2", "--mid-sigma", "0.9"])
    again = checkpoint.load(exported).meta
    assert again.training_step == 2 and again.schedules[2] == [80.0, 0.9]


def test_config_file_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text('steps = 2\nlr = 0.0005\nema-decay = 0.5\nrecipe = "ct"\n')
    out = tmp_path / "run"
    train.main(["--config", str(cfg_file), "--out", str(out), *TINY, "--lr", "0.002", "--save-every", "2"])
    saved = json.loads((out / "config.json").read_text())["run"]
    assert (saved["steps"], saved["lr"], saved["ema_decay"], saved["recipe"]) == (2, 0.002, 0.5, "ct")
    for text, message in (
        ('{"steps": "abc"}', "option steps = 'abc' must be of type int"),
        ('{"learning_rate": 0.1}', "unknown options ['learning_rate']"),
        ('{"precision": "fp8"}', "--precision 'fp8' is not one of"),
        ("{not json", "not valid JSON"),
    ):
        (tmp_path / "bad.json").write_text(text)
        assert message in cli_error(capsys, ["--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "other")])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
        (["--batch", "0"], "--batch 0 must be >= 1"),
        (["--ema-decay", "1.5"], "--ema-decay 1.5 must be in [0, 1)"),
        (["--distance", "lpips"], "argument --distance: invalid choice: 'lpips'"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--data", "folder:/does/not/exist"], "--data folder:/does/not/exist: no such folder"),
        (["--resume"], "--resume: {out} holds no checkpoint"),
        (["--config", "/does/not/exist.json"], "--config /does/not/exist.json: cannot read"),
        (["--batch", "15", "--steps", "1"], None),  # fine on one rank
    ],
)
def test_bad_flags_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str | None
) -> None:
    out = tmp_path / "run"
    full = ["--out", str(out), "--model-channels", "8", "--sample-every", "0", "--device", "cpu", *argv]
    if message is None:
        train.main(full)
        return
    assert message.format(out=out) in cli_error(capsys, full)


def test_existing_run_needs_resume_and_resume_may_not_change_the_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    run(out, "--steps", "2", "--save-every", "2")
    assert "already holds a run; pass --resume" in cli_error(capsys, ["--out", str(out), *TINY, "--steps", "2"])
    resumed = ["--out", str(out), *TINY, "--steps", "2", "--lr", "0.5", "--resume"]
    assert "--lr 0.5 differs from the resumed run's 0.001" in cli_error(capsys, resumed)
    run(out, "--steps", "2", "--resume", "--save-every", "1")  # allowed change; nothing left to do


def test_export_mistakes_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        ([str(tmp_path), "--out", str(tmp_path / "x.safetensors")], f"error: RUN_DIR {tmp_path}: no config.json"),
        ([str(tmp_path)], "error: the following arguments are required: --out"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            export.main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and message in err[0]


def test_cli_error_in_a_real_process_is_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "training.train", "--out", str(tmp_path), "--data", "cifar10:/nowhere"]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    expected = "error: --data cifar10:/nowhere: no such folder (expected the extracted cifar-10-batches-py)"
    assert proc.stderr.strip().splitlines() == [expected]
