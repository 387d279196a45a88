"""The checkpoint file: one .safetensors file, weights plus a JSON config in the header metadata.

Reading never unpickles anything: the header is parsed by hand (bounded, JSON only) before
safetensors maps the tensors, and every way a file can be wrong becomes a `CheckpointError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import ModelConfig
from .consistency import ConsistencyModel
from .sampling import default_sigmas

FORMAT = "cmserve-checkpoint"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # our headers are a few hundred KB even for ImageNet 64
STORED_DTYPE = torch.float32


class CheckpointError(ValueError):
    """A file that is not a loadable cmserve checkpoint; the message says what is wrong with it."""


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything the header says about a checkpoint besides the weights."""

    config: ModelConfig
    preset: str | None = None
    class_names: list[str] | None = None
    training_step: int = 0
    schedules: dict[int, list[float]] = field(default_factory=dict)  # steps -> recommended sigmas
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def to_json(self) -> str:
        cfg = self.config
        return json.dumps(
            {
                "format_version": self.format_version,
                "preset": self.preset,
                "architecture": cfg.to_dict(),
                "sigma": {"min": cfg.sigma_min, "max": cfg.sigma_max, "data": cfg.sigma_data, "rho": cfg.rho},
                "data_shape": list(cfg.image_shape),
                "num_classes": cfg.num_classes,
                "class_names": self.class_names,
                "training_step": self.training_step,
                "schedules": {str(k): v for k, v in sorted(self.schedules.items())},
                "provenance": self.provenance,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"config metadata is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise CheckpointError("config metadata is not a JSON object")
        version = doc.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"unsupported checkpoint format version {version!r}; this cmserve reads version {FORMAT_VERSION}"
            )
        try:
            config = ModelConfig.from_dict(doc["architecture"])
            schedules = {int(k): [float(s) for s in v] for k, v in (doc.get("schedules") or {}).items()}
            meta = cls(
                config=config,
                preset=doc.get("preset"),
                class_names=doc.get("class_names"),
                training_step=int(doc.get("training_step", 0)),
                schedules=schedules,
                provenance=dict(doc.get("provenance") or {}),
                format_version=version,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"config metadata is incomplete or invalid: {e}") from None
        if meta.class_names is not None and len(meta.class_names) != config.num_classes:
            raise CheckpointError(f"{len(meta.class_names)} class names for a model with {config.num_classes} classes")
        return meta


@dataclass
class LoadedCheckpoint:
    model: ConsistencyModel
    meta: CheckpointMeta
    path: Path
    sha256: str


def save(
    path: str | os.PathLike[str],
    model: ConsistencyModel,
    *,
    preset: str | None = None,
    class_names: list[str] | None = None,
    training_step: int = 0,
    schedules: dict[int, list[float]] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write weights + config atomically: a temporary file in the same folder, fsync, rename."""
    meta = CheckpointMeta(
        config=model.cfg,
        preset=preset,
        class_names=list(class_names) if class_names is not None else None,
        training_step=training_step,
        schedules=dict(schedules or {}),
        provenance=dict(provenance or {}),
    )
    CheckpointMeta.from_json(meta.to_json())  # refuse to write what we could not read back
    tensors = {k: v.detach().to("cpu", STORED_DTYPE).contiguous() for k, v in model.state_dict().items()}
    blob = st_save(tensors, metadata={"format": FORMAT, "config": meta.to_json()})
    return atomic_write_bytes(Path(path), blob)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a served file must be readable
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(data: bytes, name: str = "file") -> dict[str, Any]:
    """Parse a safetensors header by hand (8-byte little-endian length, then JSON); no pickle path."""
    if len(data) < 8:
        raise CheckpointError(f"{name}: truncated ({len(data)} bytes; a safetensors file starts with 8)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        hint = " (a pickle or zip file, not safetensors?)" if data[:2] in (b"\x80\x02", b"PK") else ""
        raise CheckpointError(f"{name}: header length {n} exceeds the file or the {MAX_HEADER_BYTES}-byte limit{hint}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{name}: header is not JSON; this is not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object; this is not a safetensors file")
    return header


def read_meta(data: bytes, name: str = "file") -> CheckpointMeta:
    """The checkpoint's metadata, from the header alone."""
    header = read_header(data, name)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{name}: a safetensors file, but not a cmserve checkpoint (no '{FORMAT}' metadata)")
    try:
        return CheckpointMeta.from_json(metadata["config"])
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], name: str) -> None:
    """Same names, shapes and dtype as the model built from the config; finite values."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = [f"missing tensors {missing[:5]}"] if missing else []
        parts += [f"unexpected tensors {extra[:5]}"] if extra else []
        raise CheckpointError(f"{name}: weights do not match the config: " + "; ".join(parts))
    for key, ref in expected.items():
        t = tensors[key]
        if t.shape != ref.shape:
            raise CheckpointError(f"{name}: tensor {key!r} has shape {tuple(t.shape)}, config needs {tuple(ref.shape)}")
        if t.dtype != STORED_DTYPE:
            raise CheckpointError(f"{name}: tensor {key!r} has dtype {t.dtype}, checkpoints store {STORED_DTYPE}")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{name}: tensor {key!r} holds NaN or Inf values")


def load(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedCheckpoint:
    """Rebuild the model from the file alone and put it on `device` in `dtype`, in eval mode."""
    path = Path(path)
    name = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from None
    meta = read_meta(data, name)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{name}: malformed safetensors data ({e})") from None
    with torch.device("meta"):
        skeleton = ConsistencyModel.from_config(meta.config)
    check_tensors(tensors, skeleton.state_dict(), name)
    model = ConsistencyModel.from_config(meta.config)
    model.load_state_dict(tensors, strict=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedCheckpoint(model=model, meta=meta, path=path, sha256=hashlib.sha256(data).hexdigest())


def recommended_sigmas(meta: CheckpointMeta, steps: int) -> list[float]:
    """The checkpoint's schedule for `steps`, or the documented default where it recommends none."""
    if steps in meta.schedules:
        return list(meta.schedules[steps])
    return default_sigmas(steps, meta.config.sigma_min, meta.config.sigma_max)
