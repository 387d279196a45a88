"""Sample quality of a checkpoint, and the search for the middle σ of 2-step sampling.

    python -m training.evaluate CHECKPOINT --steps 1,2 [--samples 2000 --seed 0 --batch 500 --device cpu]
    python -m training.evaluate CHECKPOINT --inception-weights pt_inception-2015-12-05-6726825d.pth \
        [--data cifar10:PATH | folder:PATH]
    python -m training.evaluate CHECKPOINT --search-mid-sigma [--search-samples 500 --search-iters 8]
    python -m training.evaluate CHECKPOINT --memorisation
    python -m training.evaluate DENOISER --heun-steps 10,18  # an EDM denoiser: Heun with 19 and 35 evaluations

Digits checkpoints (1x8x8) are scored by the Fréchet distance to the held-out digits in the feature space
of a small classifier trained on the digits training split (training/features.py), next to the floor:
the same distance between the held-out and the training split. With a local Inception-v3 weights file,
FID is reported too (real images: the held-out digits, or `--data`). Nothing is downloaded. `--memorisation`
adds, for digits checkpoints, the nearest-training-digit distance ratio (≈1: new digits, ≪1: copies).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg

from models.checkpoint import CheckpointError, CheckpointMeta, LoadedCheckpoint, load, recommended_sigmas, save
from models.cli import OneLineParser
from models.config import ModelConfig
from models.denoiser import heun_evaluations, heun_sigmas, sample_heun
from models.sampling import sample, validate_sigmas

from .data import DataError, digits_split, load_data, load_digits_train, subset
from .features import (
    InceptionWeightsError,
    TrainedClassifier,
    cache_dir,
    classifier_features,
    digits_classifier,
    inception_features,
    load_inception,
)

log = logging.getLogger(__name__)

DIGITS_SHAPE = (1, 8, 8)
SEED_SPACE = 2**62  # per-image sampling seeds are drawn from [0, 2^62)
DEFAULT_STEPS = (1, 2)  # a consistency model's step counts
DEFAULT_HEUN_STEPS = (18,)  # a denoiser's: EDM's CIFAR-10 setting, 35 evaluations


class EvaluationError(ValueError):
    """A request that cannot be evaluated; the message names the flag, the value and what is allowed."""


# ---------------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------------


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of (N, D) feature rows, in float64 (FID, Heusel et al. 2017)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need (N, D) features with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Dowson & Landau 1982; FID, Heusel et al. 2017)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: shift both covariances by eps·I (as pytorch-fid)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # round-off gives a tiny imaginary part; a large one is a real failure
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(Σ1Σ2) has imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    # d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2(Σ1Σ2)^½)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def nearest_distances(images: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(N,) L2 distance of each image to its nearest image of `reference`, in float64 pixel space."""
    ref = reference.flatten(1).double()  # (M, D)
    parts = [
        torch.cdist(part.flatten(1).double(), ref, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
        for part in images.split(chunk)
    ]  # each (chunk,)
    return torch.cat(parts)


def memorisation_ratio(generated: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor) -> float:
    """Mean nearest-training-image distance of generated images over that of held-out real images.

    ≈ 1: samples are as far from the training set as new real images are; ≪ 1: samples copy training images.
    """
    return float(nearest_distances(generated, train).mean() / nearest_distances(heldout, train).mean())


# ---------------------------------------------------------------------------------------------------
# Feature spaces with their real-image statistics
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Reference:
    """Real-image statistics in one feature space and the map of images into it."""

    name: str  # "frechet_distance" (digits classifier) or "fid" (Inception-v3)
    featurize: Callable[[torch.Tensor], torch.Tensor]
    mu: np.ndarray
    sigma: np.ndarray
    floor: float | None = None  # held-out vs training split, where there is one
    info: dict[str, Any] = field(default_factory=dict)

    def distance(self, images: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(self.featurize(images)), self.mu, self.sigma)


@functools.cache
def _digits_reference(folder: Path) -> Reference:
    train_x, train_y, heldout_x, heldout_y = digits_split()
    trained: TrainedClassifier = digits_classifier(train_x, train_y, heldout_x, heldout_y, folder=folder)
    featurize = functools.partial(classifier_features, trained.model)
    mu, sigma = feature_statistics(featurize(heldout_x))
    floor = frechet_distance(*feature_statistics(featurize(train_x)), mu, sigma)
    info = {"classifier_accuracy": trained.heldout_accuracy, "heldout_images": len(heldout_x)}
    log.info("digits classifier: held-out accuracy %.4f; floor %.4f", trained.heldout_accuracy, floor)
    return Reference("frechet_distance", featurize, mu, sigma, floor, info)


def digits_reference() -> Reference:
    """The held-out digits in the digits classifier's feature space (classifier cached under cache_dir())."""
    return _digits_reference(cache_dir())


def digits_floor() -> float:
    """Fréchet distance of the held-out digits to the training split: what a perfect model would score."""
    floor = digits_reference().floor
    assert floor is not None
    return floor


def frechet_distance_for_samples(images: torch.Tensor) -> float:
    """Fréchet distance of (N, 1, 8, 8) images in [-1, 1] to the held-out digits (digits classifier space)."""
    if tuple(images.shape[1:]) != DIGITS_SHAPE:
        raise ValueError(f"digits Fréchet distance needs (N, 1, 8, 8) images, got {tuple(images.shape)}")
    return digits_reference().distance(images)


def real_images_for_fid(data: str | None, cfg: ModelConfig) -> tuple[torch.Tensor, str]:
    """Real images for FID: the held-out digits for digits checkpoints, else what `--data` names."""
    if data in (None, "digits") and cfg.image_shape == DIGITS_SHAPE:
        return digits_split()[2], "digits held-out split"
    if data is None:
        raise EvaluationError(
            f"--data: needed for FID of a {'x'.join(map(str, cfg.image_shape))} checkpoint; "
            "give cifar10:PATH or folder:PATH"
        )
    try:
        dataset = load_data(data, cfg.image_size, cfg.image_channels)
    except DataError as e:
        raise EvaluationError(str(e)) from None
    return dataset.images, data


def memorisation_images(meta: CheckpointMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, held-out images) for a digits checkpoint: the split it trained on (its data fraction)."""
    cfg, prov = meta.config, meta.provenance
    if cfg.image_shape != DIGITS_SHAPE or prov.get("data", "digits") != "digits":
        raise EvaluationError(
            f"--memorisation: only for checkpoints trained on digits; this one is "
            f"{'x'.join(map(str, cfg.image_shape))} trained on {prov.get('data')!r}"
        )
    return subset(load_digits_train(), prov.get("data_fraction", 1.0)).images, digits_split()[2]


def inception_reference(
    weights: str | Path, data: str | None, cfg: ModelConfig, device: torch.device, batch: int
) -> Reference:
    network = load_inception(weights, device)
    featurize = functools.partial(inception_features, network, batch=min(batch, 100), device=device)
    real, source = real_images_for_fid(data, cfg)
    log.info("Inception features of %d real images (%s)", len(real), source)
    mu, sigma = feature_statistics(featurize(real))
    return Reference("fid", featurize, mu, sigma, None, {"fid_real_images": source})


def references_for(
    cfg: ModelConfig, inception_weights: str | Path | None, data: str | None, device: torch.device, batch: int
) -> list[Reference]:
    """The digits feature space for digits checkpoints, plus Inception FID when a weights file is given."""
    digits = cfg.image_shape == DIGITS_SHAPE
    if inception_weights is None and data not in (None, "digits"):
        raise EvaluationError(f"--data {data}: real images are only used for FID; add --inception-weights PATH")
    if inception_weights is None and not digits:
        shape = "x".join(map(str, cfg.image_shape))
        raise EvaluationError(
            f"--inception-weights: required for a {shape} checkpoint (the digits classifier only scores "
            "1x8x8 images); give the local pt_inception weights file and --data cifar10:PATH or folder:PATH"
        )
    fid = [inception_reference(inception_weights, data, cfg, device, batch)] if inception_weights else []
    return ([digits_reference()] if digits else []) + fid


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def generation_seeds(n: int, seed: int) -> list[int]:
    """n per-image sampling seeds drawn from one generator seeded with `seed`."""
    return torch.randint(SEED_SPACE, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def balanced_labels(n: int, num_classes: int, seed: int) -> list[int] | None:
    """Class labels for a conditional model: each class n/K times (±1), in a seeded random order."""
    if not num_classes:
        return None
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=gen)].tolist()


def generate(
    ck: LoadedCheckpoint, sigmas: Sequence[float], n: int, seed: int, batch: int, device: torch.device
) -> torch.Tensor:
    """n images (N, C, H, W) in [-1, 1] on the CPU; the same seed gives the same x_T for every schedule."""
    return generate_with(
        lambda s, y: sample(ck.model, s, sigmas, y, device=device), ck.meta.num_classes, n, seed, batch
    )


def generate_heun(
    ck: LoadedCheckpoint, steps: int, n: int, seed: int, batch: int, device: torch.device
) -> torch.Tensor:
    """n images of a denoiser by EDM's Heun sampler (2·steps − 1 evaluations), from the x_T `generate` uses."""
    return generate_with(
        lambda s, y: sample_heun(ck.model, s, steps, y, device=device), ck.meta.num_classes, n, seed, batch
    )


def generate_with(
    draw: Callable[[list[int], list[int] | None], torch.Tensor], num_classes: int, n: int, seed: int, batch: int
) -> torch.Tensor:
    """n images from `draw(seeds, labels)`, `batch` at a time, with the evaluation's seeds and balanced labels."""
    seeds = generation_seeds(n, seed)
    labels = balanced_labels(n, num_classes, seed)
    parts = []
    for start in range(0, n, batch):
        chunk_labels = labels[start : start + batch] if labels is not None else None
        parts.append(draw(seeds[start : start + batch], chunk_labels).cpu())
    return torch.cat(parts).float()


def sampled(
    ck: LoadedCheckpoint,
    steps: Sequence[int] | None,
    heun_steps: Sequence[int] | None,
    n: int,
    seed: int,
    batch: int,
    device: torch.device,
) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """Each evaluated sampler's row head and images: the recommended schedules of `steps` for a consistency model,
    EDM's Heun sampler with `heun_steps` for a denoiser."""
    cfg = ck.meta.config
    if cfg.kind == "denoiser":
        if steps is not None:
            raise EvaluationError(
                f"--steps: {ck.path} is an EDM denoiser, sampled by Heun; give --heun-steps N (2N − 1 evaluations)"
            )
        for k in heun_steps or DEFAULT_HEUN_STEPS:
            sigmas = heun_sigmas(k, cfg.sigma_min, cfg.sigma_max, cfg.rho)
            images = generate_heun(ck, k, n, seed, batch, device)
            yield {"steps": k, "nfe": heun_evaluations(k), "sigmas": sigmas}, images
        return
    if heun_steps is not None:
        raise EvaluationError(f"--heun-steps: {ck.path} is a consistency model; give --steps")
    for k in steps or DEFAULT_STEPS:
        sigmas = recommended_sigmas(ck.meta, k)
        yield {"steps": k, "sigmas": sigmas}, generate(ck, sigmas, n, seed, batch, device)


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------


def resolve_device(device: torch.device | str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvaluationError(f"--device {device!r}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"--device {device}: CUDA is not available on this machine; use cpu")
    return dev


def evaluate_checkpoint(
    path: str | Path,
    steps: Sequence[int] | None = None,
    n_samples: int = 2000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch: int = 500,
    inception_weights: str | Path | None = None,
    data: str | None = None,
    memorisation: bool = False,
    heun_steps: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Fréchet distances of `n_samples` samples per step count, with the checkpoint's recommended schedules
    (default 1 and 2 steps); a denoiser's per Heun step count (default 18, 35 evaluations)."""
    dev = resolve_device(device)
    ck = load(path, device=dev)
    refs = references_for(ck.meta.config, inception_weights, data, dev, batch)
    memo = memorisation_images(ck.meta) if memorisation else None
    rows = []
    for row, images in sampled(ck, steps, heun_steps, n_samples, seed, batch, dev):
        for ref in refs:
            row[ref.name] = ref.distance(images)
            if ref.floor is not None:
                row["ratio_to_floor"] = row[ref.name] / ref.floor
        if memo is not None:
            row["memorisation_ratio"] = memorisation_ratio(images, *memo)
        log.info("%d step(s): %s", row["steps"], {key: v for key, v in row.items() if key != "sigmas"})
        rows.append(row)
    report: dict[str, Any] = {"checkpoint": str(path), "sha256": ck.sha256, "samples": n_samples, "seed": seed}
    for ref in refs:
        report.update(ref.info)
        if ref.floor is not None:
            report["floor"] = ref.floor
    if memo is not None:
        report["memorisation_train_images"] = len(memo[0])
    return report | {"results": rows}


# ---------------------------------------------------------------------------------------------------
# The middle σ of 2-step sampling
# ---------------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    best_x: float
    best_value: float
    trace: list[tuple[float, float, float, float, float, float]]  # (lo, hi, x1, f(x1), x2, f(x2)) per round


def ternary_search(objective: Callable[[float], float], lo: float, hi: float, iterations: int) -> SearchResult:
    """Minimise a unimodal objective on (lo, hi): each round keeps the two thirds holding the lower probe.

    Returns the best probe seen: for a unimodal objective, the better probe of the last round, which is
    the midpoint of the final bracket.
    """
    if not lo < hi or iterations < 1:
        raise ValueError(f"need lo < hi and iterations >= 1, got lo={lo}, hi={hi}, iterations={iterations}")
    trace = []
    for _ in range(iterations):
        x1, x2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        f1, f2 = objective(x1), objective(x2)
        trace.append((lo, hi, x1, f1, x2, f2))
        lo, hi = (lo, x2) if f1 < f2 else (x1, hi)
    _, _, x1, f1, x2, f2 = min(trace, key=lambda t: min(t[3], t[5]))
    return SearchResult(*((x1, f1) if f1 <= f2 else (x2, f2)), trace)


def write_schedule(path: str | Path, steps: int, sigmas: Sequence[float], out: str | Path | None = None) -> Path:
    """Rewrite a checkpoint with `sigmas` as its schedule for `steps`; weights and other metadata unchanged."""
    ck = load(path)  # CPU float32, the stored dtype: the weights go back bit-identical
    meta = ck.meta
    sig = validate_sigmas(sigmas, meta.config.sigma_min, meta.config.sigma_max)
    return save(
        out or path,
        ck.model,
        preset=meta.preset,
        class_names=meta.class_names,
        training_step=meta.training_step,
        schedules={**meta.schedules, steps: sig},
        provenance=meta.provenance,
    )


def search_mid_sigma(
    path: str | Path,
    n_samples: int = 500,
    iterations: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch: int = 500,
    inception_weights: str | Path | None = None,
    data: str | None = None,
    out: str | Path | None = None,
) -> SearchResult:
    """Ternary search over log σ_mid of [σ_max, σ_mid] on a fixed-seed Fréchet distance; writes the best."""
    dev = resolve_device(device)
    ck = load(path, device=dev)
    if ck.meta.config.kind == "denoiser":
        raise EvaluationError(
            f"--search-mid-sigma: {path} is an EDM denoiser; it samples by Heun (--heun-steps) and "
            "has no 2-step schedule"
        )
    ref = references_for(ck.meta.config, inception_weights, data, dev, batch)[0]
    cfg = ck.meta.config

    def objective(log_sigma: float) -> float:
        value = ref.distance(generate(ck, [cfg.sigma_max, math.exp(log_sigma)], n_samples, seed, batch, dev))
        log.info("  σ_mid = %-10.5g %s = %.4f", math.exp(log_sigma), ref.name, value)
        return value

    result = ternary_search(objective, math.log(cfg.sigma_min), math.log(cfg.sigma_max), iterations)
    if load(path).sha256 != ck.sha256:
        raise EvaluationError(f"CHECKPOINT {path}: the file changed during the search; not rewriting it")
    written = write_schedule(path, 2, [cfg.sigma_max, math.exp(result.best_x)], out)
    log.info("wrote steps=2 schedule [%g, %.5g] into %s", cfg.sigma_max, math.exp(result.best_x), written)
    return result


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def steps_list(text: str) -> tuple[int, ...]:
    try:
        steps = tuple(int(s) for s in text.split(","))
    except ValueError:
        steps = ()
    if not steps or min(steps) < 1 or len(set(steps)) != len(steps):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct positive step counts like 1,2")
    return steps


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", type=Path, help="a cmserve .safetensors checkpoint")
    p.add_argument("--steps", type=steps_list, help="step counts to evaluate (default 1,2)")
    p.add_argument(
        "--heun-steps",
        type=steps_list,
        help="a denoiser's Heun steps N, 2N − 1 evaluations each (default 18: 35 evaluations)",
    )
    p.add_argument("--samples", type=int_at_least(2), default=2000, help="generated images per step count")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the sampling seeds and labels")
    p.add_argument("--batch", type=int_at_least(1), default=500, help="images per sampling batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--inception-weights", type=Path, help="local pt_inception-2015-12-05 .pth or .safetensors")
    p.add_argument("--data", help="real images for FID: digits (default), cifar10:PATH or folder:PATH")
    p.add_argument("--memorisation", action="store_true", help="add the nearest-training-digit distance ratio")
    p.add_argument("--search-mid-sigma", action="store_true", help="find and write the best 2-step middle σ")
    p.add_argument("--search-samples", type=int_at_least(2), default=500, help="images per search probe")
    p.add_argument("--search-iters", type=int_at_least(1), default=8, help="ternary search rounds")
    p.add_argument("--out", type=Path, help="with --search-mid-sigma: write here instead of CHECKPOINT")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def format_report(report: dict[str, Any]) -> str:
    lines = [f"checkpoint {report['checkpoint']} (sha256 {report['sha256'][:16]}…), {report['samples']} samples"]
    if "floor" in report:
        lines.append(f"digits classifier held-out accuracy: {report['classifier_accuracy']:.4f}")
        lines.append(f"floor (held-out vs training split): {report['floor']:.4f}")
    if "fid_real_images" in report:
        lines.append(f"FID real images: {report['fid_real_images']}")
    lines.append(f"{'steps':>5}  {'Fréchet dist.':>13}  {'× floor':>8}  {'FID':>8}  sigmas")
    for r in report["results"]:
        fd, ratio, fid = (r.get(k) for k in ("frechet_distance", "ratio_to_floor", "fid"))
        cells = [f"{v:>{w}.4f}" if v is not None else f"{'-':>{w}}" for v, w in ((fd, 13), (ratio, 8), (fid, 8))]
        how = f"Heun, {r['nfe']} evaluations" if "nfe" in r else [round(s, 5) for s in r["sigmas"]]
        lines.append(f"{r['steps']:>5}  {'  '.join(cells)}  {how}")
    if "memorisation_train_images" in report:
        lines.append(
            f"nearest-training-digit distance ratio ({report['memorisation_train_images']} training "
            "images; ≈1 new digits, ≪1 copies):"
        )
        lines.extend(f"{r['steps']:>5}  {r['memorisation_ratio']:.4f}" for r in report["results"])
    return "\n".join(lines)


def format_trace(result: SearchResult) -> str:
    lines = ["ternary search over log σ_mid:", f"{'round':>5}  {'bracket σ':>21}  {'probe σ → value':>40}"]
    for i, (lo, hi, x1, f1, x2, f2) in enumerate(result.trace, 1):
        e = math.exp
        lines.append(f"{i:>5}  [{e(lo):9.4g}, {e(hi):9.4g}]  {e(x1):9.4g} → {f1:9.4f}  {e(x2):9.4g} → {f2:9.4f}")
    lines.append(f"best σ_mid = {math.exp(result.best_x):.5g} (value {result.best_value:.4f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch_args = {"seed": args.seed, "device": args.device, "batch": args.batch}
    fid_args = {"inception_weights": args.inception_weights, "data": args.data}
    try:
        if args.out is not None and not args.search_mid_sigma:
            raise EvaluationError(f"--out {args.out}: only used with --search-mid-sigma")
        if args.search_mid_sigma:
            result = search_mid_sigma(
                args.checkpoint, args.search_samples, args.search_iters, out=args.out, **torch_args, **fid_args
            )
            print(format_trace(result))
        target = args.out if args.search_mid_sigma and args.out else args.checkpoint
        report = evaluate_checkpoint(
            target,
            args.steps,
            args.samples,
            **torch_args,
            **fid_args,
            memorisation=args.memorisation,
            heun_steps=args.heun_steps,
        )
    except (CheckpointError, EvaluationError, InceptionWeightsError) as e:
        flag = "CHECKPOINT " if isinstance(e, CheckpointError) else ""  # the others name their flag
        print(f"error: {flag}{e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
