"""Data: the fixed digits split, the seeded data order, CIFAR-10 pickles (safely), image folders, bad paths."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from training.data import (
    CIFAR_TRAIN_BATCHES,
    DataError,
    digits_split,
    global_batch_flips,
    global_batch_indices,
    load_cifar_batch,
    load_data,
)


def test_digits_split_is_fixed_stratified_and_complete() -> None:
    tx, ty, hx, hy = digits_split()
    assert tx.shape == (1437, 1, 8, 8) and hx.shape == (360, 1, 8, 8)
    assert tx.dtype == hx.dtype == torch.float32 and ty.dtype == hy.dtype == torch.int64
    assert tx.min() == -1 and tx.max() == 1
    assert torch.bincount(hy, minlength=10).tolist() == [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]  # 20% per class
    again = digits_split()
    assert all(torch.equal(a, b) for a, b in zip((tx, ty, hx, hy), again, strict=True))
    raw = load_digits()
    every = torch.cat([tx, hx]).flatten(1).add(1).mul(8).round().to(torch.int64)  # back to 0…16
    rows = sorted(map(tuple, every.tolist()))
    assert rows == sorted(map(tuple, raw.images.reshape(-1, 64).astype(int).tolist()))


def test_digits_data_has_labels_and_no_flips() -> None:
    data = load_data("digits", 8, 1)
    assert len(data) == 1437 and data.num_classes == 10 and data.class_names[3] == "3" and not data.flip
    x, y = data.batch(torch.arange(4), torch.ones(4, dtype=torch.bool))
    assert torch.equal(x, data.images[:4]) and y.tolist() == data.labels[:4].tolist()


def test_data_order_visits_every_image_once_per_epoch_and_is_seeded() -> None:
    n = 10
    stream = torch.cat([global_batch_indices(3, pos, 4, n) for pos in range(0, 20, 4)])  # 5 batches, 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(global_batch_indices(3, 8, 4, n), stream[8:12])  # crosses the epoch boundary
    assert not torch.equal(global_batch_indices(4, 0, 10, n), stream[:10])
    assert torch.equal(global_batch_flips(0, 128, 64), global_batch_flips(0, 128, 64))


def write_cifar(folder: Path, per_batch: int = 3) -> None:
    folder.mkdir()
    for i, name in enumerate(CIFAR_TRAIN_BATCHES):
        data = np.full((per_batch, 3072), 10 * i, dtype=np.uint8)
        data[:, :1024] = 255  # red channel
        doc = {b"batch_label": b"training batch", b"labels": [i] * per_batch, b"data": data}
        (folder / name).write_bytes(pickle.dumps(doc, protocol=3))


def test_cifar10_batches_load(tmp_path: Path) -> None:
    write_cifar(tmp_path / "cifar-10-batches-py")
    data = load_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", 32, 3)
    assert len(data) == 15 and data.images.dtype == torch.uint8 and data.flip and data.num_classes == 10
    x, y = data.batch(torch.tensor([0, 14]))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 4]
    assert x[:, 0].eq(1).all() and x[0, 1].eq(-1).all()


class Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_cifar10_pickle_with_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar"
    write_cifar(folder)
    sentinel = tmp_path / "sentinel"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload(sentinel), b"labels": []}, protocol=3))
    with pytest.raises(DataError, match=r"^--data cifar10:.*data_batch_3.*refusing to load global io.open"):
        load_data(f"cifar10:{folder}", 32, 3)
    assert not sentinel.exists()
    with pytest.raises(pickle.UnpicklingError):
        load_cifar_batch(folder / "data_batch_3")


def write_image(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_resizes_crops_and_labels_from_subfolders(tmp_path: Path) -> None:
    write_image(tmp_path / "cats" / "a.png", (64, 40), (255, 0, 0))
    write_image(tmp_path / "dogs" / "b.jpg", (30, 90), (0, 0, 255))
    data = load_data(f"folder:{tmp_path}", 32, 3)
    assert data.images.shape == (2, 3, 32, 32) and data.class_names == ("cats", "dogs")
    assert data.labels.tolist() == [0, 1] and data.flip
    x, _ = data.batch(torch.tensor([0]))
    assert x[0, 0].mean() > 0.9 and x[0, 2].mean() < -0.9


def test_folder_without_subfolders_is_unlabelled(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (8, 8), (0, 0, 0))
    data = load_data(f"folder:{tmp_path}", 8, 1)
    assert data.labels is None and data.num_classes == 0 and data.images.shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("folder:{tmp}/missing", "no such folder"),
        ("folder:{tmp}/empty", "holds no images"),
        ("folder:{tmp}/broken", "cannot read image bad.png"),
        ("cifar10:{tmp}/missing", "no such folder"),
        ("cifar10:{tmp}/empty", "missing data_batch_1"),
        ("imagenet:{tmp}", "is not understood"),
        ("folder:", "is not understood"),
    ],
)
def test_bad_data_paths_are_one_line_errors_naming_the_flag(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        load_data(spec.format(tmp=tmp_path), 8, 1)
    text = str(info.value)
    assert text.startswith("--data ") and message in text and "\n" not in text


def test_shape_mismatch_names_the_preset(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"images are \(1, 8, 8\), the model preset needs \(3, 32, 32\)"):
        load_data("digits", 32, 3)
