"""Zero-shot editing on the digits default, scored by the project's digits classifier (BENCHMARKS.md, "Editing").

    python -m bench.edit_quality                 # every held-out digit, 1, 2 and 4 steps
    python -m bench.edit_quality --limit 100 --steps 1

Inpainting: the upper half of each held-out digit is given, the lower half regenerated with class_label = its
true class; reported: the share the classifier reads as that class, against the classifier on the real digits
(and on the given half alone, the lower half at 0). Super-resolution 4×4 → 8×8 (the 2×2 patch means given):
classifier agreement with the true class and mean squared error against the originals (in [-1, 1] units),
against bicubic upsampling; the model is conditioned on the true class ("oracle") or on the class the
classifier reads in the bicubic image (no oracle). Every image i uses seed i, as the service would.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
import torch.nn.functional as F

from bench.harness import EMBEDDED_DEFAULT
from models import checkpoint
from models.editing import Projection, inpainting, super_resolution
from models.sampling import sample
from training.data import digits_split
from training.features import digits_classifier

FACTOR = 2  # 4×4 -> 8×8


def batched(projections: list[Projection]) -> Projection:
    """One projection for a batch whose images each have their own reference (`kept` stacked)."""
    return dataclasses.replace(projections[0], kept=torch.cat([p.kept for p in projections]))


def inpaint_lower_half(x: torch.Tensor) -> Projection:
    mask = torch.zeros(x.shape[-2:])
    mask[x.shape[-2] // 2 :] = 1  # regenerate the lower half
    return batched([inpainting(image, mask) for image in x])


def super_resolve(low: torch.Tensor) -> Projection:
    return batched([super_resolution(image, FACTOR) for image in low])


def edit(model: torch.nn.Module, projection: Projection, sigmas: list[float], labels: torch.Tensor) -> torch.Tensor:
    n = len(labels)
    return sample(model, list(range(n)), sigmas, class_labels=labels.tolist(), projection=projection,
                  start=projection.start)


def share(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((classifier(images.clamp(-1, 1)).argmax(1) == labels).float().mean())


def mse(images: torch.Tensor, originals: torch.Tensor) -> float:
    return float(((images.clamp(-1, 1) - originals) ** 2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=0, help="first N held-out digits (0: all)")
    parser.add_argument("--steps", default="1,2,4", help="sampling steps to measure, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_x, train_y, x, y = digits_split()
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    classifier = digits_classifier(train_x, train_y, x, y).model
    loaded = checkpoint.load(EMBEDDED_DEFAULT)
    model, meta = loaded.model, loaded.meta
    steps = [int(s) for s in args.steps.split(",")]
    print(f"{len(x)} held-out digits; checkpoint {EMBEDDED_DEFAULT.name} (sha256 {loaded.sha256[:12]}…)")
    print(f"real held-out digits: classifier reads the true class for {share(classifier, x, y):.3f}")

    projection = inpaint_lower_half(x)
    print(f"inpainting, the given upper half alone: {share(classifier, projection.start, y):.3f}")
    for k in steps:
        started = time.perf_counter()
        out = edit(model, projection, checkpoint.recommended_sigmas(meta, k), y)
        print(f"inpainting, {k} step(s): {share(classifier, out, y):.3f}  "
              f"(lower-half MSE {mse(out[..., 4:, :], x[..., 4:, :]):.4f}, {time.perf_counter() - started:.1f} s)")

    low = F.avg_pool2d(x, FACTOR)  # (N, 1, 4, 4)
    bicubic = F.interpolate(low, scale_factor=FACTOR, mode="bicubic", align_corners=False).clamp(-1, 1)
    print(f"super-resolution 4x4 -> 8x8, bicubic: agreement {share(classifier, bicubic, y):.3f}, "
          f"MSE {mse(bicubic, x):.4f}")
    with torch.no_grad():
        read = classifier(bicubic).argmax(1)
    projection = super_resolve(low)
    for k in steps:
        for name, labels in (("oracle class", y), ("class read in bicubic", read)):
            out = edit(model, projection, checkpoint.recommended_sigmas(meta, k), labels)
            print(f"super-resolution, {k} step(s), {name}: agreement {share(classifier, out, y):.3f}, "
                  f"MSE {mse(out, x):.4f}")


if __name__ == "__main__":
    main()
