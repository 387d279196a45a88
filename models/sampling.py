"""Noise schedules and consistency sampling (CM Algorithm 1), with per-image seeded noise."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
LABEL_SEED_SALT = 0x5DEECE66D  # keeps an image's class-label draw apart from its noise stream


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> torch.Tensor:
    """Ascending Karras grid σ_1 < … < σ_n (EDM eq. 5; CM §3, iCT §3), float64."""
    if n < 2:
        raise ValueError(f"a Karras grid needs n >= 2 levels, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)  # (i - 1) / (N - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + ramp * (hi - lo)) ** rho


def default_sigmas(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> list[float]:
    """The schedule used when a checkpoint recommends none.

    One step is [σ_max]; two steps use the iCT paper's CIFAR-10 middle σ of 0.821; more steps take the
    top `steps` levels of a descending Karras grid of steps + 1 levels (which ends at σ_min, dropped).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [sigma_max]
    if steps == 2:
        return [sigma_max, 0.821]
    grid = karras_sigmas(steps + 1, sigma_min, sigma_max).flip(0)
    return [float(s) for s in grid[:steps]]


def validate_sigmas(sigmas: Sequence[float], sigma_min: float, sigma_max: float) -> list[float]:
    """A sampling schedule must be strictly decreasing, start at or below σ_max and stay above σ_min."""
    sig = [float(s) for s in sigmas]
    if not sig:
        raise ValueError("sigmas must hold at least one value")
    if not all(np.isfinite(sig)):
        raise ValueError("sigmas must be finite numbers")
    if sig[0] > sigma_max:
        raise ValueError(f"sigmas[0] = {sig[0]} exceeds sigma_max = {sigma_max}")
    if any(b >= a for a, b in itertools.pairwise(sig)):
        raise ValueError(f"sigmas must be strictly decreasing, got {sig}")
    if sig[-1] <= sigma_min:
        raise ValueError(f"every sigma must be > sigma_min = {sigma_min}, got {sig[-1]}")
    return sig


def renoise_scale(sigma: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """√(σ² − σ_min²) in float64, the noise that takes an estimate back to level σ (CM Algorithm 1, line 5)."""
    return (sigma.to(torch.float64) ** 2 - sigma_min**2).sqrt()


def noise_scales(sigmas: Sequence[float], sigma_min: float) -> list[float]:
    """Each step's noise scale as float32 values: σ_1 (x_T = σ_1·z_1, line 1), then √(σ_j² − σ_min²) (line 5)."""
    sigma32 = torch.tensor(list(sigmas), dtype=torch.float32)
    scales = renoise_scale(sigma32, sigma_min).to(torch.float32)
    scales[0] = sigma32[0]
    return scales.tolist()


def renoise(x: torch.Tensor | None, scale: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
    """A step's input x + scale·z, with one scale (B,) per image or one for all; x None stands for estimates
    of zero, whose input is scale·z (x_T = σ_1·z_1 at the first step) (CM Algorithm 1, lines 1 and 5)."""
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(-1, *([1] * (z.ndim - 1)))
    noise = scale * z
    return noise if x is None else x + noise


def step_input(x: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor, sigma_min: float) -> torch.Tensor:
    """Re-noise a denoised estimate to level σ: x + √(σ² − σ_min²)·z (CM Algorithm 1, line 5)."""
    return renoise(x, renoise_scale(sigma, sigma_min).to(x.dtype), z)


@torch.no_grad()
def multistep_sample(
    model: torch.nn.Module,
    x_T: torch.Tensor,
    sigmas: Sequence[float],
    noises: Sequence[torch.Tensor],
    class_labels: torch.Tensor | None = None,
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """CM Algorithm 1 with explicit noise: x_T is already σ_1·z_1; noises[j-1] is z_{j+1}. With a `projection`
    (models.editing) each estimate is projected before it is re-noised: CM Algorithm 4, zero-shot editing."""
    project = projection or (lambda x: x)
    sig = validate_sigmas(sigmas, model.sigma_min, model.sigma_max)
    if len(noises) != len(sig) - 1:
        raise ValueError(f"need {len(sig) - 1} step noises for {len(sig)} sigmas, got {len(noises)}")
    batch = x_T.shape[0]
    x = project(model(x_T, torch.full((batch,), sig[0]), class_labels).clamp(-1, 1))  # Algorithm 1, line 1
    for tau, z in zip(sig[1:], noises, strict=True):
        tau_b = torch.full((batch,), tau, device=x.device)
        x = step_input(x, tau_b, z.to(x), model.sigma_min)  # Algorithm 1, line 5
        x = project(model(x, tau_b, class_labels).clamp(-1, 1))  # Algorithm 1, line 6 (Algorithm 4, line 8)
    return x


def image_noise(seed: int, shape: Sequence[int], steps: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """All noise one image needs, (steps, C, H, W), from its own CPU generator seeded with `seed`.

    Drawn on the CPU so that the same seed gives the same noise on every device and in every batch;
    z_1 is the same whatever the number of steps, so 1-, 2- and 4-step images of a seed share x_T.
    `generator`: a CPU generator to reseed instead of making one (same values, less work per image).
    """
    gen = (generator or torch.Generator(device="cpu")).manual_seed(seed)
    return torch.randn((steps, *shape), generator=gen, dtype=torch.float32)


def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation between two noises (Shoemake 1985; CM §6.3 interpolates x_T this way), in float64:
    sin((1 − α)θ)/sin θ · a + sin(αθ)/sin θ · b with θ the angle between them; α = 0 gives a, α = 1 gives b
    exactly (the linear mix when they are parallel)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    cos = (a64.flatten() @ b64.flatten()) / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    if float(theta.sin()) < 1e-12:
        return ((1 - alpha) * a64 + alpha * b64).to(a.dtype)
    mixed = (torch.sin((1 - alpha) * theta) * a64 + torch.sin(alpha * theta) * b64) / theta.sin()
    return mixed.to(a.dtype)


def interpolation_noise(seeds: tuple[int, int], alphas: Sequence[float], shape: Sequence[int], steps: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """All noise of K interpolated images, (K, steps, C, H, W): image k's z_1 is slerp(z_1(a), z_1(b), α_k), and
    its later step noises are seed a's, so that the images differ by x_T alone (and each by its α alone)."""
    a = image_noise(seeds[0], shape, steps, generator)
    b = image_noise(seeds[1], shape, 1, generator)[0]
    noise = a.unsqueeze(0).repeat(len(alphas), *([1] * a.ndim))
    for k, alpha in enumerate(alphas):
        noise[k, 0] = slerp(a[0], b, alpha)
    return noise


def image_class_label(seed: int, num_classes: int, generator: torch.Generator | None = None) -> int:
    """A class label drawn from the image's seed alone (for conditional models when none is given)."""
    gen = (generator or torch.Generator(device="cpu")).manual_seed(seed ^ LABEL_SEED_SALT)
    return int(torch.randint(num_classes, (), generator=gen))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    seeds: Sequence[int],
    sigmas: Sequence[float],
    class_labels: Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Seeded front end: image i uses seeds[i] alone for x_T and every step noise; output in [-1, 1].

    Editing (CM Algorithm 4): x_T = start + σ_1·z_1, start being what is known of the image (1, C, H, W)
    (models.editing.Projection.start), and each estimate goes through `projection`."""
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    cfg = model.cfg
    noise = torch.stack([image_noise(s, cfg.image_shape, len(sigmas)) for s in seeds], dim=1)
    noise = noise.to(device=device, dtype=dtype)  # (steps, B, C, H, W)
    labels = None
    if cfg.num_classes:
        if class_labels is None:
            class_labels = [image_class_label(s, cfg.num_classes) for s in seeds]
        labels = torch.as_tensor(list(class_labels), dtype=torch.long, device=device)
    x_T = renoise(None if start is None else start.to(noise), float(sigmas[0]), noise[0])
    return multistep_sample(model, x_T, sigmas, list(noise[1:]), labels, projection)


def uint8_images(x: torch.Tensor) -> torch.Tensor:
    """A batch in [-1, 1], (B, C, H, W), as uint8 images (B, H, W, C) on its own device (a permuted view)."""
    x = x.detach().float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)  # in place after the clamp's copy
    return x.permute(0, 2, 3, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """A batch in [-1, 1], (B, C, H, W), as uint8 images (B, H, W, C) in host memory."""
    return uint8_images(x).cpu().numpy()
