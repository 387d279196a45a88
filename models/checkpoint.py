"""The checkpoint file: one .safetensors file, weights plus a JSON config in the header metadata.

Reading never unpickles anything, and checks before it builds or reads: `load` reads the 8-byte length and the
header alone (bounded length and nesting, no NaN/Infinity, no huge numbers, no duplicate keys), checks every
config field's type and range (models.config's limits), the class names, the schedules, and the network the
config implies (parameter count, tensor names, dtypes, shapes, offsets) against the header; only then does it
read the file and let safetensors map the tensors. Every way a file can be wrong becomes a `CheckpointError`
that names the field or tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import ConfigError, ModelConfig, is_int, is_number
from .consistency import ConsistencyModel
from .denoiser import Denoiser
from .sampling import default_sigmas, validate_sigmas

FORMAT = "cmserve-checkpoint"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # our headers are a few hundred KB even for ImageNet 64
MAX_JSON_DEPTH = 32  # ours nest 4 deep (provenance.recipe); deeper is refused before json could recurse
MAX_INT_DIGITS = 18  # offsets and step counts; 400-digit integers are refused, not parsed
MAX_FLOAT_CHARS = 32  # repr() of any double is at most 24 characters
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32; LSUN-256, the largest public consistency model, has 0.4 G
MAX_SCHEDULE_STEPS = 1000  # step counts a checkpoint may recommend schedules for
STORED_DTYPE = torch.float32
STORED_DTYPE_NAME = "F32"  # its safetensors name
META_KEYS = ("format_version", "preset", "architecture", "sigma", "data_shape", "num_classes", "class_names",
             "training_step", "schedules", "provenance")
JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
WRAPPERS: dict[str, type[ConsistencyModel] | type[Denoiser]] = {  # ModelConfig.kind -> what wraps the backbone
    "consistency": ConsistencyModel,
    "denoiser": Denoiser,
}


class CheckpointError(ValueError):
    """A file that is not a loadable cmserve checkpoint; the message says what is wrong with it."""


# ---------------------------------------------------------------------------------------------- bounded JSON


def json_depth(text: str) -> int:
    """Deepest nesting of [ and { outside strings, without recursing (a vectorised running count)."""
    codes = np.frombuffer(JSON_STRING.sub("", text).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    brackets = codes[np.isin(codes, (91, 93, 123, 125))]  # [ ] { }
    steps = np.where(np.isin(brackets, (91, 123)), np.int8(1), np.int8(-1))
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


class OutOfRange:
    """A JSON number we do not represent (NaN, ±Infinity, an overflowing float, a huge integer). Parsing keeps it
    as this marker, which no field check accepts, so the error names the field that holds it."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        digits = self.text.lstrip("-")
        if digits.isdigit():
            return f"an integer of {len(digits)} digits (at most {MAX_INT_DIGITS})"
        return f"{self.text[:24]} (not a finite number)"


def bounded_int(text: str) -> int | OutOfRange:
    return int(text) if len(text.lstrip("-")) <= MAX_INT_DIGITS else OutOfRange(text)


def finite_float(text: str) -> float | OutOfRange:
    value = float(text) if len(text) <= MAX_FLOAT_CHARS else math.inf
    return value if math.isfinite(value) else OutOfRange(text)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise CheckpointError(f"key {twice!r} appears twice in one JSON object")
    return obj


def parse_json(text: str, what: str) -> Any:
    """JSON that cannot exhaust the stack or the CPU: depth bounded before parsing, duplicate keys refused, and
    numbers out of range (NaN, Infinity, 1e999, 400 digits) kept as `OutOfRange` for the field checks to name."""
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{what} nests {depth} levels deep; at most {MAX_JSON_DEPTH}")
    try:
        doc = json.loads(text, parse_constant=OutOfRange, parse_int=bounded_int, parse_float=finite_float,
                         object_pairs_hook=unique_keys)
        json.dumps(doc, ensure_ascii=False, default=repr).encode()  # "\ud800" escapes decode to unencodable text
    except UnicodeEncodeError:
        raise CheckpointError(f"{what} holds a lone surrogate (an \\ud800-\\udfff escape): not Unicode text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})") from None
    except RecursionError:  # json_depth counts what json recurses on; this is only a second guard
        raise CheckpointError(f"{what} nests too deep") from None
    except CheckpointError as e:  # a duplicate key
        raise CheckpointError(f"{what}: {e}") from None
    return doc


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON text: 1 is not true and not 1.0 (Python's == says it is)."""
    return json.dumps(a, sort_keys=True, default=repr) == json.dumps(b, sort_keys=True, default=repr)


def plain_json(value: Any) -> bool:
    """Serialisable as strict JSON: no NaN, no Infinity, no out-of-range marker."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def brief(value: Any, limit: int = 60) -> str:
    """repr() cut short: a message must not echo a megabyte of header back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything the header says about a checkpoint besides the weights; checked when made."""

    config: ModelConfig
    preset: str | None = None
    class_names: list[str] | None = None
    training_step: int = 0
    schedules: dict[int, list[float]] = field(default_factory=dict)  # steps -> recommended sigmas
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        problem = (
            self.class_names_problem()
            or self.schedules_problem()
            or (None if self.preset is None or isinstance(self.preset, str)
                else f"config.preset must be a string or null, got {brief(self.preset)}")
            or (None if is_int(self.training_step) and self.training_step >= 0
                else f"config.training_step must be an integer >= 0, got {brief(self.training_step)}")
            or (None if isinstance(self.provenance, dict) and plain_json(self.provenance)
                else f"config.provenance must be a JSON object of finite values, got {brief(self.provenance)}")
        )
        if problem:
            raise CheckpointError(problem)

    def class_names_problem(self) -> str | None:
        """None, or one distinct non-empty string per class (the service matches names exactly)."""
        names, n = self.class_names, self.config.num_classes
        if names is None:
            return None
        if not isinstance(names, list) or not all(isinstance(s, str) and s for s in names):
            return f"config.class_names must be a list of {n} non-empty strings or null, got {brief(names)}"
        if len(names) != n:
            return f"config.class_names: {len(names)} class names for a model with {n} classes"
        if len(set(names)) != n:
            return "config.class_names must be distinct"
        return None

    def schedules_problem(self) -> str | None:
        """Each `steps` key has `steps` finite σ, strictly decreasing, within (σ_min, σ_max]."""
        if not isinstance(self.schedules, dict):
            return f"config.schedules must be a JSON object of step count -> sigmas, got {brief(self.schedules)}"
        cfg = self.config
        for steps, sigmas in self.schedules.items():
            if not is_int(steps) or not 1 <= steps <= MAX_SCHEDULE_STEPS:
                return f"config.schedules key {brief(steps)} must be a step count 1…{MAX_SCHEDULE_STEPS}"
            if not isinstance(sigmas, list) or len(sigmas) != steps or not all(is_number(s) for s in sigmas):
                return f"config.schedules.{steps} must be a list of {steps} finite numbers, got {brief(sigmas)}"
            try:
                validate_sigmas(sigmas, cfg.sigma_min, cfg.sigma_max)
            except ValueError as e:
                return f"config.schedules.{steps}: {e}"
        return None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def to_json(self) -> str:
        return json.dumps(self.to_doc(), sort_keys=True)

    def to_doc(self) -> dict[str, Any]:
        cfg = self.config
        return {
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
        }

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        """Parse (bounded) and check every field; the message names the first bad one."""
        doc = parse_json(text, "config metadata")
        if not isinstance(doc, dict):
            raise CheckpointError(f"config metadata is not a JSON object, got {brief(doc)}")
        version = doc.get("format_version")
        if not is_int(version) or version != FORMAT_VERSION:
            raise CheckpointError(
                f"unsupported checkpoint format version {brief(version)}; this cmserve reads version {FORMAT_VERSION}"
            )
        unknown = sorted(set(doc) - set(META_KEYS))
        if unknown:
            raise CheckpointError(f"config.{unknown[0]}: unknown key; allowed: {list(META_KEYS)}")
        config = config_from(doc.get("architecture"))
        meta = cls(
            config=config,
            preset=doc.get("preset"),
            class_names=doc.get("class_names"),
            training_step=doc.get("training_step", 0),
            schedules=schedules_from(doc.get("schedules")),
            provenance={} if doc.get("provenance") is None else doc["provenance"],
        )
        written = meta.to_doc()  # the copies of architecture fields must agree with it
        for key in ("sigma", "data_shape", "num_classes"):
            if key in doc and not same_json(doc[key], written[key]):
                raise CheckpointError(f"config.{key} {brief(doc[key])} disagrees with config.architecture "
                                      f"({written[key]})")
        return meta


def config_from(architecture: Any) -> ModelConfig:
    if not isinstance(architecture, dict):
        raise CheckpointError(f"config.architecture must be a JSON object of model config fields, "
                              f"got {brief(architecture)}")
    try:
        return ModelConfig.from_dict(architecture)
    except ConfigError as e:
        raise CheckpointError("; ".join(f"config.architecture.{p}" for p in e.problems)) from None


def schedules_from(schedules: Any) -> dict[int, Any]:
    """JSON's string keys as step counts ("2", not "02", "+2" or "²")."""
    if schedules is None:
        return {}
    if not isinstance(schedules, dict):
        raise CheckpointError(f"config.schedules must be a JSON object of step count -> sigmas, got {brief(schedules)}")
    for key in schedules:
        if not re.fullmatch(r"[1-9][0-9]{0,5}", key):
            raise CheckpointError(f"config.schedules key {brief(key)} must be a step count 1…{MAX_SCHEDULE_STEPS}")
    return {int(k): v for k, v in schedules.items()}


@dataclass
class LoadedCheckpoint:
    model: ConsistencyModel | Denoiser  # as meta.config.kind says
    meta: CheckpointMeta
    path: Path
    sha256: str


def save(
    path: str | os.PathLike[str],
    model: ConsistencyModel | Denoiser,
    *,
    preset: str | None = None,
    class_names: list[str] | None = None,
    training_step: int = 0,
    schedules: dict[int, list[float]] | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write weights + config atomically: a temporary file in the same folder, fsync, rename."""
    if not isinstance(model, WRAPPERS[model.cfg.kind]):  # the file would load as another kind of model
        raise ValueError(f"a {type(model).__name__} cannot be saved with config kind {model.cfg.kind!r}")
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


# ---------------------------------------------------------------------------------------------- the header


def header_length(prefix: bytes, size: int, name: str) -> int:
    """The 8-byte little-endian header length, bounded by the file and MAX_HEADER_BYTES."""
    if size < 8 or len(prefix) < 8:
        raise CheckpointError(f"{name}: truncated ({size} bytes; a safetensors file starts with 8)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or n > size - 8:
        hint = " (a pickle or zip file, not safetensors?)" if prefix[:2] in (b"\x80\x02", b"PK") else ""
        raise CheckpointError(f"{name}: header length {n} exceeds the file or the {MAX_HEADER_BYTES}-byte limit{hint}")
    return n


def parse_header(raw: bytes, name: str) -> dict[str, Any]:
    """The safetensors header JSON (tensor entries and __metadata__), parsed with the bounds of `parse_json`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{name}: header is not JSON; this is not a safetensors file") from None
    header = parse_json(text, f"{name}: header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object; this is not a safetensors file")
    return header


def meta_from_header(header: dict[str, Any], name: str) -> CheckpointMeta:
    """Our metadata: `__metadata__` (a JSON object of strings) with format = FORMAT and a JSON `config`."""
    metadata = header.get("__metadata__")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError(f"{name}: __metadata__ must be a JSON object of strings, got {brief(metadata)}")
    if not metadata or metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{name}: a safetensors file, but not a cmserve checkpoint (no '{FORMAT}' metadata)")
    bad = next((k for k, v in metadata.items() if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{name}: __metadata__.{bad} must be a string, got {brief(metadata[bad])}")
    try:
        return CheckpointMeta.from_json(metadata["config"])
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None


def read_meta(data: bytes, name: str = "file") -> CheckpointMeta:
    """The checkpoint's metadata, from the header alone (`data` may be the whole file or its start)."""
    n = header_length(data[:8], len(data), name)
    return meta_from_header(parse_header(data[8 : 8 + n], name), name)


def read_meta_file(path: str | os.PathLike[str]) -> CheckpointMeta:
    """A checkpoint file's metadata from its header alone (the weights are not read or checked)."""
    name = str(path)
    try:
        with Path(path).open("rb") as f:
            prefix = f.read(8)
            n = header_length(prefix, os.fstat(f.fileno()).st_size, name)
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from None
    return meta_from_header(parse_header(raw, name), name)


def skeleton(cfg: ModelConfig, name: str) -> ConsistencyModel | Denoiser:
    """The network `cfg` implies, on the meta device: names and shapes without memory, its size capped."""
    try:
        with torch.device("meta"):
            model = WRAPPERS[cfg.kind].from_config(cfg)
    except (ValueError, RuntimeError) as e:  # a unet GroupNorm whose width min(num_groups, width/4) does not divide
        raise CheckpointError(f"{name}: config.architecture.num_groups {cfg.num_groups}: the network cannot be "
                              f"built ({e})") from None
    count = sum(t.numel() for t in model.state_dict().values())
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"{name}: config.architecture implies {count:,} parameters; at most {MAX_PARAMETERS:,}")
    return model


def tensor_span(key: str, entry: Any, shape: torch.Size, name: str) -> tuple[int, int]:
    """A header entry's [begin, end) in the data, once its dtype, shape and length are the config's."""
    if not isinstance(entry, dict) or sorted(entry) != ["data_offsets", "dtype", "shape"]:
        raise CheckpointError(f"{name}: tensor {key!r}: header entry must hold dtype, shape and data_offsets, "
                              f"got {brief(entry)}")
    if entry["dtype"] != STORED_DTYPE_NAME:
        raise CheckpointError(f"{name}: tensor {key!r} has dtype {brief(entry['dtype'])}, checkpoints store "
                              f"{STORED_DTYPE} ({STORED_DTYPE_NAME})")
    got = entry["shape"]
    if not isinstance(got, list) or not all(is_int(d) for d in got) or got != list(shape):
        shown = tuple(got) if isinstance(got, list) else got
        raise CheckpointError(f"{name}: tensor {key!r} has shape {brief(shown)}, config needs {tuple(shape)}")
    offsets, size = entry["data_offsets"], shape.numel() * STORED_DTYPE.itemsize
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
            and offsets[0] >= 0 and offsets[1] - offsets[0] == size):
        raise CheckpointError(f"{name}: malformed safetensors data: tensor {key!r} has data_offsets {brief(offsets)}; "
                              f"its {shape.numel()} values need {size} bytes")
    return offsets[0], offsets[1]


def check_header_tensors(header: dict[str, Any], expected: dict[str, torch.Size], data_len: int, name: str) -> None:
    """The header lists exactly the config's tensors, as float32 of their shapes, tiling the data exactly."""
    missing = [k for k in expected if k not in header]
    extra = [k for k in header if k not in expected and k != "__metadata__"]
    if missing or extra:
        parts = [f"missing tensors {missing[:5]}"] if missing else []
        parts += [f"unexpected tensors {extra[:5]}"] if extra else []
        raise CheckpointError(f"{name}: weights do not match the config: " + "; ".join(parts))
    spans = sorted((*tensor_span(key, header[key], shape, name), key) for key, shape in expected.items())
    end = 0
    for begin, stop, key in spans:
        if begin != end:
            raise CheckpointError(f"{name}: malformed safetensors data: tensor {key!r} starts at byte {begin} of the "
                                  f"data, not {end} (a gap or an overlap)")
        end = stop
    if end != data_len:
        raise CheckpointError(f"{name}: malformed safetensors data: the tensors fill {end} bytes, the file holds "
                              f"{data_len} after its header (truncated, or trailing bytes)")


# ---------------------------------------------------------------------------------------------- loading


def read_checked(f: IO[bytes], name: str) -> tuple[CheckpointMeta, ConsistencyModel | Denoiser, bytes]:
    """Header first, everything in it checked; then the whole file, which must still start with that header."""
    st = os.fstat(f.fileno())
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{name}: not a regular file")
    prefix = f.read(8)
    n = header_length(prefix, st.st_size, name)
    raw = f.read(n)
    header = parse_header(raw, name)
    meta = meta_from_header(header, name)
    model = skeleton(meta.config, name)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_header_tensors(header, expected, st.st_size - 8 - n, name)
    f.seek(0)
    data = f.read(st.st_size + 1)
    if len(data) != st.st_size or data[: 8 + n] != prefix + raw:
        raise CheckpointError(f"{name}: the file changed while it was read")
    return meta, model, data


def read_tensors(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """safetensors' own parse of the checked file; finite values only."""
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{name}: malformed safetensors data ({e})") from None
    bad = next((k for k, t in tensors.items() if not torch.isfinite(t).all()), None)
    if bad is not None:
        raise CheckpointError(f"{name}: tensor {bad!r} holds NaN or Inf values")
    return tensors


def load(
    path: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedCheckpoint:
    """Rebuild the model from the file alone and put it on `device` in `dtype`, in eval mode."""
    path = Path(path)
    name = str(path)
    try:
        with path.open("rb") as f:
            meta, model, data = read_checked(f, name)
    except OSError as e:
        raise CheckpointError(f"{name}: cannot read ({e.strerror or e})") from None
    model.load_state_dict(read_tensors(data, name), strict=True, assign=True)  # the meta skeleton takes the tensors
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "a tensor outside the state dict"
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedCheckpoint(model=model, meta=meta, path=path, sha256=hashlib.sha256(data).hexdigest())


def recommended_sigmas(meta: CheckpointMeta, steps: int) -> list[float]:
    """The checkpoint's schedule for `steps`, or the documented default where it recommends none."""
    if steps in meta.schedules:
        return list(meta.schedules[steps])
    return default_sigmas(steps, meta.config.sigma_min, meta.config.sigma_max)
