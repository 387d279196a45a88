"""The served models by name: checkpoint metadata, schedules, engine, and how a request becomes a Job.

Models come only from local safetensors files, or diffusers pipeline folders whose weights are safetensors
(converted in memory by models.convert), named in the settings (CM_MODELS, or the embedded default); nothing
here is reachable from an endpoint, so no request can make the server load a file. Nothing is unpickled.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import models
from models import checkpoint, convert
from models.checkpoint import CheckpointMeta, LoadedCheckpoint
from models.config import ModelConfig
from models.sampling import validate_sigmas

from .engine import Engine, resolve_device
from .errors import InvalidRequest, UnknownModel
from .scheduler import Job
from .settings import DEFAULT_MODEL_NAME, Settings

logger = logging.getLogger("cmserve.registry")

EMBEDDED_DEFAULT = Path(models.__file__).resolve().parent / "pretrained" / "digits.safetensors"
PIXELS_PER_REQUEST = 1 << 20  # default image budget of a request: 64 at 64×64 (the cap), 16 at 256×256


def default_max_images(image_size: int, cap: int) -> int:
    """Images per request for a model of this size when CM_MAX_IMAGES_PER_REQUEST is not set: about a megapixel
    (a 256×256 PNG is ~16× a 64×64 one to encode and send), never more than `cap`."""
    return max(1, min(cap, PIXELS_PER_REQUEST // (image_size * image_size)))


class ModelFilesError(ValueError):
    """A configured model file that does not exist; raised before the server starts."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path


def model_specs(settings: Settings) -> list[ModelSpec]:
    """The models to serve: CM_MODELS, or the embedded default digits model when it is empty."""
    if settings.models:
        return [ModelSpec(name, Path(path)) for name, path in settings.models.items()]
    return [ModelSpec(DEFAULT_MODEL_NAME, EMBEDDED_DEFAULT)]


def check_model_files(settings: Settings) -> list[ModelSpec]:
    """Fail early, with a clear message, when a configured model file is missing or is a denoiser."""
    specs = model_specs(settings)
    if not settings.models and not EMBEDDED_DEFAULT.is_file():
        raise ModelFilesError(
            f"no model to serve: CM_MODELS is empty and the embedded default checkpoint {EMBEDDED_DEFAULT} "
            "does not exist; set CM_MODELS=name=/path/to/file.safetensors (train and export one with "
            "python -m training.train / training.export)"
        )
    missing = [f"{s.name}={s.path}" for s in specs if not (s.path.is_file() or s.path.is_dir())]
    if missing:
        raise ModelFilesError(f"CM_MODELS names files that do not exist: {', '.join(missing)}")
    for spec in specs:
        if spec.path.is_file():
            try:
                meta = checkpoint.read_meta_file(spec.path)
            except checkpoint.CheckpointError:
                continue  # a broken file is reported when it is loaded, and the others are served
            check_kind(spec, meta.config)
    return specs


def check_kind(spec: ModelSpec, cfg: ModelConfig) -> None:
    """Only consistency models are served: a denoiser (training --recipe edm) needs a Heun sampler we do not run."""
    if cfg.kind != "consistency":
        raise ModelFilesError(
            f"model {spec.name}: {spec.path} is an EDM denoiser (config kind {cfg.kind!r}), not a consistency model, "
            "and cannot be served; tune or distil one from it (python -m training.train --recipe ect --init FILE, "
            "or --recipe cd --teacher-model FILE) and serve that"
        )


@dataclass
class ServedModel:
    """A loaded checkpoint ready to serve: its engine, metadata and per-step schedules."""

    name: str
    engine: Engine | None  # None in a front-end process (CM_FRONTENDS > 1): the engine process holds it
    meta: CheckpointMeta
    path: Path
    sha256: str
    max_steps: int
    max_images_per_request: int = 64  # largest n of a request for this model (see `default_max_images`)
    engines: list[Engine] = field(default_factory=list)  # one per device (CM_DEVICES), the first being `engine`
    schedules: dict[int, list[float]] = field(init=False)  # steps -> σ schedule, 1 … max_steps

    def __post_init__(self) -> None:
        self.engines = self.engines or ([self.engine] if self.engine is not None else [])
        self.schedules = {k: checkpoint.recommended_sigmas(self.meta, k) for k in range(1, self.max_steps + 1)}

    @property
    def config(self) -> ModelConfig:
        return self.meta.config

    @property
    def class_names(self) -> list[str] | None:
        return self.meta.class_names

    def resolve_sigmas(self, steps: int | None, sigmas: Sequence[float] | None) -> list[float]:
        """The request's schedule: explicit sigmas (checked) or the recommended one for `steps` (default 1)."""
        if sigmas is not None:
            if len(sigmas) > self.max_steps:
                raise InvalidRequest(
                    f"sigmas has {len(sigmas)} values; at most {self.max_steps} steps are allowed (CM_MAX_STEPS)",
                    field="sigmas",
                )
            try:
                return validate_sigmas(sigmas, self.config.sigma_min, self.config.sigma_max)
            except ValueError as e:
                raise InvalidRequest(f"sigmas: {e}", field="sigmas") from None
        steps = 1 if steps is None else steps
        if not 1 <= steps <= self.max_steps:
            raise InvalidRequest(f"steps must be 1…{self.max_steps} (CM_MAX_STEPS), got {steps}", field="steps")
        return self.schedules[steps]

    def resolve_class_label(self, label: int | str | None) -> int | None:
        """A class index from an index or a class name; None means: draw it from each image's seed."""
        if label is None:
            return None
        num = self.config.num_classes
        if not num:
            raise InvalidRequest(f"model {self.name!r} is unconditional; omit class_label", field="class_label")
        if isinstance(label, str):
            names = self.class_names or []
            if label in names:
                return names.index(label)
            if label.isascii() and label.isdigit() and not names:  # "7"; not "²" or "①", which int() refuses
                label = int(label)
            else:
                allowed = names or list(range(num))
                raise InvalidRequest(f"class_label {label!r} is not one of {allowed}", field="class_label")
        if not 0 <= label < num:
            raise InvalidRequest(f"class_label must be 0…{num - 1} or a class name, got {label}", field="class_label")
        return label

    def check_images(self, n: int) -> None:
        """A request may ask this model for at most max_images_per_request images."""
        if n > self.max_images_per_request:
            size = self.config.image_size
            raise InvalidRequest(f"n must be 1…{self.max_images_per_request} for model {self.name!r} ({size}×{size} "
                                 f"images; CM_MAX_IMAGES_PER_REQUEST sets it for every model), got {n}", field="n")

    def make_job(self, *, seed: int, n: int, sigmas: list[float], class_label: int | None, deadline: float,
                 **how: Any) -> Job:
        """Image i of the job uses seed + i; the engine thread draws the noise (models.sampling.image_noise).
        `how`: the Job fields of an edit or an interpolation (task, edit, noised_start, interpolation)."""
        return Job(model=self.name, sigmas=sigmas, seed=seed, n=n, class_label=class_label, deadline=deadline, **how)


class Registry:
    """Models by name; the first one (or CM_DEFAULT_MODEL) answers requests that name none."""

    def __init__(self, default: str) -> None:
        self.default = default
        self._models: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def get(self, name: str | None) -> ServedModel:
        key = name or self.default
        try:
            return self._models[key]
        except KeyError:
            raise UnknownModel(f"unknown model {key!r}; served models: {sorted(self._models)}", field="model") from None

    def names(self) -> list[str]:
        return list(self._models)

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)


EngineFactory = Callable[..., Engine]


def read_model(path: Path) -> LoadedCheckpoint:
    """A safetensors checkpoint, or a diffusers folder with safetensors weights converted in memory (no pickle)."""
    if path.is_dir():
        return convert.load_folder(path, device="cpu")
    return checkpoint.load(path, device="cpu")


def max_images_for(settings: Settings, image_size: int) -> int:
    """CM_MAX_IMAGES_PER_REQUEST where it is set; else the default for the model's image size."""
    if "max_images_per_request" in settings.model_fields_set:
        return settings.max_images_per_request
    return default_max_images(image_size, settings.max_images_per_request)


def load_model(spec: ModelSpec, settings: Settings, engine_factory: EngineFactory = Engine) -> ServedModel:
    """Read a checkpoint or folder (no pickle), build an engine on each configured device and warm it up."""
    setting = "CM_DEVICES" if settings.devices else "CM_DEVICE"
    devices = [resolve_device(name, setting) for name in settings.device_names]
    loaded = read_model(spec.path)
    check_kind(spec, loaded.meta.config)
    # The CPU's threads are shared among its engines (cpu,cpu: two engines with half each, as slices or torch
    # threads): OpenMP teams that compete for the same cores stall at their barriers.
    cpu_engines = sum(device.type == "cpu" for device in devices)
    threads = max(1, settings.cpu_threads // max(1, cpu_engines))
    # Each engine its own copy, made before any moves: moving a module to a device moves the module itself.
    copies = [loaded.model, *(copy.deepcopy(loaded.model) for _ in devices[1:])]
    engines = []
    for device, model in zip(devices, copies, strict=True):
        engine = engine_factory(
            model,
            device=device,
            dtype=settings.dtype,
            channels_last=settings.channels_last,
            compile=settings.compile,
            compile_mode=settings.compile_mode,
            trace=settings.trace,
            buckets=settings.buckets,
            cpu_slices=threads if settings.cpu_parallel == "slices" else 1,
            cpu_threads=threads if cpu_engines > 1 else 0,
            batch_invariant=settings.batch_invariant,
        )
        engine.warmup()
        engines.append(engine)
    engine = engines[0]
    logger.info(
        "model %s ready: %s (sha256 %s…) on %s, %s, %s, buckets %s%s",
        spec.name, spec.path, loaded.sha256[:12], ", ".join(str(device) for device in devices), settings.dtype,
        "compiled" if engine.compiled else "traced" if engine.traced else "eager", engine.buckets,
        f", batches sliced over {engine.cpu_slices} threads" if engine.cpu_slices > 1 else "",
    )
    return ServedModel(
        name=spec.name,
        engine=engine,
        meta=loaded.meta,
        path=spec.path,
        sha256=loaded.sha256,
        max_steps=settings.max_steps,
        max_images_per_request=max_images_for(settings, loaded.meta.config.image_size),
        engines=engines,
    )
