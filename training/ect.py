"""Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy", arXiv 2406.14548; locuslab/ect).

A consistency model tuned from a pretrained EDM denoiser: t from iCT's lognormal, r < t from the mapping
function p(r|t), whose gap t − r shrinks stage by stage (Δt → dt, so the objective moves from denoising towards
the consistency condition), shared ε, a stop-gradient target f(x_r, r) (y itself where r = 0; `--teacher ema`
evaluates it with CM's EMA weights θ⁻, as CD can), pseudo-Huber distance weighted by 1/(t − r) (or EDM's λ(t),
`--ect-weighting edm`). One pure function per formula, named for the paper's symbols.
"""

from __future__ import annotations

import torch

from . import ict

P_MEAN = ict.P_MEAN  # ECT §3 and Appendix (as iCT): ln t ~ N(−1.1, 2.0²)
P_STD = ict.P_STD
Q = 2.0  # ECT §3 (CIFAR-10): the gap t − r shrinks by q per stage
K = 8.0  # ECT §3 mapping function: n(t) = 1 + k·sigmoid(−b·t)
B = 1.0
STAGES = 8  # ours: the stages over the run (ECT doubles every fixed number of images; we split the run's K steps)


def stage(k: int, total_steps: int, stages: int = STAGES, every: int | None = None) -> int:
    """The stage of iteration k of K, in 0…S−1: ⌊k·S/K⌋ when the run advances through S stages evenly, or with
    `every` = d, ⌊k/d⌋ (ECT's schedule: the next stage every d iterations, the last one kept to the end)."""
    if every is not None:
        return min(k // every, stages - 1)
    return min(k * stages // total_steps, stages - 1)


def n_of_t(t: torch.Tensor, k: float = K, b: float = B) -> torch.Tensor:
    """n(t) = 1 + k·sigmoid(−b·t) (ECT §3, the sigmoid mapping function's adjustment)."""
    return 1 + k * torch.sigmoid(-b * t)


def r_of_t(t: torch.Tensor, stage: int, q: float = Q) -> torch.Tensor:
    """r = max(0, t·(1 − n(t)/q^(stage+1))) (ECT §3, the mapping function p(r|t) with its schedule)."""
    return (t * (1 - n_of_t(t) / q ** (stage + 1))).clamp(min=0)


def loss_weights(t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """w(t, r) = 1/(t − r) (ECT §3, weighting function; iCT's 1/Δt in continuous t)."""
    return 1 / (t - r)


def edm_weights(t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """w(t) = (t² + σ_d²)/(t·σ_d)² = SNR(t) + 1/σ_d² (EDM Table 1's λ; the weight of locuslab/ect's EDM2 configs)."""
    return (t**2 + sigma_data**2) / (t * sigma_data) ** 2


def weights(kind: str, t: torch.Tensor, r: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """The per-sample weight of the tuning loss: `gap` 1/(t − r) (ECT §3) or `edm` EDM's λ(t)."""
    return edm_weights(t, sigma_data) if kind == "edm" else loss_weights(t, r)


def target(f_r: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """f(x_r, r) where r > 0, else the data y itself (ECT §3: the boundary condition f(y, 0) = y)."""
    return torch.where(r.reshape(-1, *([1] * (y.ndim - 1))) > 0, f_r, y)
