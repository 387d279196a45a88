"""Helpers for service tests: a tiny checkpoint, the app in-process, and a real `python -m service` process."""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models import checkpoint
from models.config import preset
from models.consistency import ConsistencyModel
from models.sampling import sample, to_uint8
from service.app import create_app
from service.engine import Engine
from service.settings import Settings
from tests.conftest import randomize

REPO = Path(__file__).resolve().parents[2]
CLASS_NAMES = [str(d) for d in range(10)]
TINY = preset("digits").replace(model_channels=16, num_groups=4)
SERVER_START_S = 120.0  # torch import + load + warm-up, on 2 busy cores


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A class-conditional tiny digits checkpoint with random weights (so every parameter matters)."""
    torch.manual_seed(0)
    model = randomize(ConsistencyModel.from_config(TINY), seed=3)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    return checkpoint.save(path, model, preset="digits", class_names=CLASS_NAMES, training_step=7)


@pytest.fixture(scope="session")
def unconditional_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    model = randomize(ConsistencyModel.from_config(TINY.replace(num_classes=0)), seed=4)
    path = tmp_path_factory.mktemp("models") / "uncond.safetensors"
    return checkpoint.save(path, model, schedules={2: [80.0, 0.5]})


@functools.lru_cache(maxsize=4)
def _load(path: Path) -> ConsistencyModel:
    return checkpoint.load(path).model


def reference_images(path: Path, seed: int, n: int, sigmas: list[float], labels: list[int] | None = None) -> np.ndarray:
    """What models.sampling.sample makes for these seeds: (n, H, W, C) uint8."""
    model = _load(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server on 2 cores; and no OpenMP stalls when other work shares the CPU
    try:
        return to_uint8(sample(model, [seed + i for i in range(n)], sigmas, class_labels=labels))
    finally:
        torch.set_num_threads(threads)


def decode_b64(b64: str) -> np.ndarray:
    return decode(base64.b64decode(b64))


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (H, W, C) uint8."""
    array = np.asarray(Image.open(io.BytesIO(data)))
    return array[..., None] if array.ndim == 2 else array


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}, parsed by prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ---------------------------------------------------------------------- engines for fault injection


class Gate:
    """Holds evaluations at the device while closed; tells when one is waiting there."""

    def __init__(self, closed: bool = False) -> None:
        self._open = threading.Event()
        self.waiting = threading.Event()
        if not closed:
            self._open.set()

    def close(self) -> None:
        self.waiting.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def pass_through(self) -> None:
        if not self._open.is_set():
            self.waiting.set()
            assert self._open.wait(60), "gate never opened"


class GatedEngine(Engine):
    """The real engine, which waits at a gate before each network evaluation."""

    def __init__(self, *args: Any, gate: Gate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        self.gate.pass_through()
        return super()._forward(x, sigma, labels)


class OOMAboveEngine(Engine):
    """The real engine with the injected failure: CUDA out-of-memory for batches larger than `limit`."""

    instances: ClassVar[list[OOMAboveEngine]] = []

    def __init__(self, *args: Any, limit: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit = limit
        self.sizes: list[int] = []
        OOMAboveEngine.instances.append(self)

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        self.sizes.append(x.shape[0])
        return super()._forward(x, sigma, labels)


def gated(gate: Gate) -> Callable[..., Engine]:
    return lambda model, **kw: GatedEngine(model, gate=gate, **kw)


# ---------------------------------------------------------------------- the app in-process


def app_settings(models: dict[str, Path], **overrides: Any) -> Settings:
    base: dict[str, Any] = {"models": models, "max_batch": 8, "batch_buckets": [1, 2, 4, 8], "encode_threads": 1}
    return Settings(**{**base, **overrides})


@asynccontextmanager
async def running_app(
    settings: Settings, engine_factory: Callable[..., Engine] = Engine, wait_ready: bool = True
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(settings, engine_factory)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cmserve", timeout=60) as client:
            if wait_ready:
                await app.state.service.wait_settled()
                assert app.state.service.ready, app.state.service.failure
            yield app, client


# ---------------------------------------------------------------------- a real server process


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    logs: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    port: int | None = None
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.raw.append(line.rstrip("\n"))
                with contextlib.suppress(json.JSONDecodeError):
                    self.logs.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_log(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = SERVER_START_S) -> dict[str, Any]:
        """The first log record matching `predicate`, waiting for it (fails if the process exits first)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = next((r for r in self.logs if predicate(r)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader_alive():  # timed out, or the output ended: the process exited
                    break
                self._cond.wait(min(left, 1.0))
        pytest.fail(f"server log never showed the expected record; exit code {self.proc.poll()}\n{self.tail()}")

    def _reader_alive(self) -> bool:
        return self._reader is not None and self._reader.is_alive()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.raw[-lines:])

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def metrics(self) -> dict:
        return metric_samples(httpx.get(self.url + "/metrics", timeout=30).text)

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


def server_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("CM_")}
    env.update({"CM_HOST": "127.0.0.1", "CM_PORT": "0", "CM_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1"})
    env.update(settings)
    return env


def quick_server_env(port: int, checkpoint: Path, **settings: str) -> dict[str, str]:
    """server_env for a small CPU server that warms up quickly (few batch buckets), quiet logs, short drain."""
    return server_env(CM_PORT=str(port), CM_MODELS=f"digits={checkpoint}", CM_DEVICE="cpu",
                      CM_BATCH_BUCKETS="1,2,4,8,16", CM_MAX_BATCH="16", CM_DRAIN_S="5", CM_LOG_LEVEL="warning",
                      **settings)


@contextmanager
def server_process(wait_ready: bool = True, **settings: str) -> Iterator[ServerProcess]:
    """`python -m service` on a free loopback port with these CM_ settings; stopped (SIGKILL at worst) after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=REPO, env=server_env(**settings),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    server = ServerProcess(proc)
    server._reader = threading.Thread(target=server._read, daemon=True)
    server._reader.start()
    try:
        if wait_ready:
            server.port = server.wait_log(lambda r: r.get("msg") == "listening")["port"]
            server.wait_log(lambda r: str(r.get("msg", "")).startswith("ready: serving"))
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        server._reader.join(10)  # type: ignore[union-attr]
