"""EDM's denoiser D_θ(x, σ) around any backbone, and EDM's deterministic Heun sampler (Karras et al. 2022, "EDM").

The denoiser is what a consistency model is tuned (ECT) or distilled (CD) from: the same backbone F_θ under
EDM's unshifted scalings (EDM Table 1) with the consistency model's c_noise (models/consistency.py), so its
weights load into a `ConsistencyModel` unchanged. Its quality reference is the Heun sampler (EDM Algorithm 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .consistency import Preconditioned
from .sampling import image_class_label, image_noise, karras_sigmas

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # D(x, σ, labels)


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²), c_in = 1/√(σ² + σ_d²) (EDM Table 1, no σ_min shift)."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt(), 1 / total.sqrt()


class Denoiser(Preconditioned):
    """D(x, σ, class_labels) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), class_labels) (EDM eq. 7)."""

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return edm_scalings(sigma, self.sigma_data)


# --- EDM Algorithm 1: the deterministic Heun sampler ------------------------------------------------------------


def heun_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """t_0 = σ_max > … > t_{N−1} = σ_min, then t_N = 0 (EDM eq. 5); N = `steps` >= 1 (1: [σ_max, 0])."""
    if steps < 1:
        raise ValueError(f"Heun sampling needs steps >= 1, got {steps}")
    levels = [sigma_max] if steps == 1 else karras_sigmas(steps, sigma_min, sigma_max, rho).flip(0).tolist()
    return [*levels, 0.0]


def heun_evaluations(steps: int) -> int:
    """Network evaluations of an N-step Heun sample: 2N − 1 (the last step is Euler; EDM Table 2: 18 steps, 35)."""
    return 2 * steps - 1


def as_column(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-image (B,) noise level as (B, 1, 1, 1) in x's dtype and device."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def ode_derivative(x: torch.Tensor, denoised: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt = (x − D(x; t))/t, the probability-flow ODE with σ(t) = t (EDM eq. 3 and Algorithm 1, line 4)."""
    return (x - denoised) / t


def euler_step(
    denoise: DenoiseFn,
    x: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + (t′ − t)·d with d at (x, t): one evaluation (EDM Algorithm 1, lines 4-5; the last step, to t′ = 0)."""
    t_col, next_col = as_column(t, x), as_column(t_next, x)
    d = ode_derivative(x, denoise(x, t_col.flatten(), class_labels), t_col)
    return x + (next_col - t_col) * d


def heun_step(
    denoise: DenoiseFn,
    x: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + (t′ − t)·(d + d′)/2, d′ at the Euler point (x′, t′): two evaluations, t′ > 0 (EDM Algorithm 1, lines 4-8)."""
    t_col, next_col = as_column(t, x), as_column(t_next, x)
    d = ode_derivative(x, denoise(x, t_col.flatten(), class_labels), t_col)  # line 4
    x_euler = x + (next_col - t_col) * d  # line 5
    d_next = ode_derivative(x_euler, denoise(x_euler, next_col.flatten(), class_labels), next_col)  # line 7
    return x + (next_col - t_col) * (0.5 * d + 0.5 * d_next)  # line 8


@torch.no_grad()
def heun_sample(
    denoiser: nn.Module, x_T: torch.Tensor, steps: int, class_labels: torch.Tensor | None = None
) -> torch.Tensor:
    """EDM Algorithm 1 from x_T = t_0·z: Heun steps down the Karras levels, the last one an Euler step to 0."""
    cfg = denoiser.cfg
    sigmas = heun_sigmas(steps, cfg.sigma_min, cfg.sigma_max, cfg.rho)
    x = x_T
    for t, t_next in itertools.pairwise(sigmas):
        step = heun_step if t_next > 0 else euler_step  # Algorithm 1, line 6: the second order only if t′ ≠ 0
        x = step(denoiser, x, t, t_next, class_labels)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: nn.Module,
    seeds: Sequence[int],
    steps: int,
    class_labels: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Seeded front end: image i starts from seeds[i]'s z_1 (as 1-step consistency sampling does); output in [-1, 1]."""
    param = next(denoiser.parameters())
    device = torch.device(device) if device is not None else param.device
    cfg = denoiser.cfg
    z = torch.stack([image_noise(s, cfg.image_shape, 1)[0] for s in seeds]).to(device=device, dtype=param.dtype)
    labels = None
    if cfg.num_classes:
        if class_labels is None:
            class_labels = [image_class_label(s, cfg.num_classes) for s in seeds]
        labels = torch.as_tensor(list(class_labels), dtype=torch.long, device=device)
    return heun_sample(denoiser, cfg.sigma_max * z, steps, labels).clamp(-1, 1)  # (B, C, H, W)
