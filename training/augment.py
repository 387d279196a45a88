"""EDM's non-leaking augmentation: random flips, translation, scaling, rotation, each with probability p, labelled.

Karras et al. 2022 (EDM), Appendix F.2 and NVlabs/edm `training/augment.py`: every image of a batch gets its own
random transformation, and the transformation's parameters become a 9-vector the network is conditioned on
(models/unet.py `augment_emb`). The network learns what an augmented image looks like *given* its label; at
sampling time the label is zero, so the augmentations do not leak into the generated images.

Ops in EDM's order, each applied to an image with probability p·(the op's multiplier): x-flip (multiplier 1e8,
so whenever p > 0 the coin is tossed and half the images are mirrored), y-flip, integer translation by
round(N(0, 1)·0.125·size) pixels, isotropic scaling by 2^(N(0, 1)·0.2), rotation by θ ~ U(−π, π), anisotropic
scaling by 2^(±N(0, 1)·0.2) along an axis that is itself rotated with probability ½. Flips and translation are
pixel moves (exact; translation reflects at the border); scaling, rotation and anisotropy are one bilinear
`grid_sample` with reflection at the border, applied only to the images that drew one of them. EDM's 2×
wavelet up/down-sampling around the resampling is left out (bilinear on 8×8 to 64×64 images).
Labels (B, 9): flip x, flip y, scale, cos θ − 1, sin θ, two aniso, tx, ty; zero for ops not applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9  # the length of the label vector, ModelConfig.augment_dim of a model trained with augmentation
SCALE_STD = 0.2  # log2 std of isotropic scaling (EDM scale_std)
ANISO_STD = 0.2  # log2 std of anisotropic scaling (EDM aniso_std)
ANISO_ROTATE_PROB = 0.5  # probability that the anisotropy's axis is rotated (EDM aniso_rotate_prob)
TRANSLATE_STD = 0.125  # std of the translation as a fraction of the image size (EDM translate_frac_std)
OPS = ("xflip", "yflip", "translate", "scale", "rotate", "aniso")  # AugmentPipe's ops, in EDM's order


@dataclass(frozen=True)
class AugmentPipe:
    """Per-image random augmentation with probability `p` per op (EDM's AugmentPipe with its CIFAR-10 settings)."""

    p: float  # EDM: 0.12 on CIFAR-10
    xflip: float = 1e8  # probability multipliers per op, EDM's training/train.py defaults
    yflip: float = 1.0
    translate: float = 1.0
    scale: float = 1.0
    rotate: float = 1.0
    aniso: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {self.p}")

    @classmethod
    def of(cls, p: float, ops: tuple[str, ...] | None = None) -> AugmentPipe:
        """The pipe with only `ops` (names of OPS; None: all, EDM's): the others never apply, their labels stay
        zero. Images that a mirror or a rotation changes the meaning of (digits: 6 and 9) leave those out."""
        unknown = sorted(set(ops or ()) - set(OPS))
        if unknown:
            raise ValueError(f"unknown augmentation ops {unknown}; the ops are {', '.join(OPS)}")
        return cls(p) if ops is None else cls(p, **{op: getattr(cls, op) if op in ops else 0.0 for op in OPS})

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented images, labels (B, 9)); with p = 0 the images themselves and zero labels."""
        b, _, h, w = images.shape
        labels = torch.zeros(b, AUGMENT_DIM, device=images.device)
        if self.p == 0:
            return images, labels
        draw = Draws(b, images.device, generator)

        # Pixel moves: flips and integer translation (exact).
        flip_x = draw.coin(0.5) & draw.coin(self.xflip * self.p)  # (B,) bool
        flip_y = draw.coin(0.5) & draw.coin(self.yflip * self.p)
        translate = draw.coin(self.translate * self.p)
        tx = (draw.normal() * TRANSLATE_STD * w).round() * translate  # (B,) whole pixels
        ty = (draw.normal() * TRANSLATE_STD * h).round() * translate
        images = shift_reflect(images, flip_x, flip_y, tx, ty)

        # Resampling: isotropic scale, rotation, anisotropic scale, composed into one inverse matrix per image.
        scale_on = draw.coin(self.scale * self.p)
        log_scale = draw.normal() * scale_on  # (B,) in units of SCALE_STD
        rotate_on = draw.coin(self.rotate * self.p)
        theta = draw.uniform(-math.pi, math.pi) * rotate_on
        aniso_on = draw.coin(self.aniso * self.p)
        log_aniso = draw.normal() * aniso_on
        phi = draw.uniform(-math.pi, math.pi) * draw.coin(ANISO_ROTATE_PROB)
        s, a = torch.exp2(log_scale * SCALE_STD), torch.exp2(log_aniso * ANISO_STD)
        g_inv = scale2d(1 / s, 1 / s) @ rotate2d(theta) @ rotate2d(phi) @ scale2d(1 / a, a) @ rotate2d(-phi)
        resampled = resample_reflect(images, g_inv)
        images = torch.where((scale_on | rotate_on | aniso_on)[:, None, None, None], resampled, images)

        labels = torch.stack(
            [
                flip_x.float(),
                flip_y.float(),
                log_scale,
                theta.cos() - 1,
                theta.sin(),
                log_aniso * phi.cos(),
                log_aniso * phi.sin(),
                tx / (TRANSLATE_STD * w),
                ty / (TRANSLATE_STD * h),
            ],
            dim=1,
        )  # (B, 9)
        return images, labels


class Draws:
    """Per-image random numbers from one generator on the images' device, always in the same order."""

    def __init__(self, n: int, device: torch.device, generator: torch.Generator) -> None:
        self.n, self.device, self.generator = n, device, generator

    def uniform(self, low: float = 0.0, high: float = 1.0) -> torch.Tensor:  # (B,)
        return torch.rand(self.n, device=self.device, generator=self.generator) * (high - low) + low

    def normal(self) -> torch.Tensor:  # (B,)
        return torch.randn(self.n, device=self.device, generator=self.generator)

    def coin(self, probability: float) -> torch.Tensor:  # (B,) bool; a uniform is drawn whatever the probability
        return self.uniform() < probability


def scale2d(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2) diag(sx, sy)."""
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero], -1), torch.stack([zero, sy], -1)], -2)


def rotate2d(theta: torch.Tensor) -> torch.Tensor:
    """(B, 2, 2) rotation by θ (x right, y down)."""
    c, s = theta.cos(), theta.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Index i mirrored into 0…n−1 without repeating the edge (torch's 'reflect' padding; EDM's translate_int)."""
    period = max(2 * n - 2, 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def shift_reflect(
    images: torch.Tensor, flip_x: torch.Tensor, flip_y: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor
) -> torch.Tensor:
    """out[y, x] = in[y', x'] with each image's flips and whole-pixel translation (tx, ty), reflected at the border."""
    b, c, h, w = images.shape
    xs = torch.arange(w, device=images.device).expand(b, w)  # (B, W)
    ys = torch.arange(h, device=images.device).expand(b, h)  # (B, H)
    xs = torch.where(flip_x[:, None], w - 1 - xs, xs)
    ys = torch.where(flip_y[:, None], h - 1 - ys, ys)
    xs = reflect_index(xs - tx.long()[:, None], w)
    ys = reflect_index(ys - ty.long()[:, None], h)
    index = (ys[:, :, None] * w + xs[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)  # (B, C, HW)
    return images.reshape(b, c, h * w).gather(2, index).reshape(b, c, h, w)


def resample_reflect(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Bilinear out(p) = in(G⁻¹·p) about the image centre, p in pixels, reflected at the border (one grid_sample)."""
    h, w = images.shape[-2:]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    x = torch.arange(w, device=images.device, dtype=g_inv.dtype) - cx
    y = torch.arange(h, device=images.device, dtype=g_inv.dtype) - cy
    p = torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), -1)  # (H, W, 2) output pixel offsets (x, y)
    q = torch.einsum("bij,hwj->bhwi", g_inv, p)  # (B, H, W, 2) input pixel offsets
    grid = q / torch.tensor([max(cx, 0.5), max(cy, 0.5)], device=images.device, dtype=q.dtype)  # align_corners=True
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection", align_corners=True)
