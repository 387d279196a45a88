"""DDP on CPU: two gloo ranks train a few steps through the real training entry point and stay in sync."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from training.run import train
from training.state import CheckpointDir, load_state
from training.train import resolve

STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """One rank, set up exactly as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    argv = ["--out", f"{folder}/run", "--model-channels", "8", "--steps", str(STEPS), "--batch", "16"]
    argv += ["--dropout", "0.1", "--save-every", "3", "--sample-every", "0", "--log-every", "3", "--device", "cpu"]
    cfg, resume, explicit = resolve(argv)
    seen: list[tuple[int, float]] = []
    trainer = train(cfg, resume, explicit, on_step=lambda r: seen.append((r.n_k, float(r.loss))))
    torch.save(
        {"student": trainer.student.state_dict(), "ema": trainer.ema.state_dict(), "seen": seen},
        f"{folder}/rank{rank}.pt",
    )


def test_two_gloo_ranks_stay_in_sync(tmp_path: Path) -> None:
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("student", "ema"):
        for name, value in ranks[0][key].items():
            assert torch.equal(value, ranks[1][key][name]), f"{key}.{name} differs between ranks"
    n_per_rank = [[n for n, _ in r["seen"]] for r in ranks]
    assert n_per_rank[0] == n_per_rank[1] == [11, 21, 41, 81, 161, 321]  # N(k) for K = 6: K' = 1
    losses = [[loss for _, loss in r["seen"]] for r in ranks]
    assert losses[0] != losses[1]  # each rank trains on its own half of the global batch and its own noise
    state = load_state(CheckpointDir(tmp_path / "run" / "checkpoints").latest().state)
    assert state["step"] == STEPS and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # every rank's RNG state is kept
    for name, value in state["student"].items():
        assert torch.equal(value, ranks[0]["student"][name])
