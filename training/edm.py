"""EDM's denoising objective (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

One pure function per formula, named for the paper's symbol (EDM Table 1, "Training" rows; §5). The denoiser
D_θ itself and its Heun sampler live in models/denoiser.py.
"""

from __future__ import annotations

import torch

P_MEAN = -1.2  # EDM Table 1: ln σ ~ N(P_mean, P_std²) during training
P_STD = 1.2


def sample_sigmas(n: int, p_mean: float, p_std: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """σ = exp(P_mean + P_std·ξ), ξ ~ N(0, 1): n lognormal noise levels (EDM Table 1; ECT's p(t)); shape (n,)."""
    return (torch.randn(n, device=device) * p_std + p_mean).exp()


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (EDM Table 1), which makes the effective weight of F_θ's error 1 (EDM eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(denoised: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """λ(σ)·‖D_θ(y + n; σ) − y‖² per image, averaged over its elements (EDM eq. 2; EDM's code sums them); shape (B,)."""
    return loss_weight(sigma, sigma_data) * (denoised - y).flatten(1).square().mean(dim=1)
