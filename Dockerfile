# syntax=docker/dockerfile:1
# cmserve image. Two variants, picked by a build argument:
#   docker build -t cmserve:cpu .                           # slim Python 3.11, CPU build of torch
#   docker build --build-arg VARIANT=cuda -t cmserve:cuda .  # CUDA runtime base, CUDA build of torch
#   docker run -p 8000:8000 cmserve:cpu                     # serves the embedded digits model
#   make image                                              # builds it (Docker, Podman, or buildah on a
#                                                           # debootstrap base) and checks that it serves
# The entry command below is the one tests/integration/test_prometheus.py parses and starts.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch==2.13.0 on PyPI is built against CUDA 13, so the runtime base is CUDA 13 (host driver >= 580).
# Ubuntu 22.04 is the CUDA base whose own archive still ships Python 3.11 (24.04 has only 3.12).
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu22.04

# ---- base-cpu / base-cuda: a Python 3.11 interpreter at /usr/local/bin/python3 or /usr/bin/python3.11 -----
FROM ${PYTHON_IMAGE} AS base-cpu
ENV PYTHON=/usr/local/bin/python3.11 \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS base-cuda
# gcc, libc6-dev and python3.11-dev are there for CM_COMPILE=true: Triton builds a small C launcher
# against Python.h the first time it compiles a kernel, and fails without a C compiler.
# Apt packages are left unpinned on purpose: Ubuntu's archive drops superseded versions (a pinned one
# stops resolving within weeks), and the CUDA base tag above already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHON=/usr/bin/python3.11 \
    TORCH_INDEX_URL=https://pypi.org/simple

# ---- base: the variant chosen by VARIANT (cpu | cuda) ---------------------------------------------------
# base-${VARIANT} names one of the two stages above, not a registry image, so it has no tag to pin.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# ---- builder: the pinned dependencies in a virtual environment -------------------------------------------
FROM base AS builder
RUN "$PYTHON" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
# torch first, from TORCH_INDEX_URL, at the version requirements.txt pins (the pin never changes):
# - cpu: PyTorch's CPU index holds torch==2.13.0+cpu, a ~200 MB wheel with no CUDA libraries; PyPI's
#   torch==2.13.0 would pull several GB of CUDA wheels that a CPU image never uses.
# - cuda: PyPI's torch==2.13.0 is the CUDA 13 build, with its CUDA libraries as nvidia-* wheels.
# Then the rest of requirements.txt from PyPI; torch is already satisfied, so pip keeps that build.
# Two inputs for a build machine that reaches PyPI only through its own certificate authority and has
# the CPU torch wheel on disk (deploy/image.sh passes both when it finds them; `docker build` needs neither):
# - the build secret pip-cert: that CA bundle, mounted for this step alone, never in a layer of the image;
# - TORCH_WHEELS: a folder holding torch's wheel, bind-mounted for the build alone (`--volume DIR:/mnt:ro`
#   of buildah or podman): torch then comes from it (2.13.0+cpu outranks PyPI's 2.13.0), its dependencies
#   from PyPI.
ARG TORCH_WHEELS=""
RUN --mount=type=secret,id=pip-cert \
    if [ -s /run/secrets/pip-cert ]; then export PIP_CERT=/run/secrets/pip-cert; fi \
    && grep -E '^torch==' /tmp/requirements.txt > /tmp/torch.txt \
    && if [ -n "$TORCH_WHEELS" ]; then pip install --find-links "$TORCH_WHEELS" -r /tmp/torch.txt; \
       else pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt; fi \
    && pip install -r /tmp/requirements.txt

# ---- runtime: the venv, the code, the embedded default model; runs as a non-root user ------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="cmserve" \
      org.opencontainers.image.description="Consistency-model image generation over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.cmserve.variant="${VARIANT}"
# A real home: torch and Triton keep their caches under ~/.cache (torch.compile, CM_COMPILE=true).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/cmserve cmserve
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY models/ /app/models/
COPY service/ /app/service/
# Fail the build, not the first start, if the embedded default model is missing or unreadable.
RUN /opt/venv/bin/python -c "from models.checkpoint import load; load('models/pretrained/digits.safetensors')"
ENV PATH=/opt/venv/bin:$PATH \
    CM_HOST=0.0.0.0 \
    CM_PORT=8000
USER 10001:10001
EXPOSE 8000
# /readyz: 503 until the weights are loaded and warmed up and while draining; urlopen raises on
# anything but 2xx, so the exit status is the health. No curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CM_PORT', '8000'), timeout=4)"]
# Exec form: python is PID 1 and gets SIGTERM itself, so the drain (CM_DRAIN_S) runs on `docker stop`.
ENTRYPOINT ["python", "-m", "service"]
