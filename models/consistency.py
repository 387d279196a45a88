"""The consistency parameterization f_θ(x, σ) wrapped around any backbone F_θ (CM §3, iCT §3)."""

from __future__ import annotations

import abc
from typing import Self

import torch
from torch import nn

from .adm import ADMUNet
from .config import ModelConfig
from .unet import UNet

BACKBONES: dict[str, type[nn.Module]] = {"unet": UNet, "adm": ADMUNet}  # ModelConfig.backbone -> F_θ


def boundary_scalings(
    sigma: torch.Tensor, sigma_min: float, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c_skip, c_out, c_in with the σ_min offset, so c_skip(σ_min) = 1 and c_out(σ_min) = 0 (CM eq. 6)."""
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)  # CM eq. 6 (σ_min-shifted)
    c_out = sigma_data * shifted / (sigma_data**2 + sigma**2).sqrt()  # CM eq. 6 (σ_min-shifted)
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()  # EDM Table 1, as used by CM/iCT
    return c_skip, c_out, c_in


def noise_conditioning(sigma: torch.Tensor, embedding: str) -> torch.Tensor:
    """c_noise(σ): 0.25·ln σ for Fourier backbones, 1000·0.25·ln(σ + 1e-44) for positional ones."""
    if embedding == "fourier":
        return 0.25 * sigma.log()  # NCSN++ / iCT
    return 1000 * 0.25 * (sigma + 1e-44).log()  # ADM / CM ImageNet 64


class Preconditioned(nn.Module, metaclass=abc.ABCMeta):
    """c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), class_labels) around any backbone F (EDM eq. 7's form);
    a subclass says which scalings: the consistency model's σ_min-shifted ones, or the EDM denoiser's."""

    def __init__(self, backbone: nn.Module, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = backbone  # the same attribute in every subclass: their state dicts match
        self.cfg = cfg
        self.sigma_min = cfg.sigma_min
        self.sigma_max = cfg.sigma_max
        self.sigma_data = cfg.sigma_data

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Self:
        return cls(BACKBONES[cfg.backbone](cfg), cfg)

    @abc.abstractmethod
    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip, c_out, c_in, each (B,), for σ (B,) in fp32."""

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        augment_labels: torch.Tensor | None = None,  # (B, augment_dim) in training; None when sampling
    ) -> torch.Tensor:
        # σ in fp32 whatever the activations' dtype: σ_min - σ_min is then exactly 0, c_skip exactly 1.
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape != (x.shape[0],):
            raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
        c_skip, c_out, c_in = (c.reshape(-1, 1, 1, 1) for c in self.scalings(sigma))  # each (B, 1, 1, 1)
        c_noise = noise_conditioning(sigma, self.cfg.embedding)
        f_x = self.backbone((c_in * x).to(x.dtype), c_noise, class_labels, augment_labels)
        return (c_skip * x + c_out * f_x.to(torch.float32)).to(x.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ConsistencyModel(Preconditioned):
    """f(x, σ, class_labels) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ), class_labels), f(x, σ_min) = x."""

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return boundary_scalings(sigma, self.sigma_min, self.sigma_data)
