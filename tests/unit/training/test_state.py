"""Training-state files: RNG round trips, atomic checkpoint pairs, a failed or killed save, weights_only loads."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from training import state as st

ROOT = Path(__file__).resolve().parents[3]


def write_model(payload: bytes):  # the model-file writer CheckpointDir.save calls (a real atomic write)
    return lambda path: st.atomic_write_bytes(path, payload)


def test_rng_states_round_trip() -> None:
    saved = st.capture_rng(torch.device("cpu"))
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(1))
    st.restore_rng(saved, torch.device("cpu"))
    second = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(1))
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1]) and np.array_equal(first[3], second[3])
    assert first[2] == second[2]


def test_rng_state_survives_a_weights_only_round_trip(tmp_path: Path) -> None:
    np.random.randn(1)  # leaves a cached Gaussian in NumPy's state
    ckpts = st.CheckpointDir(tmp_path)
    ckpts.save(1, write_model(b"m"), {"rng": [st.capture_rng(torch.device("cpu"))]})
    expected = torch.rand(2), np.random.randn(2), random.random()
    loaded = st.load_state(ckpts.latest().state)
    st.restore_rng(loaded["rng"][0], torch.device("cpu"))
    assert torch.equal(torch.rand(2), expected[0])
    assert np.array_equal(np.random.randn(2), expected[1]) and random.random() == expected[2]


def test_save_writes_a_pair_then_moves_latest_and_prunes(tmp_path: Path) -> None:
    ckpts = st.CheckpointDir(tmp_path, keep=2)
    assert ckpts.latest() is None
    for step in (10, 20, 30):
        ckpts.save(step, write_model(f"model {step}".encode()), {"step": step, "w": torch.full((2,), float(step))})
    ref = ckpts.latest()
    assert ref.step == 30 and ref.model.read_bytes() == b"model 30"
    assert torch.equal(st.load_state(ref.state)["w"], torch.full((2,), 30.0))
    assert ckpts.steps_on_disk() == [20, 30]
    assert not list(tmp_path.glob(".*.tmp"))


class HalfWriter:
    """A file object that writes half of what it is given, then fails like a full disk."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(28, "No space left on device (injected)")

    def __getattr__(self, name: str):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.mark.parametrize("failing_file", ["model", "state"])
def test_a_save_that_fails_mid_write_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_file: str
) -> None:
    ckpts = st.CheckpointDir(tmp_path)
    ckpts.save(1, write_model(b"model 1"), {"w": torch.ones(1000)})
    real_fdopen = os.fdopen
    calls = {"n": 0}
    fail_at = 1 if failing_file == "model" else 2  # the pair's first or second file

    def fdopen(fd, *args, **kwargs):
        calls["n"] += 1
        f = real_fdopen(fd, *args, **kwargs)
        return HalfWriter(f) if calls["n"] == fail_at else f

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(OSError, match="injected"):
        ckpts.save(2, write_model(b"model 2" * 1000), {"w": torch.zeros(1000)})
    monkeypatch.undo()
    ref = ckpts.latest()
    assert ref.step == 1 and ref.model.read_bytes() == b"model 1"
    assert torch.equal(st.load_state(ref.state)["w"], torch.ones(1000))
    assert not ckpts.paths(2).state.exists()  # no partial file under a final name
    if failing_file == "model":
        assert not ckpts.paths(2).model.exists()
    else:
        assert ckpts.paths(2).model.read_bytes() == b"model 2" * 1000  # complete, but latest.json never moved
    assert not list(tmp_path.glob(".*.tmp"))


KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from training import state as st

    ckpts = st.CheckpointDir(sys.argv[1])
    ckpts.save(1, lambda p: st.atomic_write_bytes(p, b"model 1"), {"w": torch.ones(4)})
    real_fdopen = os.fdopen

    class DieMidWrite:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            os.fsync(self.f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill, half-way through writing the new model

    os.fdopen = lambda fd, *a, **k: DieMidWrite(real_fdopen(fd, *a, **k))
    ckpts.save(2, lambda p: st.atomic_write_bytes(p, b"model 2" * 1000), {"w": torch.zeros(4)})
    """
)


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(tmp_path)], cwd=ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    ckpts = st.CheckpointDir(tmp_path)
    ref = ckpts.latest()
    assert ref.step == 1 and ref.model.read_bytes() == b"model 1"
    assert torch.equal(st.load_state(ref.state)["w"], torch.ones(4))
    assert not ckpts.paths(2).model.exists() and not ckpts.paths(2).state.exists()
    stale = ckpts.remove_stale_temporaries()  # what the trainer does when it starts again
    assert len(stale) == 1 and stale[0].name.startswith(".step-00000002.safetensors.")
    assert not list(tmp_path.glob(".*.tmp"))


class Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))  # unpickling would create the sentinel file


def test_load_state_refuses_pickled_code(tmp_path: Path) -> None:
    sentinel = tmp_path / "sentinel"
    path = tmp_path / "evil.state.pt"
    torch.save({"format": st.STATE_FORMAT, "version": st.STATE_VERSION, "x": Payload(sentinel)}, path)
    with pytest.raises(ValueError, match="not a readable training state"):
        st.load_state(path)
    assert not sentinel.exists()


def test_load_state_refuses_other_files(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(ValueError, match="not a cmserve training state"):
        st.load_state(path)
    (tmp_path / "latest.json").write_text('{"step": 5}')
    with pytest.raises(ValueError, match="missing"):
        st.CheckpointDir(tmp_path).latest()
