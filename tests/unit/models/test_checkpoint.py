"""The checkpoint format: bit-exact round trip, and every malformed file refused (reliability tests 1-3)."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from models import checkpoint
from models.checkpoint import FORMAT, CheckpointError, CheckpointMeta, load, recommended_sigmas, save
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
