"""Training data: sklearn's 8×8 digits (fixed split), CIFAR-10 python pickles, folders of images.

Every data set is held in memory as a tensor (N, C, H, W) — float in [-1, 1] or uint8 — plus optional
int64 labels. The order in which a run visits the images is a pure function of (seed, position), so a
resumed run sees exactly the batches it would have seen (`global_batch_indices`).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.cli import CliError

DIGITS_SEED = 20231014  # fixes the digits train/held-out split once and for all
DIGITS_HELDOUT_FRACTION = 0.2
SUBSET_SEED = 20240519  # fixes which images a --data-fraction run trains on, whatever its --seed
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(CliError):
    """A --data value that cannot be used; the message names the flag."""

    def __init__(self, message: str) -> None:
        super().__init__(f"--data {message}")


@dataclass(frozen=True)
class Dataset:
    """Images in memory, (N, C, H, W) float in [-1, 1] or uint8 in [0, 255], with optional labels."""

    images: torch.Tensor
    labels: torch.Tensor | None  # (N,) int64, or None when the data have no labels
    class_names: tuple[str, ...]
    flip: bool  # random horizontal flips make sense for this data
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.labels is not None else 0

    def batch(
        self, indices: torch.Tensor, flips: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images at `indices` as float32 in [-1, 1], (B, C, H, W), mirrored where `flips` is True."""
        x = self.images[indices]
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()
        if flips is not None and self.flip:
            x = torch.where(flips[:, None, None, None], x.flip(-1), x)
        y = self.labels[indices] if self.labels is not None else None
        return x, y


# --- digits ------------------------------------------------------------------------------------------


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits split once, 80/20 stratified with a fixed seed: (train_x, train_y, heldout_x, heldout_y).

    Images are float32 (N, 1, 8, 8) in [-1, 1] (pixel values 0…16 mapped linearly); labels int64.
    Training only ever sees the first pair; evaluation compares samples against the second.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 8.0 - 1.0  # 0…16 -> [-1, 1]
    y = digits.target.astype(np.int64)
    tx, hx, ty, hy = train_test_split(
        x, y, test_size=DIGITS_HELDOUT_FRACTION, stratify=y, random_state=DIGITS_SEED, shuffle=True
    )
    as_images = lambda a: torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)  # noqa: E731  (N, 1, 8, 8)
    return as_images(tx), torch.from_numpy(ty), as_images(hx), torch.from_numpy(hy)


def load_digits_train() -> Dataset:
    train_x, train_y, _, _ = digits_split()
    return Dataset(train_x, train_y, tuple(str(d) for d in range(10)), flip=False, name="digits")


# --- CIFAR-10 python pickles --------------------------------------------------------------------------


# The only globals the official CIFAR-10 batches reference: numpy's array constructor, ndarray and dtype.
CIFAR_PICKLE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # name in pickles by numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # name in pickles by numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Reads containers, numbers, strings, bytes and plain numpy arrays; refuses every other global.

    A pickle can call any global it names; this one resolves only the three numpy constructors a
    CIFAR-10 batch needs, so a crafted file cannot reach os.system, eval or anything else.
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a data file") from None


def load_cifar_batch(path: Path) -> dict:
    """One batch file of the official CIFAR-10 python tarball (its documented pickle format)."""
    with path.open("rb") as f:
        doc = _DataOnlyUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    if not isinstance(doc, dict) or b"data" not in doc or b"labels" not in doc:
        raise pickle.UnpicklingError("not a CIFAR-10 batch (no data/labels entries)")
    return doc


def load_cifar10(folder: Path) -> Dataset:
    """The 50,000 training images of CIFAR-10 from the extracted `cifar-10-batches-py` folder."""
    if not folder.is_dir():
        raise DataError(f"cifar10:{folder}: no such folder (expected the extracted cifar-10-batches-py)")
    files = [folder / n for n in CIFAR_TRAIN_BATCHES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DataError(f"cifar10:{folder}: missing {', '.join(missing)} (expected data_batch_1 … data_batch_5)")
    images, labels = [], []
    for f in files:
        try:
            doc = load_cifar_batch(f)
            raw = doc[b"data"]
            if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
                raise ValueError("data is not a uint8 array")
            data = raw.reshape(-1, 3, 32, 32)
            batch_labels = [int(v) for v in doc[b"labels"]]
            if len(batch_labels) != len(data) or not all(0 <= v < 10 for v in batch_labels):
                raise ValueError("labels do not match the images")
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DataError(f"cifar10:{folder}: cannot read {f.name} ({e})") from None
        images.append(data)
        labels.extend(batch_labels)
    x = torch.from_numpy(np.concatenate(images))
    return Dataset(x, torch.tensor(labels, dtype=torch.int64), CIFAR_CLASSES, flip=True, name="cifar10")


# --- folders of images --------------------------------------------------------------------------------


def resize_center_crop(img: object, size: int, channels: int) -> np.ndarray:
    """Resize the short side to `size` (bicubic), crop the centre square; (C, size, size) uint8."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    img = img.convert("L" if channels == 1 else "RGB")
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_folder(folder: Path, size: int, channels: int) -> Dataset:
    """Every image under `folder`; labels from the first-level sub-folder names when all images have one."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise DataError(f"folder:{folder}: no such folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"folder:{folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images = []
    for p in files:
        try:
            with Image.open(p) as img:
                images.append(resize_center_crop(img, size, channels))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"folder:{folder}: cannot read image {p.relative_to(folder)} ({e})") from None
    parents = [p.relative_to(folder).parts[:-1] for p in files]
    labels, class_names = None, ()
    if all(parents):
        class_names = tuple(sorted({parts[0] for parts in parents}))
        index = {c: i for i, c in enumerate(class_names)}
        labels = torch.tensor([index[parts[0]] for parts in parents], dtype=torch.int64)
    x = torch.from_numpy(np.stack(images))
    return Dataset(x, labels, class_names, flip=True, name=f"folder:{folder.name}")


# --- the --data flag ----------------------------------------------------------------------------------


def load_data(spec: str, image_size: int, image_channels: int) -> Dataset:
    """`digits`, `cifar10:PATH` or `folder:PATH`; shapes are checked against the model preset."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        data = load_digits_train()
    elif kind == "cifar10" and arg:
        data = load_cifar10(Path(arg).expanduser())
    elif kind == "folder" and arg:
        data = load_folder(Path(arg).expanduser(), image_size, image_channels)
    else:
        raise DataError(f"{spec!r} is not understood; use digits, cifar10:PATH or folder:PATH")
    shape, want = tuple(data.images.shape[1:]), (image_channels, image_size, image_size)
    if shape != want:
        raise DataError(f"{spec}: images are {shape}, the model preset needs {want}")
    return data


def subset(data: Dataset, fraction: float) -> Dataset:
    """A fixed, seeded `fraction` of the images (per class when labelled, at least one each); all of them at 1."""
    if fraction >= 1:
        return data
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(SUBSET_SEED))
    groups = [perm] if data.labels is None else [perm[data.labels[perm] == c] for c in data.labels.unique()]
    keep = torch.cat([g[: max(1, round(fraction * len(g)))] for g in groups]).sort().values
    labels = data.labels[keep] if data.labels is not None else None
    name = f"{data.name}[{fraction:g}]"
    return Dataset(data.images[keep], labels, data.class_names, data.flip, name)


def global_batch_indices(seed: int, position: int, batch: int, n: int) -> torch.Tensor:
    """Indices of `batch` images starting at `position` in an endless stream of seeded epoch permutations."""
    parts, pos, end = [], position, position + batch
    while pos < end:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        take = perm[offset : offset + end - pos]
        parts.append(take)
        pos += take.numel()
    return torch.cat(parts)


def global_batch_flips(seed: int, position: int, batch: int) -> torch.Tensor:
    """Horizontal-flip coin for each image of the global batch at `position` (a pure function of both)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7 + position)
    return torch.rand(batch, generator=gen) < 0.5
