"""Checkpoints of a run: the model file (EMA weights, models/ format) plus the training state beside it.

A run folder's `checkpoints/` holds pairs `step-K.safetensors` + `step-K.state.pt` and `latest.json`,
which names the newest complete pair. Every file is written atomically (temporary file, fsync,
rename), and `latest.json` moves only after both files of the new pair are complete, so killing the
process at any instant leaves the previous checkpoint loadable. The state file is our own dict of
tensors and numbers, written with torch.save and read back with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from models.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

STATE_FORMAT = "cmserve-train-state"
STATE_VERSION = 1
POINTER = "latest.json"


# --- RNG states -----------------------------------------------------------------------------------


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's torch CPU (and CUDA device), NumPy and Python RNG states, as tensors and numbers."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))


def gather_rng(device: torch.device, world_size: int) -> list[dict[str, Any]]:
    """Every rank's RNG states, in rank order (a collective: call it on all ranks)."""
    mine = capture_rng(device)
    if world_size == 1:
        return [mine]
    everyone: list[Any] = [None] * world_size
    dist.all_gather_object(everyone, mine)
    return everyone


# --- the checkpoint folder ------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointRef:
    step: int
    model: Path  # EMA weights, models/ format (safetensors)
    state: Path  # training state (torch.save of tensors and numbers)


class CheckpointDir:
    """The `checkpoints/` folder of a run: save pairs atomically, find the newest complete one."""

    def __init__(self, folder: Path, keep: int = 2) -> None:
        self.folder = Path(folder)
        self.keep = max(1, keep)

    def paths(self, step: int) -> CheckpointRef:
        stem = f"step-{step:08d}"
        return CheckpointRef(step, self.folder / f"{stem}.safetensors", self.folder / f"{stem}.state.pt")

    def latest(self) -> CheckpointRef | None:
        """The pair `latest.json` names, or None when the run has no complete checkpoint yet."""
        pointer = self.folder / POINTER
        if not pointer.is_file():
            return None
        try:
            doc = json.loads(pointer.read_text())
            ref = self.paths(int(doc["step"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{pointer} is unreadable ({e}); remove it to resume from scratch") from None
        for path in (ref.model, ref.state):
            if not path.is_file():
                raise ValueError(f"{pointer} names step {ref.step} but {path.name} is missing")
        return ref

    def save(self, step: int, write_model: Callable[[Path], object], state: dict[str, Any]) -> CheckpointRef:
        """Write the model, then the state, then move `latest.json`; prune pairs older than the last `keep`."""
        ref = self.paths(step)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_model(ref.model)  # atomic (models.checkpoint.save)
        atomic_write_bytes(ref.state, state_bytes(state))
        atomic_write_bytes(self.folder / POINTER, json.dumps({"step": step}).encode())
        self.prune()
        return ref

    def steps_on_disk(self) -> list[int]:
        steps = []
        for p in self.folder.glob("step-*.state.pt"):
            with contextlib.suppress(ValueError):
                steps.append(int(p.name[len("step-") : -len(".state.pt")]))
        return sorted(steps)

    def prune(self) -> None:
        latest = self.latest()
        for step in self.steps_on_disk()[: -self.keep]:
            if latest is not None and step == latest.step:
                continue
            ref = self.paths(step)
            for path in (ref.model, ref.state):
                path.unlink(missing_ok=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files a killed save left behind (never a final name)."""
        stale = [p for p in self.folder.glob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale


def state_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, buf)
    return buf.getvalue()


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state with `weights_only=True` (never retried without it)."""
    try:
        state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
    except Exception as e:  # any failure means the file is not our training state
        raise ValueError(f"{path}: not a readable training state ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a cmserve training state")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')!r}, this cmserve reads {STATE_VERSION}")
    return state
