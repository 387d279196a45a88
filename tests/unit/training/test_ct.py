"""The original CT formulas (CM Appendix C) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from training import ct


def test_discretization_steps_square_root_curriculum() -> None:
    # s0 = 2, s1 = 150, K = 1000.
    assert ct.discretization_steps(0, 1000) == 2  # ⌈√4 − 1⌉ + 1
    assert ct.discretization_steps(1000, 1000) == 151  # ⌈√(151²) − 1⌉ + 1
    assert ct.discretization_steps(500, 1000) == 107  # √(0.5·22797 + 4) = 106.78 -> ⌈105.78⌉ + 1
    assert ct.discretization_steps(1, 1000) == 6  # √(22.797 + 4) = 5.18 -> ⌈4.18⌉ + 1
    steps = [ct.discretization_steps(k, 1000) for k in range(1001)]
    assert steps == sorted(steps)


def test_target_ema_decay() -> None:
    assert ct.target_ema_decay(2) == pytest.approx(0.9, rel=1e-12)  # exp(2·ln 0.9 / 2)
    assert ct.target_ema_decay(151) == pytest.approx(0.9 ** (2 / 151), rel=1e-12)
    assert ct.target_ema_decay(151) == pytest.approx(0.998605, abs=1e-6)
    assert ct.target_ema_decay(11, s0=10, mu0=0.95) == pytest.approx(math.exp(10 * math.log(0.95) / 11))


def test_squared_l2_is_the_mean_square_per_sample() -> None:
    a, b = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    b[0, 0, 0, 0] = 2.0
    assert ct.squared_l2(a, b).tolist() == [1.0, 0.0]  # 4 / 4 elements


def test_uniform_weights_and_probabilities() -> None:
    sigmas = torch.tensor([0.002, 0.5, 3.0, 80.0], dtype=torch.float64)
    assert ct.uniform_weights(sigmas[:-1], sigmas[1:]).tolist() == [1.0, 1.0, 1.0]
    p = ct.uniform_probabilities(sigmas)
    assert p.tolist() == pytest.approx([1 / 3] * 3)
