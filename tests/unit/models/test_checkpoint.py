"""The checkpoint format: bit-exact round trip, and every malformed file refused (reliability tests 1-3)."""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from models import checkpoint
from models.checkpoint import FORMAT, CheckpointError, CheckpointMeta, load, read_meta, recommended_sigmas, save
from models.config import PRESETS
from models.consistency import ConsistencyModel

ROOT = Path(__file__).resolve().parents[3]
CLASS_NAMES = [str(i) for i in range(10)]


@pytest.fixture
def saved(tmp_path: Path, tiny_model: ConsistencyModel) -> Path:
    return save(
        tmp_path / "model.safetensors",
        tiny_model,
        preset="digits",
        class_names=CLASS_NAMES,
        training_step=1234,
        schedules={1: [80.0], 2: [80.0, 0.7]},
        provenance={"recipe": "ict", "commit": "abc"},
    )


def rewrite(path: Path, tensors: dict[str, torch.Tensor] | None = None, config: dict | None = None) -> Path:
    """Re-save a checkpoint's tensors/metadata with changes, bypassing save()'s own checks."""
    ck = load(path)
    tensors = tensors if tensors is not None else dict(ck.model.state_dict())
    meta = json.loads(ck.meta.to_json()) if config is None else config
    blob = st_save(tensors, metadata={"format": FORMAT, "config": json.dumps(meta)})
    path.write_bytes(blob)
    return path


def test_round_trip_is_bit_exact(saved: Path, tiny_model: ConsistencyModel) -> None:
    ck = load(saved)
    ref = tiny_model.state_dict()
    got = ck.model.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert ck.meta.preset == "digits" and ck.meta.training_step == 1234
    assert ck.meta.class_names == CLASS_NAMES and ck.meta.num_classes == 10
    assert ck.meta.schedules == {1: [80.0], 2: [80.0, 0.7]}
    assert ck.meta.provenance == {"recipe": "ict", "commit": "abc"}
    assert recommended_sigmas(ck.meta, 2) == [80.0, 0.7]
    assert recommended_sigmas(ck.meta, 3)[0] == 80.0  # documented default where none is recommended
    assert not ck.model.training and not any(p.requires_grad for p in ck.model.parameters())
    assert len(ck.sha256) == 64


def test_header_holds_the_documented_config(saved: Path) -> None:
    (n,) = struct.unpack("<Q", saved.read_bytes()[:8])
    header = json.loads(saved.read_bytes()[8 : 8 + n])
    config = json.loads(header["__metadata__"]["config"])
    for key in (
        "format_version",
        "preset",
        "architecture",
        "sigma",
        "data_shape",
        "num_classes",
        "class_names",
        "training_step",
        "schedules",
        "provenance",
    ):
        assert key in config
    assert config["sigma"] == {"min": 0.002, "max": 80.0, "data": 0.5, "rho": 7.0}
    assert config["data_shape"] == [1, 8, 8]


def test_load_needs_nothing_but_the_file(saved: Path, tiny_model: ConsistencyModel, tmp_path: Path) -> None:
    """A fresh interpreter rebuilds the model from the file alone and computes the same output."""
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tiny_model(x, torch.tensor([80.0, 1.0]), torch.tensor([3, 4]))
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    code = (
        "import sys, torch; from models.checkpoint import load\n"
        "torch.set_num_threads(int(sys.argv[3]))  # the same reduction order as the parent\n"
        "io = torch.load(sys.argv[2], weights_only=True)\n"
        "m = load(sys.argv[1]).model\n"
        "out = m(io['x'], torch.tensor([80.0, 1.0]), torch.tensor([3, 4]))\n"
        "sys.exit(0 if torch.equal(out, io['expected']) else 1)\n"
    )
    args = [sys.executable, "-c", code, str(saved), str(tmp_path / "io.pt"), str(torch.get_num_threads())]
    result = subprocess.run(args, cwd=ROOT)
    assert result.returncode == 0


def test_saved_file_has_normal_permissions(saved: Path) -> None:
    """mkstemp creates 0600; a checkpoint mounted into the non-root container must stay readable."""
    mask = os.umask(0)
    os.umask(mask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~mask


def test_load_to_device_and_dtype(saved: Path) -> None:
    ck = load(saved, device="cpu", dtype=torch.bfloat16)
    assert next(ck.model.parameters()).dtype == torch.bfloat16


class Payload:
    """Unpickling this would create the sentinel file: proof that code ran."""

    def __init__(self, sentinel: str) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_payload_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"weights": Payload(str(sentinel))}, protocol=protocol))
    with pytest.raises(CheckpointError):
        load(evil)
    assert not sentinel.exists()


def test_torch_save_zip_file_is_refused(tmp_path: Path, tiny_model: ConsistencyModel) -> None:
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"state": tiny_model.state_dict(), "x": Payload(str(sentinel))}, evil)
    with pytest.raises(CheckpointError, match="header"):
        load(evil)
    assert not sentinel.exists()


def test_truncated_file(saved: Path) -> None:
    data = saved.read_bytes()
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        saved.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load(saved)


def test_trailing_bytes(saved: Path) -> None:
    saved.write_bytes(saved.read_bytes() + b"\0" * 16)
    with pytest.raises(CheckpointError, match="malformed safetensors"):
        load(saved)


def test_huge_header_length(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(struct.pack("<Q", 2**62) + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        load(saved)


def test_header_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{[" + b"\0" * 8)
    with pytest.raises(CheckpointError, match="not JSON"):
        load(bad)


def test_plain_safetensors_is_not_our_format(tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    other.write_bytes(st_save({"w": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="not a cmserve checkpoint"):
        load(other)


def test_unknown_format_version(saved: Path) -> None:
    config = json.loads(load(saved).meta.to_json())
    config["format_version"] = 99
    rewrite(saved, config=config)
    with pytest.raises(CheckpointError, match="unsupported checkpoint format version 99"):
        load(saved)


def test_config_with_unknown_architecture_key(saved: Path) -> None:
    config = json.loads(load(saved).meta.to_json())
    config["architecture"]["mystery"] = 1
    rewrite(saved, config=config)
    with pytest.raises(CheckpointError, match="mystery"):
        load(saved)


def test_missing_tensor(saved: Path) -> None:
    tensors = dict(load(saved).model.state_dict())
    del tensors["backbone.conv_out.weight"]
    rewrite(saved, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"missing tensors \['backbone.conv_out.weight'\]"):
        load(saved)


def test_extra_tensor(saved: Path) -> None:
    tensors = {**load(saved).model.state_dict(), "backdoor": torch.zeros(2)}
    rewrite(saved, tensors=tensors)
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load(saved)


def test_shape_mismatch(saved: Path) -> None:
    tensors = dict(load(saved).model.state_dict())
    tensors["backbone.conv_in.weight"] = torch.zeros(3, 3)
    rewrite(saved, tensors=tensors)
    with pytest.raises(CheckpointError, match=r"conv_in\.weight' has shape"):
        load(saved)


def test_wrong_dtype(saved: Path) -> None:
    tensors = dict(load(saved).model.state_dict())
    tensors["backbone.conv_in.weight"] = tensors["backbone.conv_in.weight"].half()
    rewrite(saved, tensors=tensors)
    with pytest.raises(CheckpointError, match="dtype"):
        load(saved)


def test_nan_weights(saved: Path) -> None:
    tensors = {k: v.clone() for k, v in load(saved).model.state_dict().items()}
    tensors["backbone.map0.weight"][0, 0] = float("nan")
    rewrite(saved, tensors=tensors)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load(saved)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load(tmp_path / "absent.safetensors")


def test_class_names_must_match_classes(tmp_path: Path, tiny_model: ConsistencyModel) -> None:
    with pytest.raises(CheckpointError, match="class names"):
        save(tmp_path / "x.safetensors", tiny_model, class_names=["a", "b"])
    assert not (tmp_path / "x.safetensors").exists()


def test_failed_save_keeps_the_previous_file(
    saved: Path, tiny_model: ConsistencyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reliability test 3: a failure mid-write leaves the old checkpoint loadable and no partial file."""
    before = saved.read_bytes()
    real_fsync = os.fsync

    def crash(fd: int) -> None:
        real_fsync(fd)
        raise OSError("injected crash during save")

    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError, match="injected"):
        save(saved, tiny_model, preset="digits", class_names=CLASS_NAMES, training_step=9999)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert load(saved).meta.training_step == 1234
    assert sorted(p.name for p in saved.parent.iterdir()) == ["model.safetensors"]


def test_meta_json_round_trip() -> None:
    from models.config import preset

    meta = CheckpointMeta(config=preset("digits"), preset="digits", class_names=CLASS_NAMES, schedules={2: [80.0, 0.5]})
    assert CheckpointMeta.from_json(meta.to_json()) == meta
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CheckpointMeta.from_json("{")


# ---------------------------------------------------------------------------------------------- issue 20: hardening


def header_of(path: Path) -> tuple[dict[str, Any], bytes]:
    """A checkpoint's safetensors header (parsed) and its tensor bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_header(path: Path, header: dict[str, Any] | str, body: bytes) -> Path:
    """A file with this header (a dict, or raw JSON text that json could not write) and these tensor bytes."""
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return path


def write_config_text(path: Path, config_text: str) -> Path:
    """Replace the JSON config (raw text: NaN, 1e999, 400 digits) keeping the weights as they are."""
    header, body = header_of(path)
    header["__metadata__"]["config"] = config_text
    return write_header(path, header, body)


def config_doc(path: Path) -> dict[str, Any]:
    return json.loads(header_of(path)[0]["__metadata__"]["config"])


def timed_refusal(path: Path, match: str) -> float:
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match):
        load(path)
    return time.perf_counter() - start


def test_huge_num_res_blocks_is_refused_before_anything_is_built(saved: Path) -> None:
    """Issue 20: num_res_blocks 200000 took 117 s and 3.5 GB, then MemoryError; now a range check, at once."""
    doc = config_doc(saved)
    doc["architecture"]["num_res_blocks"] = 200_000
    write_config_text(saved, json.dumps(doc))
    assert timed_refusal(saved, r"config\.architecture\.num_res_blocks must be an integer 1…16, got 200000") < 1.0


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("architecture.model_channels", "-64", r"config\.architecture\.model_channels must be an integer 1…4096"),
        ("architecture.model_channels", "64.0", r"config\.architecture\.model_channels .* got 64\.0"),
        ("architecture.model_channels", "true", r"config\.architecture\.model_channels .* got True"),
        ("architecture.model_channels", "1" + "0" * 399, r"model_channels .* got an integer of 400 digits"),
        ("architecture.head_channels", "0", r"config\.architecture\.head_channels must be an integer 1…4096"),
        ("architecture.num_groups", "-3", r"config\.architecture\.num_groups must be an integer 1…4096"),
        ("architecture.num_groups", "5", r"config\.architecture\.num_groups 5: the network cannot be built"),
        ("architecture.image_size", "4096", r"config\.architecture\.image_size must be an integer 1…1024"),
        ("architecture.image_size", str(2**40), r"config\.architecture\.image_size must be an integer 1…1024"),
        ("architecture.sigma_max", "Infinity", r"config\.architecture\.sigma_max must be a finite number"),
        ("architecture.dropout", "NaN", r"config\.architecture\.dropout must be a finite number"),
        ("architecture.channel_mult", "[1, [2]]", r"config\.architecture\.channel_mult must be a list"),
        ("architecture.embedding", "7", r"config\.architecture\.embedding must be one of"),
        ("architecture", "[]", r"config\.architecture must be a JSON object"),
        ("class_names", "5", r"config\.class_names must be a list of 10 non-empty strings"),
        ("class_names", json.dumps(list(range(10))), r"config\.class_names must be a list of 10 non-empty strings"),
        ("class_names", json.dumps("0123456789"), r"config\.class_names must be a list of 10 non-empty strings"),
        ("class_names", json.dumps(["a"] * 10), r"config\.class_names must be distinct"),
        ("preset", '{"a": 1}', r"config\.preset must be a string or null"),
        ("schedules", '{"1": [NaN]}', r"config\.schedules\.1 must be a list of 1 finite numbers"),
        ("schedules", '{"1": [Infinity]}', r"config\.schedules\.1 must be a list of 1 finite numbers"),
        ("schedules", '{"1": [1e999]}', r"config\.schedules\.1 must be a list of 1 finite numbers"),
        ("schedules", '{"1": [-1.0]}', r"config\.schedules\.1: every sigma must be > sigma_min"),
        ("schedules", '{"2": [0.5, 80.0]}', r"config\.schedules\.2: sigmas must be strictly decreasing"),
        ("schedules", '{"1": [81.0]}', r"config\.schedules\.1: sigmas\[0\] = 81\.0 exceeds sigma_max"),
        ("schedules", '{"2": [80.0]}', r"config\.schedules\.2 must be a list of 2 finite numbers"),
        ("schedules", '{"02": [80.0, 1.0]}', r"config\.schedules key '02' must be a step count"),
        ("schedules", "[80.0]", r"config\.schedules must be a JSON object"),
        ("training_step", "1" + "0" * 399, r"config\.training_step must be an integer >= 0"),
        ("training_step", "-1", r"config\.training_step must be an integer >= 0"),
        ("provenance", '{"loss": NaN}', r"config\.provenance must be a JSON object of finite values"),
        ("provenance", "[" * 100_000 + "]" * 100_000, r"config metadata nests 100001 levels deep; at most 32"),
        ("num_classes", "11", r"config\.num_classes 11 disagrees with config\.architecture"),
        ("format_version", "true", r"unsupported checkpoint format version True"),
        ("extra", "1", r"config\.extra: unknown key"),
        ("preset", '"\\ud800"', r"config metadata holds a lone surrogate"),
    ],
)
def test_malformed_config_names_the_field(saved: Path, where: str, value: str, message: str) -> None:
    """Issue 20: every malformed field is a CheckpointError naming it, never AttributeError, RecursionError,
    OverflowError, TypeError, RuntimeError or ZeroDivisionError; nothing is built or read first."""
    doc = config_doc(saved)
    *parents, key = where.split(".")
    target = doc
    for parent in parents:
        target = target[parent]
    target[key] = "@VALUE@"
    write_config_text(saved, json.dumps(doc).replace('"@VALUE@"', value))
    assert timed_refusal(saved, message) < 1.0


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([1, 2], r"__metadata__ must be a JSON object of strings"),
        ("config", r"__metadata__ must be a JSON object of strings"),
        ({"format": FORMAT, "config": 5}, r"__metadata__\.config must be a string"),
        ({"format": FORMAT, "config": "[]"}, r"config metadata is not a JSON object"),
        ({"format": "other", "config": "{}"}, r"not a cmserve checkpoint"),
    ],
)
def test_metadata_of_the_wrong_type(saved: Path, metadata: Any, message: str) -> None:
    header, body = header_of(saved)
    header["__metadata__"] = metadata
    write_header(saved, header, body)
    assert timed_refusal(saved, message) < 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.update(dtype="F16"), r"has dtype 'F16', checkpoints store"),
        (lambda e: e.update(shape=[3.0]), r"has shape \(3\.0,\), config needs"),
        (lambda e: e.update(data_offsets=[0, 4]), r"data_offsets \[0, 4\]; its \d+ values need"),
        (lambda e: e.update(data_offsets=[-4, e["data_offsets"][1] - 4]), r"data_offsets \[-4"),
        (lambda e: e.update(extra=1), r"header entry must hold dtype, shape and data_offsets"),
    ],
)
def test_header_entries_are_checked_before_the_data(saved: Path, change: Any, message: str) -> None:
    header, body = header_of(saved)
    change(header["backbone.conv_in.weight"])
    write_header(saved, header, body)
    assert timed_refusal(saved, message) < 1.0


def test_overlapping_tensors(saved: Path) -> None:
    header, body = header_of(saved)
    first, second = header["backbone.map0.bias"], header["backbone.map1.bias"]
    assert first["shape"] == second["shape"]
    second["data_offsets"] = list(first["data_offsets"])  # the same bytes for both
    write_header(saved, header, body)
    with pytest.raises(CheckpointError, match="a gap or an overlap"):
        load(saved)


def test_duplicate_header_keys(saved: Path) -> None:
    header, body = header_of(saved)
    text = json.dumps(header)
    text = text[:-1] + ', "backbone.conv_out.bias": ' + json.dumps(header["backbone.conv_out.bias"]) + "}"
    write_header(saved, text, body)
    with pytest.raises(CheckpointError, match=r"key 'backbone\.conv_out\.bias' appears twice"):
        load(saved)


def test_header_nesting_is_bounded(tmp_path: Path) -> None:
    deep = write_header(tmp_path / "deep.safetensors", "[" * 200_000 + "]" * 200_000, b"")
    assert timed_refusal(deep, r"header nests 200000 levels deep") < 1.0


def test_too_many_parameters(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parameter count the config implies is checked against a cap before any tensor is read."""
    monkeypatch.setattr(checkpoint, "MAX_PARAMETERS", 1000)
    with pytest.raises(CheckpointError, match=r"config\.architecture implies \d\d,\d\d\d parameters; at most 1,000"):
        load(saved)


def test_an_8_gb_file_is_refused_from_its_header(saved: Path) -> None:
    """Issue 20: an 8 GB file was read whole before the header was checked. A sparse 8 GB file (our header, then
    zeros) is refused at once: time and peak memory stay small."""
    with saved.open("r+b") as f:
        f.truncate(8 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert timed_refusal(saved, r"the tensors fill \d+ bytes, the file holds 85899\d+ after its header") < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB: no 8 GB read


def test_an_8_gb_file_with_a_huge_header_length(tmp_path: Path) -> None:
    big = tmp_path / "big.safetensors"
    with big.open("wb") as f:
        f.write(struct.pack("<Q", (8 << 30) - 8))
        f.truncate(8 << 30)
    assert timed_refusal(big, r"header length 8589934584 exceeds the file or the 16777216-byte limit") < 1.0


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"cannot read \(Is a directory\)"):
        load(tmp_path)
    if Path("/dev/zero").exists():  # endless zeros: refused from its type, never read
        assert timed_refusal(Path("/dev/zero"), "not a regular file") < 1.0


def test_file_that_changes_while_read(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bytes read after the header checks must start with the header that was checked."""
    real = checkpoint.check_header_tensors

    def swap_then_check(header: dict, expected: dict, data_len: int, name: str) -> None:
        real(header, expected, data_len, name)
        data = bytearray(saved.read_bytes())
        data[20] ^= 1  # inside the header
        saved.write_bytes(bytes(data))

    monkeypatch.setattr(checkpoint, "check_header_tensors", swap_then_check)
    with pytest.raises(CheckpointError, match="changed while it was read"):
        load(saved)


def test_save_refuses_what_load_would_refuse(tmp_path: Path, tiny_model: ConsistencyModel) -> None:
    for kwargs, message in (
        ({"schedules": {1: [float("nan")]}}, r"config\.schedules\.1 must be a list of 1 finite numbers"),
        ({"schedules": {1: [10**400]}}, r"config\.schedules\.1 must be a list of 1 finite numbers"),  # no OverflowError
        ({"schedules": {2: [80.0, 90.0]}}, r"config\.schedules\.2: sigmas must be strictly decreasing"),
        ({"class_names": [str(i) for i in range(9)] + [""]}, r"config\.class_names must be a list"),
        ({"preset": 3}, r"config\.preset must be a string or null"),
        ({"provenance": {"x": float("inf")}}, r"config\.provenance must be a JSON object of finite values"),
    ):
        with pytest.raises(CheckpointError, match=message):
            save(tmp_path / "x.safetensors", tiny_model, **kwargs)
    assert not list(tmp_path.iterdir())


def test_the_shipped_and_preset_checkpoints_still_load(tmp_path: Path) -> None:
    """The embedded digits checkpoint loads; every preset's config passes the checks (built on meta: no memory)."""
    loaded = load(ROOT / "models" / "pretrained" / "digits.safetensors")
    assert loaded.meta.preset == "digits" and loaded.meta.class_names == [str(i) for i in range(10)]
    assert read_meta((ROOT / "models" / "pretrained" / "digits.safetensors").read_bytes()).num_classes == 10
    for name, cfg in PRESETS.items():
        meta = CheckpointMeta(config=cfg, preset=name, schedules={2: [cfg.sigma_max, 0.821]})
        assert CheckpointMeta.from_json(meta.to_json()) == meta
        assert checkpoint.skeleton(cfg, name).num_parameters() < checkpoint.MAX_PARAMETERS
