"""What the benchmarks share: a server process on a free port, wrk load, /metrics, models to measure, results.

Every script runs from the repository root as a module (`python -m bench.load`), so `bench`, `models` and
`service` import without touching sys.path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models import checkpoint
from models.config import preset
from models.consistency import ConsistencyModel
from service.registry import EMBEDDED_DEFAULT

REPO = Path(__file__).resolve().parents[1]
WRK_SCRIPT = REPO / "bench" / "wrk" / "post.lua"
WRK_RANDOM_SCRIPT = REPO / "bench" / "wrk" / "random.lua"  # each request one of several bodies, drawn at random


# ---------------------------------------------------------------------- arguments and results


def int_list(text: str) -> list[int]:
    """argparse type of a comma-separated list of integers such as `1,4,16`."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,4,16") from None


def write_json(path: Path, data: Any) -> None:
    """Write a run's figures as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def machine(device: torch.device) -> str:
    """One line naming the device, threads, load and torch version, for the head of a run's output."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    with suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average {load:.2f} "
            f"(torch {torch.__version__})")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- models to measure


def random_model(preset_name: str) -> ConsistencyModel:
    """A preset with trained-like random weights: no zero-initialised layers, no denormals; same cost per image."""
    torch.manual_seed(0)
    model = ConsistencyModel.from_config(preset(preset_name))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return model


def random_checkpoint(preset_name: str, folder: Path) -> Path:
    """random_model saved as a checkpoint file, loaded by the service exactly as a user's file."""
    return checkpoint.save(folder / f"{preset_name}-random.safetensors", random_model(preset_name), preset=preset_name)


def default_checkpoint(folder: Path) -> tuple[Path, str]:
    """The embedded default model, or random digits weights (same cost per image) where it is missing."""
    if EMBEDDED_DEFAULT.is_file():
        return EMBEDDED_DEFAULT, "embedded default (trained)"
    return random_checkpoint("digits", folder), "digits preset, random weights (the embedded default is missing)"


def evaluation_inputs(loaded: checkpoint.LoadedCheckpoint, b: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                           torch.Tensor | None]:
    """Arguments of one Engine.evaluate of `b` images (labels only for a class-conditional model)."""
    config = loaded.meta.config
    labels = torch.zeros(b, dtype=torch.long) if config.num_classes else None
    return torch.randn(b, *config.image_shape), torch.full((b,), 80.0), labels


# ---------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; a process that exits first is an error showing its log's end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before it was ready; its log ({log}) ends:\n"
                             f"{log_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not ready within {timeout:.0f} s; the server's log is {log}")


@contextmanager
def process(argv: list[str], env: Mapping[str, str], ready_url: str, log: Path, cwd: Path = REPO,
            timeout: float = 180.0) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, its output in `log`, ready once `ready_url` answers 200; SIGTERM (then kill) at exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_ready(ready_url, proc, log, timeout)
            yield proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_workers(log: Path, workers: int, log_level: str, timeout: float = 180.0) -> None:
    """/readyz answers once the first worker is ready: with several, wait for each one's "ready" log line."""
    if workers == 1 or log_level not in ("debug", "info"):
        return
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count("ready: serving") < workers:
        if time.monotonic() > deadline:
            print(f"note: not every one of the {workers} workers logged ready within {timeout:.0f} s")
            return
        time.sleep(0.1)


@dataclass(frozen=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    log: Path  # its stdout and stderr


@contextmanager
def service(settings: Mapping[str, str], log: Path, *, cwd: Path = REPO, argv: list[str] | None = None,
            inherit_settings: bool = False, timeout: float = 180.0) -> Iterator[Server]:
    """`python -m service` (or `argv`, run from `cwd`) on a free port with `settings`, once every worker is ready.

    The caller's own CM_ variables are dropped unless `inherit_settings`, so that a stray setting in the shell
    cannot change what is measured; CM_MODELS defaults to the embedded default model."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if inherit_settings or not k.startswith("CM_")}
    env.setdefault("CM_MODELS", f"digits={EMBEDDED_DEFAULT}")
    env.update(settings)
    env["CM_PORT"] = str(port)
    url = f"http://127.0.0.1:{port}"
    with process(argv or [sys.executable, "-m", "service"], env, url + "/readyz", log, cwd, timeout) as proc:
        processes = max(int(env.get("CM_WORKERS", "1")), int(env.get("CM_FRONTENDS", "1")))
        wait_workers(log, processes, env.get("CM_LOG_LEVEL", "info"))
        yield Server(url, proc, log)


# ---------------------------------------------------------------------- the HTTP-alone ceiling


def fixed_png() -> bytes:
    """The 8x8 grey PNG the bare endpoints answer with (a digits image's size)."""
    import numpy as np

    from service.encode import encode_png

    return encode_png(np.full((8, 8, 1), 128, dtype=np.uint8))


def bare_app() -> Any:
    """FastAPI answering POST /v1/generate with a fixed PNG: what HTTP alone costs (a uvicorn factory)."""
    from fastapi import FastAPI
    from starlette.responses import Response

    png = fixed_png()
    app = FastAPI()

    @app.post("/v1/generate")
    async def generate() -> Response:
        return Response(png, media_type="image/png")

    return app


def serve_bare(port: int, workers: int) -> None:
    """bare_app under uvicorn: `workers` processes on one socket (an import string makes that possible)."""
    import uvicorn

    uvicorn.run("bench.harness:bare_app", factory=True, workers=workers, app_dir=str(REPO), host="127.0.0.1",
                port=port, log_level="warning", access_log=False)


# ---------------------------------------------------------------------- wrk


@dataclass
class WrkRun:
    """One wrk process: `connections` closed-loop clients POSTing `body` to `path`."""

    body: dict[str, Any]
    connections: int
    stats: dict[str, float] = field(default_factory=dict)  # bench/wrk/post.lua's WRK_JSON line
    path: str = "/v1/generate"  # or /v1/edit
    bodies: list[dict[str, Any]] | None = None  # each request draws one of these at random (random.lua)

    @property
    def requests_per_s(self) -> float:
        return self.stats["requests"] / (self.stats["duration_us"] / 1e6)

    @property
    def errors(self) -> int:
        keys = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
        return int(sum(self.stats[k] for k in keys))

    def latency(self, *percentiles: int) -> str:
        """'1-step 2.1 / 5.9' (ms at the given percentiles, of 50, 95 and 99), with errors if any."""
        cells = " / ".join(f"{self.stats[f'p{p}_us'] / 1e3:.1f}" for p in percentiles)
        errors = f" ({self.errors} errors)" if self.errors else ""
        task = f"{self.body['task']} " if "task" in self.body else ""
        steps = "/".join(str(b.get("steps", 1)) for b in self.bodies) if self.bodies else self.body.get("steps", 1)
        return f"{task}{steps}-step {cells}{errors}"


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")


def start_wrk(url: str, run: WrkRun, duration: float) -> subprocess.Popen[str]:
    env = {**os.environ, "WRK_BODY": json.dumps(run.body)}
    script = WRK_SCRIPT
    if run.bodies:
        env["WRK_BODIES"] = "\n".join(json.dumps(body) for body in run.bodies)
        script = WRK_RANDOM_SCRIPT
    seconds = max(1, round(duration))
    argv = ["wrk", "-t1", f"-c{run.connections}", f"-d{seconds}s", "--timeout", "60s", "-s", str(script),
            url + run.path]
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_wrk(proc: subprocess.Popen[str], run: WrkRun) -> None:
    out, _ = proc.communicate()
    line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{out}")
    run.stats = json.loads(line.removeprefix("WRK_JSON "))


def drive(url: str, runs: list[WrkRun], duration: float) -> None:
    """Run the wrk processes at the same time."""
    procs = [start_wrk(url, run, duration) for run in runs]
    for proc, run in zip(procs, runs, strict=True):
        finish_wrk(proc, run)


def warm_up(url: str, body: dict[str, Any] | None = None, connections: int = 4) -> None:
    """One second of load before the measured one: first requests pay for lazy set-up."""
    drive(url, [WrkRun(body or {"n": 1, "steps": 1}, connections)], 1.0)


# ---------------------------------------------------------------------- /metrics


def scrape(url: str) -> dict[str, float]:
    """Sum of every cmserve_ sample by name (labels dropped)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("cmserve_"):
                totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def images_per_evaluation(before: dict[str, float], after: dict[str, float]) -> float:
    """Mean images per network evaluation between two scrapes."""
    count = after["cmserve_batch_size_count"] - before["cmserve_batch_size_count"]
    images = after["cmserve_batch_size_sum"] - before["cmserve_batch_size_sum"]
    return images / count if count else 0.0


# ---------------------------------------------------------------------- the access log


def log_offset(log: Path) -> int:
    """Where the server's log ends now (its lines from here on are a scenario's)."""
    try:
        return log.stat().st_size
    except OSError:
        return 0


def latencies_by_steps(log: Path, offset: int, path: str = "/v1/generate") -> dict[int, list[float]]:
    """Milliseconds of the successful requests to `path` whose access-log lines were written after `offset`,
    by step count: the server's own clock, from a request's arrival to its answer (wrk's figures are per wrk
    process, whatever step count each request had)."""
    by_steps: dict[int, list[float]] = {}
    with log.open("rb") as f:
        f.seek(offset)
        for line in f:
            if b'"msg":"request"' not in line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue  # a line cut by the end of the read
            if doc.get("path") == path and doc.get("status") == 200 and "steps" in doc:
                by_steps.setdefault(int(doc["steps"]), []).append(float(doc["duration_ms"]))
    return by_steps


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`, nan when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


# ---------------------------------------------------------------------- scenarios

MIX = "mix"  # half the connections 1-step, half 4-step
RANDOM = "random"  # every connection sends 1- and 4-step requests, each request's drawn at random
MIXED_STEPS = (1, 4)  # the step counts of MIX and RANDOM
TASKS = ("generate", "inpaint", "both")  # both: half the connections generate, half inpaint, same steps


def inpaint_body(n: int, steps: int, shape: tuple[int, ...] = (1, 8, 8)) -> dict[str, Any]:
    """A /v1/edit request: regenerate the lower half of a fixed image of the model's shape (C, H, W)."""
    import base64

    import numpy as np

    from service.encode import encode_png

    c, h, w = shape
    image = np.random.default_rng(0).integers(0, 256, (h, w, c), dtype=np.uint8)
    return {"task": "inpaint", "image": base64.b64encode(encode_png(image)).decode(), "box": [0, h // 2, w, h],
            "n": n, "steps": steps}


@dataclass
class Scenario:
    """`concurrency` clients of `n` images at `steps` steps (or MIX), and what one run of it measured."""

    concurrency: int
    n: int
    steps: int | str  # 1, 2, … or MIX
    runs: list[WrkRun] = field(default_factory=list)
    images_per_forward: float = 0.0
    task: str = "generate"  # one of TASKS (edits with a step count, not MIX)
    image_shape: tuple[int, ...] = (1, 8, 8)  # of the served model, for edit requests
    by_steps: dict[int, list[float]] = field(default_factory=dict)  # the server's latencies (ms) by step count

    @property
    def name(self) -> str:
        task = "" if self.task == "generate" else f" {self.task}"
        return f"c={self.concurrency:<3d} n={self.n:<2d} steps={self.steps}{task}"

    def plan(self) -> list[WrkRun]:
        if self.task != "generate":
            assert isinstance(self.steps, int), "an edit scenario has a step count"
            edit = WrkRun(inpaint_body(self.n, self.steps, self.image_shape), self.concurrency, path="/v1/edit")
            if self.task == "inpaint":
                return [edit]
            half = self.concurrency // 2
            edit.connections = half
            return [WrkRun({"n": self.n, "steps": self.steps}, half), edit]
        if self.steps == MIX:
            half = self.concurrency // 2
            return [WrkRun({"n": self.n, "steps": k}, half) for k in MIXED_STEPS]
        if self.steps == RANDOM:
            return [WrkRun({"n": self.n}, self.concurrency, bodies=[{"n": self.n, "steps": k} for k in MIXED_STEPS])]
        return [WrkRun({"n": self.n, "steps": self.steps}, self.concurrency)]

    @property
    def images_per_s(self) -> float:
        return sum(r.requests_per_s * r.body["n"] for r in self.runs)

    @property
    def mean_steps(self) -> float:
        if self.steps == RANDOM:  # the step counts of the requests answered, from the server's log
            counts = {k: len(v) for k, v in self.by_steps.items()}
            total = sum(counts.values())
            return sum(k * c for k, c in counts.items()) / total if total else sum(MIXED_STEPS) / len(MIXED_STEPS)
        done = [(r.requests_per_s * r.body["n"], r.body["steps"]) for r in self.runs]
        total = sum(images for images, _ in done)
        return sum(images * steps for images, steps in done) / total if total else 1.0


def run_scenario(url: str, scenario: Scenario, duration: float, log: Path | None = None) -> None:
    """Drive the scenario's wrk processes for `duration` s; its runs and images per evaluation are filled in, and
    with the server's `log` (at CM_LOG_LEVEL info) its latencies by step count."""
    before = scrape(url)
    offset = log_offset(log) if log else 0
    scenario.runs = scenario.plan()
    drive(url, scenario.runs, duration)
    scenario.images_per_forward = images_per_evaluation(before, scrape(url))
    if log:
        time.sleep(0.2)  # the last lines leave the server with its next turn of the event loop
        scenario.by_steps = latencies_by_steps(log, offset)
