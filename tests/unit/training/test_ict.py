"""The iCT formulas against values computed by hand from the paper (iCT §3.1-3.5)."""

from __future__ import annotations

import math

import pytest
import torch

from models.sampling import karras_sigmas
from training import ict


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        *[(0, 11), (999, 11), (1000, 21), (1999, 21), (2000, 41), (3000, 81), (4000, 161), (5000, 321)],
        *[(6000, 641), (6999, 641), (7000, 1281), (7999, 1281), (8000, 1281)],
    ],
)
def test_discretization_steps_at_stage_boundaries(k: int, expected: int) -> None:
    # K = 8000, s0 = 10, s1 = 1280: log2(128) + 1 = 8 stages, K' = 1000; N doubles (in intervals) at each K'.
    assert ict.curriculum_stage_length(8000) == 1000
    assert ict.discretization_steps(k, 8000) == expected


def test_discretization_steps_stage_length_floors() -> None:
    # K = 100: K' = floor(100 / 8) = 12, so the 7th doubling (N = 1281) starts at k = 84, not 87.5.
    assert ict.curriculum_stage_length(100) == 12
    assert [ict.discretization_steps(k, 100) for k in (11, 12, 83, 84, 99)] == [11, 21, 641, 1281, 1281]
    # s1/s0 not a power of two: K' = floor(1000 / (log2(floor(1000/10)) + 1)) = floor(1000 / 7.6439) = 130.
    assert ict.curriculum_stage_length(1000, 10, 1000) == 130
    assert ict.discretization_steps(130 * 7, 1000, 10, 1000) == 1001  # min(10·128, 1000) + 1
    assert ict.curriculum_stage_length(5) == 1  # never zero for tiny K


def test_pseudo_huber_c() -> None:
    assert ict.pseudo_huber_c(64) == pytest.approx(0.00432, abs=1e-12)  # 0.00054·8
    assert ict.pseudo_huber_c(3072) == pytest.approx(0.0299300, abs=1e-6)  # 0.00054·55.4256
    assert ict.pseudo_huber_c(12288) == pytest.approx(0.0598600, abs=1e-6)


def test_pseudo_huber_uses_the_norm_of_each_whole_sample() -> None:
    a = torch.zeros(2, 1, 8, 8)
    b = torch.zeros(2, 1, 8, 8)
    b[0, 0, 0, :4] = 0.5  # ‖a − b‖² = 4·0.25 = 1 for sample 0
    b[1, 0, 3, 3] = 2.0  # ‖a − b‖² = 4 for sample 1
    c = 0.00432
    d = ict.pseudo_huber(a, b, c)
    assert d.shape == (2,)
    assert d[0].item() == pytest.approx(math.sqrt(1 + c * c) - c, rel=1e-6)
    assert d[1].item() == pytest.approx(math.sqrt(4 + c * c) - c, rel=1e-6)
    per_element = ((a - b).square() + c * c).sqrt().sub(c).flatten(1).mean(1)  # the common mistake
    assert not torch.allclose(d, per_element)


def test_pseudo_huber_is_zero_for_equal_inputs_and_symmetric() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 3, 4, 4, generator=gen), torch.randn(3, 3, 4, 4, generator=gen)
    assert torch.equal(ict.pseudo_huber(a, a, 0.03), torch.zeros(3))
    assert torch.allclose(ict.pseudo_huber(a, b, 0.03), ict.pseudo_huber(b, a, 0.03))


def test_timestep_probabilities_match_erf_differences() -> None:
    sigmas = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    p = ict.timestep_probabilities(sigmas)
    erf = lambda s: math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0))  # noqa: E731
    raw = [erf(1.0) - erf(0.002), erf(80.0) - erf(1.0)]
    assert p.shape == (2,)
    assert p.tolist() == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert p[0].item() == pytest.approx(0.70948, abs=1e-4)  # (0.41800 + 0.98893) / 1.98289, by hand


def test_timestep_probabilities_on_a_karras_grid() -> None:
    for n in (11, 161, 1281):
        sigmas = karras_sigmas(n)
        p = ict.timestep_probabilities(sigmas)
        assert p.shape == (n - 1,)
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
        assert (p > 0).all()
        # ln σ ~ N(−1.1, 2²) peaks at σ = 0.33; the grid's wider ln-steps at small σ pull the mass mode to ≈ 0.19.
        mode = sigmas[p.argmax()].item()
        assert 0.08 < mode < 0.33


def test_loss_weights() -> None:
    sigma = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
    w = ict.loss_weights(sigma[:-1], sigma[1:])
    assert w.tolist() == pytest.approx([1 / 0.998, 1 / 79.0], rel=1e-12)
