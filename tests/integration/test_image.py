"""The image itself: built from the Dockerfile and run (deploy/image.sh, also `make image`).

Where no Docker engine runs (CI), the script builds with buildah on a Debian base that debootstrap makes from
Debian's archive and runs the image's entry command with `buildah run --isolation chroot`; .ci/install-tools
installs both. On a laptop with none of Docker, Podman or buildah the build test is skipped; under CI it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "image.sh"
BUILD_S = 1200  # a fresh machine: debootstrap, the pinned wheels, the layers; a rerun takes well under a minute


def engine_works(tool: str) -> bool:
    path = shutil.which(tool)
    if not path:
        return False
    try:
        return subprocess.run([path, "info"], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def builder() -> str | None:
    """The builder deploy/image.sh picks here, or None when it has none it can use."""
    for engine in ("docker", "podman"):
        if engine_works(engine):
            return engine
    sbin = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    if shutil.which("buildah") and shutil.which("debootstrap", path=sbin) and os.geteuid() == 0:
        return "buildah"
    return None


def test_image_script_is_an_executable_bash_script_behind_make_image() -> None:
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^image:.*\n\tdeploy/image\.sh$", makefile, re.M), "`make image` runs deploy/image.sh"


def test_build_inputs_stay_out_of_the_image() -> None:
    """pip's CA bundle is a build secret of the pip step, and the torch wheel folder a build-time mount."""
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "RUN --mount=type=secret,id=pip-cert" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith(("COPY", "ADD")):
            assert "cert" not in line and "wheels" not in line.lower(), line
    script = SCRIPT.read_text()
    assert '--secret "id=pip-cert,src=$pip_cert"' in script
    assert "--build-arg TORCH_WHEELS=/mnt" in script and ":/mnt:ro" in script


@pytest.mark.timeout(BUILD_S + 60)
def test_image_builds_serves_and_drains(tmp_path: Path) -> None:
    tool = builder()
    require_tool("an image builder: buildah + debootstrap as root (Debian packages), or a Docker/Podman engine", tool)
    env = {**os.environ, "CMSERVE_IMAGE_OUT": str(tmp_path), "CMSERVE_IMAGE_BUILDER": str(tool)}
    log = tmp_path / "image.log"
    with log.open("w") as out:
        try:
            result = subprocess.run(
                [str(SCRIPT)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=out, text=True, timeout=BUILD_S
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"deploy/image.sh ran over {BUILD_S} s:\n" + log.read_text()[-6000:])
    assert result.returncode == 0, log.read_text()[-6000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"image ok: builder={tool} "), summary
    print(summary)  # the timings, in the pytest output (-s) and CI's log on failure

    stop_s = float(re.search(r"stop_s=([\d.]+)", summary).group(1))  # type: ignore[union-attr]
    assert stop_s <= 10, "exit after SIGTERM within CM_DRAIN_S"
    with Image.open(tmp_path / "generated.png") as image:
        assert image.size == (8, 8), "the embedded digits model makes 8x8 images"
    assert (tmp_path / "service.log").read_text().strip(), "the service logged"
