"""The original consistency training (CT) formulas of Song et al., "Consistency Models" (2023), as a baseline."""

from __future__ import annotations

import math

import torch

S0 = 2  # CM Table 3 (CIFAR-10): initial discretization steps
S1 = 150  # CM Table 3 (CIFAR-10): final discretization steps
MU0 = 0.9  # CM Table 3 (CIFAR-10): EMA decay of the target network at the start


def discretization_steps(k: int, total_steps: int, s0: int = S0, s1: int = S1) -> int:
    """N(k) = ⌈√(k/K·((s1+1)² − s0²) + s0²) − 1⌉ + 1 (CM Appendix C: square-root curriculum)."""
    return math.ceil(math.sqrt(k / total_steps * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def target_ema_decay(n_k: int, s0: int = S0, mu0: float = MU0) -> float:
    """μ(k) = exp(s0·ln μ0 / N(k)), the EMA decay of the target network (CM Appendix C)."""
    return math.exp(s0 * math.log(mu0) / n_k)


def squared_l2(a: torch.Tensor, b: torch.Tensor, c: float = 0.0) -> torch.Tensor:
    """d(a, b) = ‖a − b‖₂² per sample, averaged over its elements as the CM code's `l2` (CM §5); shape (B,)."""
    return (a - b).flatten(1).square().mean(dim=1)


def uniform_weights(sigma_i: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """λ(σ_i) = 1 (CM §5)."""
    return torch.ones_like(sigma_i)


def uniform_probabilities(sigmas: torch.Tensor) -> torch.Tensor:
    """p(i) = 1/(N−1) for i = 1…N−1: n ~ U[1, N−1] (CM Algorithm 3)."""
    n = sigmas.shape[0] - 1
    return torch.full((n,), 1.0 / n, dtype=torch.float64)
