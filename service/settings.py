"""The service's one `Settings` object: environment variables with the prefix CM_, or a --config file.

Every field below is a documented setting (README "Settings"); unknown CM_ names in a config file are an
error that lists the known ones. Values that parse but are unsafe or inconsistent are refused here, at
start-up, with a message naming the variable, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "CM_"
DEFAULT_MODEL_NAME = "digits"  # the name the embedded default checkpoint is served under
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
DEVICES_ITEM_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+)$")  # an item of CM_DEVICES: a device, never `auto`
MAX_DEVICES = 64  # items of CM_DEVICES (each is an engine thread and a value of the metrics' device label)
SETTING_NAME_PATTERN = re.compile(r"^CM_[A-Z0-9_]{1,64}$")  # names a config file error may quote
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SettingsError(ValueError):
    """Settings that cannot be used; the message names the variable, the value and what is allowed."""


def _split_csv(value: Any) -> Any:
    """'a,b , c' -> ['a', 'b', 'c'] (empty items dropped); lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """cmserve's settings; each field is the environment variable CM_<FIELD NAME IN CAPITALS>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", case_sensitive=False)

    host: str = Field("127.0.0.1", description="Bind address; the container sets 0.0.0.0")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port, logged at start)")
    models: Annotated[dict[str, Path], NoDecode] = Field(
        default_factory=dict,
        description="Models to serve, `name=path,name=path` (local .safetensors files, or diffusers pipeline folders "
        "whose weights are safetensors, converted at load); empty = the embedded default checkpoint "
        "models/pretrained/digits.safetensors, served as `digits`",
    )
    default_model: str = Field("", description="Model for requests that name none; empty = the first of CM_MODELS")
    device: str = Field("auto", description="`auto` (first CUDA device, else CPU), `cpu`, `cuda` or `cuda:N`")
    devices: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Several devices, comma-separated (`cuda:0,cuda:1`; `cpu,cpu` runs two engines on the CPU): each "
        "holds its own copy of every model and has its own engine thread, and a model's batches go to whichever "
        "device is free next, from the model's one queue; empty = CM_DEVICE alone",
    )
    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Network dtype on the device")
    channels_last: bool = Field(False, description="NHWC activations (faster convolutions on recent GPUs)")
    compile: bool = Field(False, description="torch.compile the network, one graph per batch bucket")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile's mode with CM_COMPILE: reduce-overhead (and max-autotune) record a CUDA graph per "
        "batch bucket and replay it with one launch, so that small batches are not bound by kernel launches",
    )
    trace: bool = Field(
        True,
        description="Run the network as a TorchScript trace, checked bit for bit against eager at load (eager if "
        "it differs): it runs without Python's GIL, so HTTP handling no longer stalls it. Ignored with CM_COMPILE",
    )
    batch_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256],
        description="Batch sizes warmed up (and, with CM_COMPILE, compiled; batches are padded up to the next)",
    )
    max_batch: int = Field(256, ge=1, description="Most images in one network evaluation")
    max_wait_ms: float = Field(
        2.0, ge=0, le=1000,
        description="When the device is idle and images arrive faster than this, wait up to this long for a "
        "fuller batch while they keep coming (it ends once none came for 3 of the latest gaps between arrivals, and "
        "for a tenth of an evaluation while clients answered by the latest evaluation have not all sent again). After "
        "an evaluation that answered at least as many images as wait (or fewer, while the clients answered so far "
        "have been sending again: a closed pool of clients), the engine waits for those clients' next requests, up "
        "to this long or an evaluation's time if longer (service/batching.py)",
    )
    schedule: Literal["shortest", "started"] = Field(
        "shortest",
        description="Queue order: `shortest` = images with the fewest evaluations left first (requeued ones first "
        "among equals; an image waiting more than 10 evaluations' time goes before all), `started` = every "
        "requeued image before any new one",
    )
    pipeline: bool = Field(
        True,
        description="On a GPU, finish each batch (wait for it, copy its images out, answer its requests) on a thread "
        "of its own while the engine thread launches the next; false: the engine thread waits for every batch",
    )
    max_queue: int = Field(
        4096, ge=1, description="Most images waiting for the device; a request beyond it gets 503 + Retry-After"
    )
    max_images_per_request: int = Field(64, ge=1, le=4096, description="Largest `n` of a request")
    max_steps: int = Field(8, ge=1, le=64, description="Most sampling steps (`steps`, or values in `sigmas`)")
    request_timeout_s: float = Field(
        30.0, gt=0, description="Deadline from a request's arrival; its unfinished images are dropped, 504"
    )
    drain_s: float = Field(
        20.0, ge=0, description="On SIGTERM, how long in-flight requests may take to finish before exit"
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        repr=False,
        description="Comma-separated keys (16+ characters) for `Authorization: Bearer` on POST /v1/generate; "
        "empty = no authentication",
    )
    max_body_bytes: int = Field(
        1 << 20, ge=256,
        description="Largest request body; beyond it 413. 1 MiB: an edit of a 256×256 RGB PNG (base64, ≤ 263 KB, and "
        "its mask) fits with room to spare",
    )
    max_header_bytes: int = Field(
        16384, ge=1024, le=1 << 20,
        description="Largest request head: the URL and all headers' names and values (4 bytes more each); beyond "
        "it 431 and the connection closes",
    )
    max_headers: int = Field(100, ge=8, le=1000, description="Most headers in a request; beyond it 431")
    read_timeout_s: float = Field(
        10.0, gt=0, le=3600,
        description="Time a request's headers and body may take to arrive, from its first byte (and a new "
        "connection's first byte from its opening); beyond it 408 and the connection closes",
    )
    encode_threads: int = Field(2, ge=1, le=64, description="Threads encoding PNG / JPEG / WebP")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="JSON log lines on stderr at this level (one per request at info)"
    )
    workers: int = Field(
        1, ge=1, le=64,
        description="Server processes sharing the port, each with its own copy of the models, engine thread and "
        "event loop (CPU only: more throughput when HTTP work, not the network, limits a single process)",
    )
    frontends: int = Field(
        1, ge=1, le=64,
        description="Front-end processes sharing the port, doing HTTP, validation, encoding and replies, in front of "
        "one engine process that holds the models, the queue and the devices (so every request shares the same "
        "batches); for GPU servers whose HTTP work, not the device, is the bottleneck. 1 = one process does all",
    )
    torch_threads: int = Field(
        0, ge=0, le=1024,
        description="CPU threads for the network per worker (see CM_CPU_PARALLEL); 0 = the CPUs this process may use "
        "divided by CM_WORKERS (measured best on a dedicated machine; set fewer when other work shares the cores)",
    )
    cpu_parallel: Literal["slices", "operators"] = Field(
        "slices",
        description="How a worker's torch threads share a CPU evaluation: slices = the batch is cut into slices of "
        "at most 24 images (at least one per thread) and each thread evaluates the next with one torch thread (the "
        "threads never wait for each other mid-evaluation: faster when HTTP work shares the cores); operators = "
        "torch's intra-op parallelism inside every operator",
    )
    batch_invariant: bool = Field(
        True,
        description="CPU: compute every image with kernels of the same shape whatever its batch (ATen's image-by-"
        "image convolution instead of oneDNN's, one matrix product per image in linear layers), so that a seed "
        "gives the same pixels alone or in any batch; false = oneDNN, faster at large batches, but a pixel on a "
        "rounding edge may then differ by one level with the batch",
    )
    cpu_affinity: bool = Field(
        True,
        description="With CM_WORKERS > 1, pin each worker to its own share of the usable CPUs (split evenly, in "
        "order), so its engine and event loop keep their caches; false = the OS places them",
    )
    opentelemetry: bool = Field(
        False,
        description="FastAPI's built-in OpenTelemetry spans, metrics and logs for each request, once an "
        "OpenTelemetry provider is configured (off: no per-request check for one; /metrics is unaffected)",
    )
    protocol_fast_path: bool = Field(
        True,
        description="Answer POST /v1/generate in the HTTP protocol itself, below ASGI (the same handler and answers, "
        "less work per request: BENCHMARKS.md); false, or with CM_OPENTELEMETRY: every request goes through "
        "uvicorn's ASGI cycle and FastAPI's route",
    )
    rate_limit_per_key: float = Field(
        0.0, ge=0,
        description="Requests per second per API key (bursts of max(1, rate); without CM_API_KEYS all clients "
        "share one budget; each of CM_WORKERS or CM_FRONTENDS keeps its own), beyond it 429; 0 = off",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _parse_models(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        models: dict[str, str] = {}
        for item in _split_csv(value):
            name, sep, path = item.partition("=")
            name, path = name.strip(), path.strip()
            if not sep or not name or not path:
                raise ValueError(f"CM_MODELS item {item!r} is not name=path (e.g. digits=/srv/digits.safetensors)")
            if name in models:
                raise ValueError(f"CM_MODELS names the model {name!r} twice")
            models[name] = path
        return models

    @field_validator("models")
    @classmethod
    def _check_model_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            if not MODEL_NAME_PATTERN.match(name):
                raise ValueError(f"CM_MODELS model name {name!r} must match {MODEL_NAME_PATTERN.pattern}")
        return value

    @field_validator("batch_buckets", mode="before")
    @classmethod
    def _parse_buckets(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("batch_buckets")
    @classmethod
    def _check_buckets(cls, value: list[int]) -> list[int]:
        if not value or min(value) < 1:
            raise ValueError(f"CM_BATCH_BUCKETS must list positive batch sizes, got {value}")
        return sorted(set(value))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_keys(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        short = [k for k in value if len(k) < 16]
        if short:
            raise ValueError(f"CM_API_KEYS holds {len(short)} key(s) shorter than 16 characters; use long random keys")
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError(f"CM_DEVICE={value!r} is not one of auto, cpu, cuda, cuda:N")
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _parse_devices(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: list[str]) -> list[str]:
        bad = [item for item in value if not DEVICES_ITEM_PATTERN.match(item)]
        if bad:
            raise ValueError(f"CM_DEVICES items {bad} are not one of cpu, cuda, cuda:N")
        if len(value) > MAX_DEVICES:
            raise ValueError(f"CM_DEVICES lists {len(value)} devices; at most {MAX_DEVICES} are allowed")
        if len({item.startswith("cuda") for item in value}) > 1:
            raise ValueError(f"CM_DEVICES mixes the CPU and CUDA devices ({','.join(value)}); the next free device "
                             "takes the next batch, so a CPU would slow a GPU's requests: list one kind")
        gpus = ["cuda:0" if item == "cuda" else item for item in value if item.startswith("cuda")]
        twice = sorted({gpu for gpu in gpus if gpus.count(gpu) > 1})
        if twice:
            raise ValueError(f"CM_DEVICES names {twice} more than once (cuda means cuda:0); list each GPU once")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.max_batch > self.batch_buckets[-1]:
            raise ValueError(
                f"CM_MAX_BATCH={self.max_batch} exceeds the largest of CM_BATCH_BUCKETS {self.batch_buckets}; "
                "add a bucket at least that large or lower CM_MAX_BATCH"
            )
        if self.workers > 1 and self.device.startswith("cuda"):
            raise ValueError(
                f"CM_WORKERS={self.workers} needs CM_DEVICE=cpu (or auto on a machine without CUDA): one process "
                "owns a GPU; run one replica per GPU instead"
            )
        if self.compile_mode != "default" and not self.compile:
            raise ValueError(f"CM_COMPILE_MODE={self.compile_mode} needs CM_COMPILE=true")
        if self.frontends > 1 and self.workers > 1:
            raise ValueError(f"CM_FRONTENDS={self.frontends} and CM_WORKERS={self.workers} are both above 1; set one "
                             "(CM_FRONTENDS keeps one engine process, and one queue, behind every front end)")
        if self.devices and "device" in self.model_fields_set:
            raise ValueError(f"CM_DEVICE={self.device!r} and CM_DEVICES={','.join(self.devices)!r} are both set; "
                             "set one (CM_DEVICES for several devices)")
        if self.workers > 1 and (len(self.devices) > 1 or any(d.startswith("cuda") for d in self.devices)):
            raise ValueError(f"CM_WORKERS={self.workers} with CM_DEVICES={','.join(self.devices)!r}: one process "
                             "owns the devices; use CM_WORKERS=1 with CM_DEVICES")
        names = self.model_names
        if self.default_model and self.default_model not in names:
            raise ValueError(f"CM_DEFAULT_MODEL={self.default_model!r} is not one of the served models {names}")
        return self

    @property
    def model_names(self) -> list[str]:
        """Names of the served models, in CM_MODELS order (the embedded default alone when it is empty)."""
        return list(self.models) if self.models else [DEFAULT_MODEL_NAME]

    @property
    def device_names(self) -> list[str]:
        """The devices to serve on: CM_DEVICES, or CM_DEVICE alone."""
        return self.devices or [self.device]

    @property
    def default_model_name(self) -> str:
        return self.default_model or self.model_names[0]

    @property
    def buckets(self) -> list[int]:
        """The batch buckets the engine uses: up to the first one that holds CM_MAX_BATCH images."""
        used = [b for b in self.batch_buckets if b < self.max_batch]
        return [*used, next(b for b in self.batch_buckets if b >= self.max_batch)]

    @property
    def cpu_threads(self) -> int:
        """Intra-op threads for torch per worker: CM_TORCH_THREADS, or the usable CPUs shared among the workers."""
        if self.torch_threads:
            return self.torch_threads
        return max(1, usable_cpus() // self.workers)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_cpus(index: int, workers: int) -> list[int] | None:
    """Worker `index`'s share of the usable CPUs: the sorted list cut into `workers` consecutive parts whose
    sizes differ by at most one, so every CPU is used (None where the OS gives no affinity API, or there are
    fewer CPUs than workers)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < workers:
        return None
    return cpus[index * len(cpus) // workers : (index + 1) * len(cpus) // workers]


def settings_table() -> str:
    """The README's settings table (Markdown): variable, default, meaning."""
    rows = ["| Variable | Default | Meaning |", "|---|---|---|"]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(str(v) for v in default)
        shown = f"`{default}`" if default not in ("", {}, None) else "(empty)"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {info.description} |")
    return "\n".join(rows)


def load_settings(config_file: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, on top of an optional dotenv-style config file (CM_NAME=value lines).

    Environment variables win over the file; `overrides` (keyword arguments) win over both.
    Any problem becomes a `SettingsError` whose message names each bad variable.
    """
    kwargs: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise SettingsError(f"--config {str(path)!r}: no such file")
        _check_config_keys(path)
        kwargs["_env_file"] = path
    try:
        return Settings(**kwargs, **overrides)
    except ValidationError as e:
        raise SettingsError(_describe(e)) from None


def _check_config_keys(path: Path) -> None:
    """Every key of a config file must be a known CM_ setting (typos would silently fall back to defaults).

    A line is named in the error only by its number, and its name only when it looks like a setting (CM_...):
    a value that runs onto a second line (an API key, say) must never reach the logs.
    """
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, _ = line.removeprefix("export ").partition("=")
        key = name.strip().upper()
        if key in known and sep:
            continue
        if sep and SETTING_NAME_PATTERN.match(key):
            raise SettingsError(f"--config {path}:{lineno}: unknown setting {key!r}; known settings: {sorted(known)}")
        raise SettingsError(f"--config {path}:{lineno}: not a CM_NAME=value line (its text is not shown: it may be "
                            "the rest of a value, such as an API key, that runs onto a second line; each setting "
                            "must be on one line)")


def _describe(error: ValidationError) -> str:
    """One line per problem, naming the CM_ variable."""
    lines = []
    for item in error.errors():
        loc = item.get("loc") or ()
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        if not loc:  # a check across settings: its message names the variables
            lines.append(message)
            continue
        name = ENV_PREFIX + str(loc[0]).upper()
        value = item.get("input")
        shown = "" if name == ENV_PREFIX + "API_KEYS" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{name}: {message}{shown}")
    return "invalid settings: " + "; ".join(lines)
