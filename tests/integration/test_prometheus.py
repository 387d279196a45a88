"""Prometheus scrapes a real service, and every query the deployment ships is asked of it.

The service is started with the Dockerfile's own entry command (`python -m service`, with this
environment's python), so what the image runs is what this test ran. Debian's prometheus binary runs on
loopback with deploy/prometheus/prometheus.yml and alerts.yml, the scrape target rewritten to the
service's port (and the intervals shortened to 1 s so the test waits seconds, not minutes). After a burst
of requests and two scrapes, every PromQL expression of the Grafana dashboard, of the alert rules (whole,
and without their threshold) and of the prometheus-adapter rule is evaluated through the HTTP API and must
parse and return data. The same service is then put behind deploy/nginx/nginx.conf and used through it.
"""

from __future__ import annotations

import base64
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml

from models import checkpoint
from models.config import preset
from models.consistency import ConsistencyModel
from tests.conftest import randomize, require_tool
from tests.integration.conftest import quick_server_env
from tests.integration.test_deploy_files import (
    PROMETHEUS_DIR,
    REPO,
    adapter_query,
    adapter_rules,
    alert_rules,
    dashboard_exprs,
    entry_command,
    healthcheck_command,
    image_tree,
    local_command,
    metric_names,
    nginx_argv,
    nginx_config_for,
    split_threshold,
    system_tool,
    template_queries,
)

CLASS_NAMES = [str(d) for d in range(10)]
READY_TIMEOUT_S = 90.0  # torch import + load + warm-up of every bucket, on 2 busy cores
WAIT_S = 30.0  # longest wait for Prometheus to see something
SCRAPE_INTERVAL = "1s"


@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str

    def tail(self) -> str:
        return f"--- {self.name} log:\n" + self.log.read_text(errors="replace")[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    name: str, argv: list[str], folder: Path, url: str, env: dict[str, str] | None = None, cwd: Path = REPO
) -> Process:
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Process(name, proc, log, url)


def stop(process: Process) -> None:
    if process.proc.poll() is None:
        process.proc.send_signal(signal.SIGTERM)
        try:
            process.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.proc.kill()
            process.proc.wait()


def wait_for(what: str, check: Callable[[], Any], watched: list[Process], timeout: float = WAIT_S) -> Any:
    """Poll `check` until it returns something truthy; separate processes offer no event to wait on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in watched:
            if p.proc.poll() is not None:
                pytest.fail(f"{p.name} exited with {p.proc.returncode} while waiting for {what}\n{p.tail()}")
        try:
            found = check()
        except httpx.TransportError:
            found = None
        if found:
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n" + "\n".join(p.tail() for p in watched))


# ---------------------------------------------------------------- Prometheus's HTTP API


def query(prometheus: Process, promql: str) -> list[dict[str, Any]]:
    """An instant query; fails the test with Prometheus's own message if the expression is refused."""
    answer = httpx.get(f"{prometheus.url}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", f"{promql}\n  -> {answer.get('errorType')}: {answer.get('error')}"
    assert answer["data"]["resultType"] == "vector", promql
    return answer["data"]["result"]


def has_data(result: list[dict[str, Any]]) -> bool:
    """A non-empty result with at least one finite number (a quantile of an idle series is NaN)."""
    return any(math.isfinite(float(r["value"][1])) for r in result)


def scalar(prometheus: Process, promql: str) -> float | None:
    result = query(prometheus, promql)
    return float(result[0]["value"][1]) if result else None


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prometheus")


@pytest.fixture(scope="module")
def image_app(folder: Path) -> Path:
    """The image's /app: only what the Dockerfile copies and .dockerignore lets through."""
    return image_tree(folder / "image")


@pytest.fixture(scope="module")
def service(folder: Path, image_app: Path) -> Iterator[Process]:
    """`python -m service` as the image runs it (its command, in its /app), on a tiny random digits checkpoint."""
    torch.manual_seed(0)
    cfg = preset("digits").replace(model_channels=16, num_groups=4)
    model = randomize(ConsistencyModel.from_config(cfg)).eval()
    ckpt = checkpoint.save(folder / "digits.safetensors", model, preset="digits", class_names=CLASS_NAMES)
    port = free_port()
    argv = local_command(entry_command())
    env = quick_server_env(port, ckpt)  # loopback (the image itself binds 0.0.0.0)
    server = start("service", argv, folder, f"http://127.0.0.1:{port}", env, cwd=image_app)
    try:
        wait_for(
            "/readyz",
            lambda: httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200,
            [server],
            READY_TIMEOUT_S,
        )
        yield server
    finally:
        stop(server)


def prometheus_config(service_port: int, prometheus_port: int, folder: Path) -> Path:
    """deploy/prometheus/prometheus.yml with the cmserve job pointed at the test's service."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = SCRAPE_INTERVAL
    config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    cmserve = jobs["cmserve"]
    assert "dns_sd_configs" in cmserve, "the test rewrites the compose DNS discovery"
    del cmserve["dns_sd_configs"]
    cmserve["static_configs"] = [{"targets": [f"127.0.0.1:{service_port}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
    for rule_file in config["rule_files"]:  # relative to the config file, as in the compose mount
        (folder / rule_file).write_text((PROMETHEUS_DIR / rule_file).read_text())
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prometheus(service: Process, folder: Path) -> Iterator[Process]:
    binary = system_tool("prometheus")
    require_tool("prometheus (Debian package prometheus)", binary)
    assert binary
    port = free_port()
    config = prometheus_config(int(service.url.rsplit(":", 1)[1]), port, folder)
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={folder / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    server = start("prometheus", argv, folder, f"http://127.0.0.1:{port}")
    try:
        wait_for(
            "Prometheus /-/ready", lambda: httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200, [server]
        )
        wait_for("a first scrape of the service", lambda: scalar(server, 'up{job="cmserve"}') == 1, [server, service])
        yield server
    finally:
        stop(server)


def generate(client: httpx.Client, url: str, body: dict[str, Any], accept: str = "application/json") -> httpx.Response:
    return client.post(f"{url}/v1/generate", json=body, headers={"Accept": accept}, timeout=60)


@dataclass
class Burst:
    images: int  # images generated by the successful requests
    seen_at: float  # Prometheus time of the first scrape that holds all of them


@pytest.fixture(scope="module")
def burst(service: Process, prometheus: Process) -> Burst:
    """Mixed traffic (n, steps, formats, raw PNG, invalid and unknown-model requests), then two scrapes."""
    valid = [
        {"n": (1, 2, 4)[i % 3], "steps": (1, 2)[i % 2], "seed": i, "format": ("png", "png", "jpeg", "webp")[i % 4]}
        for i in range(24)
    ]
    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: generate(client, service.url, b), valid))
        raw = generate(client, service.url, {"n": 1, "seed": 99}, accept="image/png")
        invalid = generate(client, service.url, {"n": 1, "steps": 0})
        unknown = generate(client, service.url, {"model": "no-such-model"})
    assert [a.status_code for a in answers] == [200] * len(valid), [a.text[:200] for a in answers]
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert invalid.status_code == 422 and unknown.status_code == 404
    images = sum(b["n"] for b in valid) + 1

    def scraped() -> float | None:
        result = query(prometheus, f'sum(cmserve_images_generated_total{{job="cmserve"}}) >= {images}')
        return float(result[0]["value"][0]) if result else None

    seen_at = wait_for("a scrape after the burst", scraped, [service, prometheus])
    # One more scrape, so that series born in the burst (e.g. code="422") hold two samples and rate() sees them.
    wait_for(
        "a second scrape after the burst",
        lambda: (scalar(prometheus, 'timestamp(up{job="cmserve"})') or 0) > seen_at,
        [service, prometheus],
    )
    return Burst(images, seen_at)


# ---------------------------------------------------------------- the service is the image's command


def test_service_runs_the_image_entry_command_on_the_image_files(service: Process, image_app: Path) -> None:
    assert service.proc.args == local_command(entry_command())
    assert httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200
    # The same interpreter, environment and folder import the packages from the image's copy, not the
    # repository (which the venv also holds as an editable install).
    where = subprocess.run(
        [sys.executable, "-c", "import models, service; print(models.__file__); print(service.__file__)"],
        cwd=image_app,
        env=quick_server_env(0, image_app),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert [Path(p).parent.parent for p in where.stdout.split()] == [image_app, image_app], where.stdout


def test_image_healthcheck_passes_on_the_ready_service_and_fails_on_nothing(service: Process) -> None:
    argv = local_command(healthcheck_command())
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    port = service.url.rsplit(":", 1)[1]
    ok = subprocess.run(argv, env={**env, "CM_PORT": port}, capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr.decode()
    down = subprocess.run(argv, env={**env, "CM_PORT": str(free_port())}, capture_output=True, timeout=30, check=False)
    assert down.returncode != 0, "the health check passed with no server behind it"


# ---------------------------------------------------------------- every shipped query against the live data


def test_prometheus_scrapes_the_burst(prometheus: Process, burst: Burst) -> None:
    total = scalar(prometheus, 'sum(cmserve_images_generated_total{job="cmserve"})')
    assert total is not None and total >= burst.images
    assert scalar(prometheus, 'cmserve_ready{job="cmserve"}') == 1


def test_every_dashboard_query_returns_data(prometheus: Process, burst: Burst) -> None:
    empty = [f"{title}: {expr}" for title, expr in dashboard_exprs() if not has_data(query(prometheus, expr))]
    assert not empty, "dashboard queries with no data after the burst:\n" + "\n".join(empty)


def test_dashboard_variables_find_their_labels(prometheus: Process, burst: Burst) -> None:
    for variable, metric, label in template_queries():
        values = {r["metric"].get(label) for r in query(prometheus, metric)} - {None}
        assert values, f"dashboard variable ${variable}: label_values({metric}, {label}) has no values"


def test_every_alert_expression_parses_and_its_query_returns_data(prometheus: Process, burst: Burst) -> None:
    failures = []
    for rule in alert_rules():
        whole = query(prometheus, rule["expr"])  # parses and evaluates (empty when healthy)
        assert isinstance(whole, list)
        below, comparison = split_threshold(rule["expr"])
        if not has_data(query(prometheus, below)):
            failures.append(f"{rule['alert']}: no data for `{below.strip()}` (its threshold `{comparison}` removed)")
    assert not failures, "\n".join(failures)


def test_alert_rules_evaluate_without_errors(prometheus: Process, burst: Burst) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for("a rule evaluation", evaluated, [prometheus])
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, broken
    firing = {r["name"] for r in rules if r["state"] == "firing"}
    assert not firing, f"alerts firing on a healthy service: {firing}"


def test_prometheus_adapter_query_gives_the_queue_depth_per_target(prometheus: Process, burst: Burst) -> None:
    for rule in adapter_rules():
        query(prometheus, rule["seriesQuery"])  # parses (matches only where Kubernetes adds namespace and pod)
        (series,) = metric_names(rule["seriesQuery"])
        result = query(prometheus, adapter_query(rule, series, 'job="cmserve"', "instance"))
        assert has_data(result), f"prometheus-adapter's metricsQuery has no data for {series}"
        assert all(set(r["metric"]) == {"instance"} for r in result), "one value per target, as per pod in k8s"


# ---------------------------------------------------------------- the compose load balancer in front of it


def test_nginx_load_balancer_forwards_to_the_service(service: Process, folder: Path) -> None:
    nginx = system_tool("nginx")
    require_tool("nginx (Debian package nginx-light)", nginx)
    assert nginx
    nginx_folder = folder / "nginx"
    nginx_folder.mkdir()
    port = free_port()
    conf = nginx_config_for(int(service.url.rsplit(":", 1)[1]), port, nginx_folder)
    argv = nginx_argv(nginx, conf)
    argv[-1] += " daemon off;"
    lb = start("nginx", argv, nginx_folder, f"http://127.0.0.1:{port}")
    try:
        wait_for("nginx /readyz", lambda: httpx.get(f"{lb.url}/readyz", timeout=2).status_code == 200, [lb, service])
        body = {"n": 2, "steps": 2, "seed": 1234}
        with httpx.Client() as client:
            direct, proxied = generate(client, service.url, body), generate(client, lb.url, body)
            too_big = client.post(
                f"{lb.url}/v1/generate",
                content=b"{" + b" " * (1 << 20) + b"}",  # over the service's cap, under nginx's
                headers={"Content-Type": "application/json"},
                timeout=30,
            )
        assert direct.status_code == proxied.status_code == 200, proxied.text[:300]
        images = [[base64.b64decode(i["b64"]) for i in r.json()["images"]] for r in (direct, proxied)]
        assert images[0] == images[1], "the same seed gives the same images through the load balancer"
        assert too_big.status_code == 413
        assert too_big.headers["content-type"].startswith("application/json"), "the service's 413, not nginx's page"
    finally:
        stop(lb)
