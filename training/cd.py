"""Consistency distillation (Song et al. 2023, "Consistency Models", Algorithm 2; openai/consistency_models).

A student consistency model learns to agree with itself across one Heun step of a pretrained EDM denoiser's
probability-flow ODE (models/denoiser.heun_step): from x_t = y + t·z to x_t′ at the adjacent Karras level t′ < t.
The target is the stop-gradient student (iCT §3.2) or CM's EMA target θ⁻ with a fixed μ.
"""

from __future__ import annotations

import torch

from models.denoiser import DenoiseFn, heun_step

LEVELS = 18  # CM Table 3: N = 18 on CIFAR-10 (40 on ImageNet 64 and LSUN)
MU = 0.95  # CM Table 3: EMA decay of the target network θ⁻ in CD


def target_decay(teacher: str, mu: float = MU) -> float:
    """μ of the EMA target, fixed in CD and ECT (CM Algorithm 2: θ⁻ ← stopgrad(μθ⁻ + (1 − μ)θ)); 0 for the student."""
    return mu if teacher == "ema" else 0.0


@torch.no_grad()
def teacher_step(
    denoiser: DenoiseFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """x̂_{t′} = one Heun step of the teacher's PF-ODE from (x_t, t) to t′ (CM Algorithm 2, line 5; EDM Alg. 1)."""
    return heun_step(denoiser, x_t, t, t_prev, class_labels)
