"""The hybrid path end to end: a tiny EDM pretraining run, a tiny ECT run initialised from its run folder, the ECT
run exported and served by `python -m service`, which returns an image; the EDM denoiser itself is refused.

Every step is the real command in its own process; the models are narrow and the runs a few steps long.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models import checkpoint
from service.schemas import GenerateResponse
from tests.e2e.test_whole_product import run_cli
from tests.integration.conftest import REPO, decode_b64, reference_images, server_process

TINY = ["--preset", "digits", "--batch", "16", "--save-every", "10", "--sample-every", "0", "--log-every", "5",
        "--device", "cpu"]  # fmt: skip
SEED, LABEL = 11, 4


def metrics_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(300)
def test_edm_then_ect_then_export_and_serve(tmp_path: Path) -> None:
    edm_run, ect_run = tmp_path / "edm", tmp_path / "ect"
    edm_file, ect_file = tmp_path / "edm.safetensors", tmp_path / "ect.safetensors"

    run_cli("training.train", "--out", str(edm_run), "--recipe", "edm", "--model-channels", "8", "--steps", "10", *TINY)
    run_cli("training.export", str(edm_run), "--out", str(edm_file))
    assert checkpoint.load(edm_file).meta.config.kind == "denoiser"

    run_cli("training.train", "--out", str(ect_run), "--recipe", "ect", "--init", str(edm_run), "--steps", "10", *TINY)
    rows = metrics_rows(ect_run)
    assert [(r["step"], r["images"]) for r in rows] == [("5", "80"), ("10", "160")] and float(rows[-1]["elapsed_s"]) > 0
    run_cli("training.export", str(ect_run), "--out", str(ect_file))
    ect = checkpoint.load(ect_file)
    assert ect.meta.config.kind == "consistency" and ect.meta.config.model_channels == 8
    assert ect.meta.provenance["recipe_name"] == "ect" and ect.meta.schedules[1] == [80.0]

    # The denoiser itself is not a consistency model: the service refuses to start on it, in one line.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CM_MODELS": f"edm={edm_file}"}
    refused = subprocess.run([sys.executable, "-m", "service"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert f"{edm_file} is an EDM denoiser" in refused.stderr and "not a consistency model" in refused.stderr

    with server_process(CM_MODELS=f"ect={ect_file}", CM_MAX_BATCH="4", CM_BATCH_BUCKETS="1,2,4") as server:
        with server.client() as client:
            response = client.post("/v1/generate", json={"model": "ect", "n": 1, "steps": 1, "seed": SEED,
                                                          "class_label": LABEL})  # fmt: skip
            assert response.status_code == 200, response.text
            doc = GenerateResponse.model_validate(response.json())
        image = decode_b64(doc.images[0].b64)
        assert image.shape == (8, 8, 1) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, reference_images(ect_file, SEED, 1, [80.0], labels=[LABEL])[0])
        assert server.proc.poll() is None, server.tail()
