"""bench.gpu_serve end to end on the CPU: the GPU check's serving table must come out of one run on the lent
machine, so its table, targets and JSON are checked here with the tiny model (no figure is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_serve import parse_args, server_settings
from tests.integration.conftest import REPO


def test_the_table_targets_and_json_of_one_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    argv = [sys.executable, "-m", "bench.gpu_serve", "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
            "--dtype", "fp32", "--concurrency", "1,4", "--n", "1", "--steps", "1", "--duration", "1",
            "--warmup", "0.2", "--clients", "2", "--bare-workers", "1", "--engine-seconds", "0.2", "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    assert "engine alone" in text and "load generator" in text and "targets:" in text
    header = next(line for line in text.splitlines() if line.split()[:3] == ["conc", "n", "steps"])
    for head in ("images/s", "engine", "ratio", "req/s", "client", "p50 ms", "p99 ms", "eval ms", "img/eval"):
        assert head in header
    assert "c=1 n=1 1-step: p50" in text and ("PASS" in text or "MISS" in text)

    result = json.loads(out.read_text())
    assert set(result["engine_alone"]["batches"]) == {"1", "4"}
    assert set(result["load_generator_requests_per_s"]) == {"1", "4"}
    assert [(s["concurrency"], s["n"], s["steps"]) for s in result["scenarios"]] == [(1, 1, 1), (4, 1, 1)]
    for s in result["scenarios"]:
        assert s["requests"] > 0 and s["errors"] == 0
        assert s["served_share"] == pytest.approx(s["images_per_s"] / s["engine_images_per_s"])
        assert s["client_requests_per_s"] > 0 and s["evaluation_ms"] > 0
    assert any(line.startswith("c=1 n=1 1-step") for line in result["targets"])
    assert sum(line.startswith("load generator at c=") for line in result["targets"]) == 2


def test_pass_through_settings(tmp_path: Path) -> None:
    from service.settings import Settings

    args = parse_args(["--compile-mode", "reduce-overhead", "--n", "1,8"])
    assert args.compile and args.n == [1, 8]
    if "compile_mode" not in Settings.model_fields:  # the service must know a setting it is given
        with pytest.raises(SystemExit, match="no CM_COMPILE_MODE setting"):
            server_settings(args, tmp_path / "m.safetensors", "m")
    else:
        settings = server_settings(args, tmp_path / "m.safetensors", "m")
        assert settings["CM_COMPILE_MODE"] == "reduce-overhead" and settings["CM_COMPILE"] == "true"
        assert settings["CM_MAX_IMAGES_PER_REQUEST"] == "8"
    with pytest.raises(SystemExit):
        parse_args(["--compile-mode", "fastest"])
