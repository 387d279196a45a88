"""The whole product end to end: train a few dozen steps with the training CLI, export the run, serve that
file next to the embedded default model with `python -m service`, and generate from both over HTTP.

Every step is the real command in its own process; the only thing shrunk is the trained model (narrow, few
steps) so that the walk takes seconds. The embedded default checkpoint must exist: the product ships it.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from models import checkpoint
from service.schemas import GenerateResponse, ModelsResponse
from tests.integration.conftest import REPO, decode, decode_b64, reference_images, server_process

DEFAULT_CHECKPOINT = REPO / "models" / "pretrained" / "digits.safetensors"
TRAIN_STEPS = 40
MID_SIGMA = 1.5  # not the training default, so the served 2-step schedule proves it came from the export
SEED = 2024
LABEL = 3
TRAIN_FLAGS = [
    "--preset", "digits", "--steps", str(TRAIN_STEPS), "--batch", "16", "--model-channels", "8",
    "--save-every", "20", "--sample-every", "0", "--log-every", "10", "--device", "cpu", "--mid-sigma", str(MID_SIGMA),
]
CLI_TIMEOUT_S = 180.0


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` from the repository root; fails the test with its stderr when it exits non-zero."""
    # One OpenMP thread: on 2 cores shared with a server and other work, OpenMP barriers stall a 2-thread
    # run (about a hundred times slower per step).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S
    )
    assert result.returncode == 0, f"python -m {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def generate(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    response = client.post("/v1/generate", json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response


def check_model_info(info: Any, loaded: checkpoint.LoadedCheckpoint, name: str, default: bool) -> None:
    """GET /v1/models shows the checkpoint's own metadata."""
    meta, cfg = loaded.meta, loaded.meta.config
    assert (info.name, info.default, info.preset) == (name, default, meta.preset)
    assert info.image_shape == list(cfg.image_shape)
    assert (info.num_classes, info.class_names) == (cfg.num_classes, meta.class_names)
    assert (info.sigma_min, info.sigma_max) == (cfg.sigma_min, cfg.sigma_max)
    assert info.training_step == meta.training_step
    assert info.checkpoint_sha256 == loaded.sha256
    for steps, sigmas in meta.schedules.items():
        if steps <= info.max_steps:
            assert info.recommended_schedules[str(steps)] == sigmas, f"{name}: schedule for {steps} steps"


def generate_from(client: httpx.Client, name: str, path: Path, sigmas: list[float]) -> np.ndarray:
    """JSON and raw PNG from one model: the right shape, the same seed gives the same image, and it is
    exactly what models.sampling makes from that checkpoint. Returns the first image."""
    shape = tuple(checkpoint.load(path).meta.config.image_shape)  # (C, H, W)
    body = {"model": name, "n": 2, "steps": 2, "seed": SEED, "class_label": LABEL}
    doc = GenerateResponse.model_validate(generate(client, body).json())
    assert (doc.model, doc.seed, doc.sigmas) == (name, SEED, sigmas)
    images = [decode_b64(image.b64) for image in doc.images]
    assert [(i.index, i.seed, i.class_label, i.mime) for i in doc.images] == [
        (0, SEED, LABEL, "image/png"), (1, SEED + 1, LABEL, "image/png")]
    for image in images:
        assert image.dtype == np.uint8 and image.shape == (shape[1], shape[2], shape[0]), image.shape

    again = GenerateResponse.model_validate(generate(client, body).json())
    for first, second in zip(images, again.images, strict=True):
        np.testing.assert_array_equal(decode_b64(second.b64), first, err_msg=f"{name}: same seed, other image")

    raw = generate(client, {**body, "n": 1}, Accept="image/png")
    assert raw.headers["content-type"] == "image/png"
    headers = raw.headers
    assert (headers["x-model"], headers["x-seed"], headers["x-class-label"]) == (name, str(SEED), str(LABEL))
    assert [float(s) for s in raw.headers["x-sigmas"].split(",")] == sigmas
    np.testing.assert_array_equal(decode(raw.content), images[0], err_msg=f"{name}: raw PNG differs from JSON")

    expected = reference_images(path, SEED, 2, sigmas, labels=[LABEL, LABEL])
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image, expected[i], err_msg=f"{name}: not what models.sampling makes")
    return images[0]


@pytest.mark.timeout(300)
def test_train_export_serve_next_to_the_default_and_generate_from_both(tmp_path: Path) -> None:
    assert DEFAULT_CHECKPOINT.is_file(), (
        f"the embedded default checkpoint {DEFAULT_CHECKPOINT} does not exist; the product ships it "
        "(train and export it as the README says)"
    )
    run, mine = tmp_path / "run", tmp_path / "mine.safetensors"

    run_cli("training.train", "--out", str(run), *TRAIN_FLAGS)
    with (run / "metrics.csv").open(newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [10, 20, 30, 40]
    run_cli("training.export", str(run), "--out", str(mine))
    ours = checkpoint.load(mine)
    assert ours.meta.training_step == TRAIN_STEPS and ours.meta.config.model_channels == 8
    assert ours.meta.schedules == {1: [80.0], 2: [80.0, MID_SIGMA]}
    assert ours.meta.class_names == [str(d) for d in range(10)] and ours.meta.provenance["steps"] == TRAIN_STEPS
    default = checkpoint.load(DEFAULT_CHECKPOINT)

    with server_process(
        CM_MODELS=f"digits={DEFAULT_CHECKPOINT},mine={mine}", CM_MAX_BATCH="8", CM_BATCH_BUCKETS="1,2,4,8",
    ) as server, server.client() as client:
        models = ModelsResponse.model_validate(client.get("/v1/models").json())
        assert models.default_model == "digits" and [m.name for m in models.models] == ["digits", "mine"]
        check_model_info(models.models[0], default, "digits", default=True)
        check_model_info(models.models[1], ours, "mine", default=False)

        two_step = {info.name: info.recommended_schedules["2"] for info in models.models}
        assert two_step["mine"] == [80.0, MID_SIGMA]
        from_default = generate_from(client, "digits", DEFAULT_CHECKPOINT, two_step["digits"])
        from_mine = generate_from(client, "mine", mine, two_step["mine"])
        assert not np.array_equal(from_default, from_mine), "two different models gave the same image"

        unnamed = generate(client, {"seed": SEED, "steps": 2, "class_label": LABEL}).json()
        assert unnamed["model"] == "digits"
        np.testing.assert_array_equal(decode_b64(unnamed["images"][0]["b64"]), from_default)
        assert server.proc.poll() is None, server.tail()
