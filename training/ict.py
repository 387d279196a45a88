"""The iCT formulas (Song & Dhariwal, "Improved Techniques for Training Consistency Models", 2023).

One pure function per formula, named for the paper's symbol; see shared/docs/ict-recipe.md. Sections are
the paper's: §3.1 weighting, noise embedding, dropout; §3.2 no EMA teacher; §3.3 pseudo-Huber;
§3.4 discretization curriculum; §3.5 lognormal noise schedule.
"""

from __future__ import annotations

import math

import torch

P_MEAN = -1.1  # iCT §3.5: lognormal timestep distribution
P_STD = 2.0
S0 = 10  # iCT §3.4: initial number of discretization intervals
S1 = 1280  # iCT §3.4: final number of discretization intervals


def curriculum_stage_length(total_steps: int, s0: int = S0, s1: int = S1) -> int:
    """K′ = ⌊K / (log2⌊s1/s0⌋ + 1)⌋, the iterations per doubling of N (iCT §3.4); at least 1."""
    return max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))


def discretization_steps(k: int, total_steps: int, s0: int = S0, s1: int = S1) -> int:
    """N(k) = min(s0·2^⌊k/K′⌋, s1) + 1 levels at iteration k of K (iCT §3.4: exponential curriculum)."""
    doublings = k // curriculum_stage_length(total_steps, s0, s1)
    return min(s0 * 2 ** min(doublings, 62), s1) + 1


def timestep_probabilities(sigmas: torch.Tensor, p_mean: float = P_MEAN, p_std: float = P_STD) -> torch.Tensor:
    """p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2·P_std)) − erf((ln σ_i − P_mean)/(√2·P_std)), i = 1…N−1 (iCT §3.5)."""
    cdf = torch.erf((sigmas.to(torch.float64).log() - p_mean) / (math.sqrt(2) * p_std))  # (N,)
    mass = cdf[1:] - cdf[:-1]  # (N-1,) lognormal mass of each interval [σ_i, σ_{i+1}]
    return mass / mass.sum()


def pseudo_huber_c(dim: int) -> float:
    """c = 0.00054·√D for data of dimension D (iCT §3.3)."""
    return 0.00054 * math.sqrt(dim)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """d(a, b) = √(‖a − b‖₂² + c²) − c with the norm over each whole sample (iCT §3.3); shape (B,)."""
    sq = (a - b).flatten(1).square().sum(dim=1)  # (B,) squared L2 over channels and pixels
    return (sq + c * c).sqrt() - c


def loss_weights(sigma_i: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """λ(σ_i) = 1 / (σ_{i+1} − σ_i) (iCT §3.1)."""
    return 1.0 / (sigma_next - sigma_i)
