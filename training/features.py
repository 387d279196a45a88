"""Feature extractors for Fréchet distances.

Two feature spaces:
- a small digits classifier, trained here deterministically on the digits training split and cached on
  disk as safetensors (keyed by a hash of the training data, the architecture, the recipe and the seed);
- the FID Inception-v3 network of pytorch-fid / torch-fidelity (the TF 2015-12-05 graph with its patched
  pooling), built without torchvision, its weights read from a local file and never downloaded. Inputs
  are prepared as pytorch-fid does (8-bit levels, torch bilinear resize to 299x299); torch-fidelity's
  TF1-style resize gives slightly different FIDs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from models.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

FEATURE_BATCH = 500  # images per forward pass when extracting features
CLASSIFIER_VERSION = 1  # bump when the training code changes in a way the recipe does not capture


def cache_dir() -> Path:
    """$CM_CACHE_DIR, else $XDG_CACHE_HOME/cmserve, else ~/.cache/cmserve (resolved at call time)."""
    if os.environ.get("CM_CACHE_DIR"):
        return Path(os.environ["CM_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cmserve"


# ---------------------------------------------------------------------------------------------------
# The digits classifier
# ---------------------------------------------------------------------------------------------------


class DigitsClassifier(nn.Module):
    """A small conv net for 1x8x8 digits in [-1, 1]; `features` is the 64-d penultimate layer."""

    feature_dim = 64

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),  # (B, 16, 8, 8)
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),  # (B, 32, 8, 8)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 32, 4, 4)
            nn.Flatten(),  # (B, 512)
            nn.Linear(32 * 4 * 4, self.feature_dim),  # (B, 64): the feature space (pre-activation)
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(self.feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the digits classifier is trained; every field is part of the cache key."""

    seed: int = 0
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3  # Adam
    weight_decay: float = 1e-4


@dataclass
class TrainedClassifier:
    model: DigitsClassifier
    heldout_accuracy: float
    cache_path: Path | None


def train_digits_classifier(
    train_x: torch.Tensor, train_y: torch.Tensor, recipe: ClassifierRecipe = ClassifierRecipe()
) -> DigitsClassifier:
    """Deterministic training on the CPU: one seed drives the init, the shuffles and dropout.

    One thread: reductions then run in a fixed order whatever the machine's thread count, and this
    small net trains faster alone than sharing a busy machine's cores.
    """
    with single_thread(), torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(recipe.seed)
        model = DigitsClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        gen = torch.Generator().manual_seed(recipe.seed)
        model.train()
        for _ in range(recipe.epochs):
            for idx in torch.randperm(len(train_x), generator=gen).split(recipe.batch_size):
                loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def classifier_cache_key(train_x: torch.Tensor, train_y: torch.Tensor, recipe: ClassifierRecipe) -> str:
    """sha256 of the code version, the training data, the architecture and the recipe (seed included)."""
    h = hashlib.sha256(f"digits-classifier-v{CLASSIFIER_VERSION}".encode())
    h.update(train_x.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(train_y.detach().cpu().long().contiguous().numpy().tobytes())
    h.update(repr(DigitsClassifier()).encode())
    h.update(json.dumps(asdict(recipe), sort_keys=True).encode())
    return h.hexdigest()


def load_cached_classifier(path: Path) -> DigitsClassifier | None:
    """The cached classifier, or None when the file is missing or unusable (it is then retrained)."""
    try:
        tensors = st_load(path.read_bytes())
        model = DigitsClassifier()
        model.load_state_dict(tensors, strict=True)
    except FileNotFoundError:
        return None
    except (OSError, SafetensorError, RuntimeError, ValueError) as e:
        log.warning("ignoring unusable cached classifier %s (%s); retraining", path, e)
        return None
    return model.eval().requires_grad_(False)


def digits_classifier(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    heldout_x: torch.Tensor,
    heldout_y: torch.Tensor,
    recipe: ClassifierRecipe = ClassifierRecipe(),
    folder: Path | None = None,
) -> TrainedClassifier:
    """Load the classifier for this data and recipe from the cache, training and caching it if needed."""
    key = classifier_cache_key(train_x, train_y, recipe)[:20]
    path = (folder or cache_dir()) / f"digits-classifier-{key}.safetensors"
    model = load_cached_classifier(path)
    if model is None:
        log.info("training the digits feature classifier (cached at %s)", path)
        model = train_digits_classifier(train_x, train_y, recipe)
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        meta = {"recipe": json.dumps(asdict(recipe)), "feature_dim": str(DigitsClassifier.feature_dim)}
        try:
            atomic_write_bytes(path, st_save(tensors, metadata=meta))
        except OSError as e:  # a read-only cache only costs a retraining next time
            log.warning("cannot cache the digits classifier at %s (%s)", path, e)
            path = None
    return TrainedClassifier(model, classifier_accuracy(model, heldout_x, heldout_y), path)


@torch.no_grad()
def classifier_features(model: DigitsClassifier, images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) images in [-1, 1] -> (N, 64) float64 features, on the CPU."""
    parts = [model.features(chunk.float().cpu()) for chunk in images.split(FEATURE_BATCH)]
    return torch.cat(parts).double()


# ---------------------------------------------------------------------------------------------------
# The FID Inception-v3 network (pytorch-fid's `fid_inception_v3`, module names as in torchvision)
# ---------------------------------------------------------------------------------------------------

INCEPTION_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
INCEPTION_CLASSES = 1008  # the TF graph's 1008-way classifier; unused for FID but present in the weights


class InceptionWeightsError(ValueError):
    """A weights file that is not a usable FID Inception-v3 state dict; the message says why."""


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 0.001, as TF) + ReLU."""

    def __init__(self, cin: int, cout: int, **conv: int | tuple[int, int]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3/1 average pool that, like TensorFlow, leaves the zero padding out of the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(d))))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b pools by average (TF-style); Mixed_7c by max, a quirk of the TF graph that FID keeps."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as used for FID; forward maps images in [-1, 1] of any size to (N, 2048) pool features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(INCEPTION_FEATURE_DIM, INCEPTION_CLASSES)  # kept so the file loads strictly

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ... (N, 768, 17, 17) ... (N, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth/.pt with torch.load(weights_only=True) (no code runs)."""
    flag = f"--inception-weights {path}"
    if not path.is_file():
        raise InceptionWeightsError(f"{flag}: no such file")
    if path.suffix == ".safetensors":
        try:
            return st_load(path.read_bytes())
        except (SafetensorError, ValueError, OSError) as e:
            raise InceptionWeightsError(f"{flag}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a malformed file can make the unpickler raise anything
        raise InceptionWeightsError(
            f"{flag}: not a plain tensor state dict readable with torch.load(weights_only=True) "
            f"({type(e).__name__}); "
            "expected pt_inception-2015-12-05-6726825d.pth or a .safetensors conversion"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InceptionWeightsError(f"{flag}: holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def check_inception_state(state: dict[str, torch.Tensor], model: FIDInceptionV3, flag: str) -> None:
    """Same names and shapes as the FID network; BatchNorm step counters may be absent (old files)."""
    expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or extra:
        raise InceptionWeightsError(
            f"{flag}: not the FID Inception-v3 weights ({len(missing)} missing tensors, e.g. {missing[:3]}; "
            f"{len(extra)} unexpected, e.g. {extra[:3]})"
        )
    for key, shape in expected.items():
        if given[key].shape != shape:
            raise InceptionWeightsError(
                f"{flag}: tensor {key!r} has shape {tuple(given[key].shape)}, the network needs {tuple(shape)}"
            )


def load_inception(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception-v3 network with the weights of a local file, in eval mode on `device`."""
    path = Path(path)
    state = read_state_dict(path)
    model = FIDInceptionV3()
    check_inception_state(state, model, f"--inception-weights {path}")
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def inception_features(
    model: FIDInceptionV3, images: torch.Tensor, batch: int = 50, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(N, C, H, W) images, uint8 or float in [-1, 1], -> (N, 2048) float64 pool features, on the CPU.

    Float images are first quantised to 8 bits, as saved samples and real image files are; grey images
    are repeated to three channels. Resizing to 299x299 (bilinear) happens inside the network.
    """
    parts = []
    for chunk in images.split(batch):
        levels = chunk.float() if chunk.dtype == torch.uint8 else ((chunk.float().clamp(-1, 1) + 1) * 127.5).round()
        x = levels / 127.5 - 1  # (B, C, H, W) on uint8 levels, in [-1, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        parts.append(model(x.to(device)).double().cpu())
    return torch.cat(parts)
