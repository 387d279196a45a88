"""Property: a mutated checkpoint (config fields, header entries, raw bytes) either loads or raises CheckpointError,
within a second and a bounded amount of memory (issue 20). `-m slow` runs many more examples."""

from __future__ import annotations

import functools
import hashlib
import json
import resource
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.checkpoint import CheckpointError, load, save
from models.config import ModelConfig, preset
from models.consistency import ConsistencyModel

SECONDS = 1.0  # per load
PEAK_BYTES = 64 << 20  # Python and NumPy allocations during one load (tracemalloc); the files are < 1 MB
RSS_GROWTH_KIB = 256 << 10  # and all allocations (torch's too): one load raises the peak RSS by less than this
PLACEHOLDER = '"@@value@@"'

BASES = {
    "unet": (preset("digits").replace(model_channels=16, num_groups=4), [str(i) for i in range(10)]),
    "adm": (
        ModelConfig(backbone="adm", image_channels=3, image_size=16, model_channels=32, channel_mult=(1, 2),
                    num_res_blocks=1, attn_resolutions=(8,), head_channels=16, embedding="positional",
                    num_classes=5, num_groups=8),
        ["cat", "dog", "fox", "owl", "yak"],
    ),
}
ARCH_KEYS = [*ModelConfig().to_dict(), "unknown_field"]
META_PATHS: list[tuple[Any, ...]] = [
    ("format_version",), ("preset",), ("architecture",), ("sigma",), ("sigma", "max"), ("data_shape",),
    ("data_shape", 1), ("num_classes",), ("class_names",), ("class_names", 0), ("training_step",), ("schedules",),
    ("schedules", "1"), ("schedules", "2"), ("schedules", "2", 1), ("schedules", "3"), ("provenance",),
    ("provenance", "seed"), ("extra_key",), *(("architecture", k) for k in ARCH_KEYS),
]
RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 400, "[" * 5000 + "]" * 5000,
              '{"a": ' * 3000 + "1" + "}" * 3000, "0.1" + "0" * 2000 + "1", '"\\ud800"', '["\\udfff", 1]']
EDGE_INTS = [0, 1, -1, 2, 3, 4, 5, 7, 8, 16, 32, 63, 64, 1000, 1024, 2048, 4096, 4097, 200_000, 2**31, 2**40, 2**64]

json_values = st.recursive(
    st.none() | st.booleans() | st.sampled_from(EDGE_INTS) | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
value_texts = json_values.map(lambda v: json.dumps(v)) | st.sampled_from(RAW_TOKENS)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("bases")
    files = {}
    for name, (cfg, class_names) in BASES.items():
        model = ConsistencyModel.from_config(cfg)
        path = save(folder / f"{name}.safetensors", model, preset=name, class_names=class_names, training_step=5,
                    schedules={1: [cfg.sigma_max], 2: [cfg.sigma_max, 0.5]}, provenance={"seed": 0})
        files[name] = path.read_bytes()
        load(path)  # torch's first use of a module type on the meta device costs ~1 s once per process: not timed
    return files


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "mutated.safetensors"


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header_text: str, body: bytes) -> bytes:
    raw = header_text.encode()
    return struct.pack("<Q", len(raw)) + raw + body


def put(doc: Any, path: tuple[Any, ...], delete: bool) -> bool:
    """Set doc at `path` to the placeholder (or delete it); False where the path does not exist."""
    *parents, last = path
    for key in parents:
        in_list = isinstance(doc, list) and isinstance(key, int) and key < len(doc)
        if in_list or (isinstance(doc, dict) and key in doc):
            doc = doc[key]
        else:
            return False
    if isinstance(doc, list) and (not isinstance(last, int) or last >= len(doc)):
        return False
    if delete:
        if isinstance(doc, dict):
            doc.pop(last, None)
        else:
            del doc[last]
    else:
        doc[last] = "@@value@@"
    return True


@st.composite
def config_mutants(draw: st.DrawFn, data: bytes) -> Callable[[], bytes]:
    """The JSON config with one field set to any JSON value or raw token (NaN, 400 digits, deep nesting), or
    deleted."""
    path, delete = draw(st.sampled_from(META_PATHS)), draw(st.integers(0, 9)) == 0
    return functools.partial(mutate_config, data, path, delete, draw(value_texts))


def mutate_config(data: bytes, path: tuple[Any, ...], delete: bool, text: str) -> bytes:
    header, body = split(data)
    doc = json.loads(header["__metadata__"]["config"])
    if not put(doc, path, delete):
        return data
    header["__metadata__"]["config"] = json.dumps(doc).replace(PLACEHOLDER, text)
    return join(json.dumps(header), body)


@st.composite
def header_mutants(draw: st.DrawFn, data: bytes) -> Callable[[], bytes]:
    """One safetensors header entry changed: a tensor's dtype, shape or offsets, a tensor dropped or added, or
    __metadata__ (or one of its values) replaced."""
    names = [k for k in split(data)[0] if k != "__metadata__"]
    key = draw(st.sampled_from([*names, "__metadata__", "new.tensor"]))
    if key == "__metadata__":
        slot = draw(st.sampled_from([None, "format", "config"]))
    elif key == "new.tensor" or draw(st.integers(0, 5)) == 0:
        slot = None
    else:
        slot = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))
    return functools.partial(mutate_header, data, key, slot, draw(value_texts))


def mutate_header(data: bytes, key: str, slot: str | None, text: str) -> bytes:
    header, body = split(data)
    target, name = (header, key) if slot is None else (header[key], slot)
    target[name] = "@@value@@"
    return join(json.dumps(header).replace(PLACEHOLDER, text), body)


@st.composite
def byte_mutants(draw: st.DrawFn, data: bytes) -> Callable[[], bytes]:
    """Raw damage: truncation, trailing bytes, flipped bytes in the header, a different length prefix."""
    kind = draw(st.sampled_from(["truncate", "append", "flip", "length"]))
    if kind == "truncate":
        cut = draw(st.integers(0, len(data) - 1))
        return lambda: data[:cut]
    if kind == "append":
        tail = draw(st.binary(min_size=1, max_size=64))
        return lambda: data + tail
    if kind == "flip":
        (n,) = struct.unpack("<Q", data[:8])
        at, mask = draw(st.integers(0, 8 + n - 1)), draw(st.integers(1, 255))
        return lambda: data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]
    prefix = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    return lambda: prefix + data[8:]


class Mutant:
    """A recipe for a mutated file, built in the test body: hypothesis keeps every drawn value (megabytes each
    if they were the files) and its repr."""

    def __init__(self, base: str, build: Callable[[], bytes]) -> None:
        self.base, self.build = base, build

    def __repr__(self) -> str:
        data = self.build()
        return f"Mutant({self.base!r}, {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]})"


@st.composite
def mutants(draw: st.DrawFn, bases: dict[str, bytes]) -> Mutant:
    base = draw(st.sampled_from(sorted(bases)))
    kind = draw(st.sampled_from([config_mutants, config_mutants, header_mutants, byte_mutants]))
    return Mutant(base, draw(kind(bases[base])))


def loads_or_refuses(path: Path, mutant: Mutant) -> None:
    """The property, for one file: success or CheckpointError (anything else propagates), fast and small."""
    path.write_bytes(mutant.build())
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    try:
        load(path)
    except CheckpointError:
        pass
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < SECONDS, f"load took {elapsed:.2f} s"
    assert peak < PEAK_BYTES, f"load allocated {peak / 2**20:.0f} MiB"
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before  # torch's memory too
    assert rss_growth < RSS_GROWTH_KIB, f"load raised the peak RSS by {rss_growth >> 10} MiB"


FUZZ = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(FUZZ, max_examples=150)
@given(data=st.data())
def test_mutated_checkpoints_load_or_refuse(bases: dict[str, bytes], target: Path, data: st.DataObject) -> None:
    loads_or_refuses(target, data.draw(mutants(bases)))


@pytest.mark.slow
@settings(FUZZ, max_examples=3000)
@given(data=st.data())
def test_mutated_checkpoints_load_or_refuse_long(bases: dict[str, bytes], target: Path, data: st.DataObject) -> None:
    loads_or_refuses(target, data.draw(mutants(bases)))


def test_the_bases_load(bases: dict[str, bytes], target: Path) -> None:
    """Unmutated, both base files load: the property is not vacuous."""
    for data in bases.values():
        target.write_bytes(data)
        assert load(target).meta.training_step == 5
