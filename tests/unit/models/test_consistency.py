"""The consistency parameterization against the recipe's formulas (CM §3, iCT §3)."""

from __future__ import annotations

import math

import pytest
import torch

from models.config import preset
from models.consistency import ConsistencyModel, boundary_scalings, noise_conditioning

SIGMA_MIN, SIGMA_DATA = 0.002, 0.5


def reference_scalings(s: float) -> tuple[float, float, float]:
    """The formulas of ict-recipe.md written out by hand, in float64."""
    c_skip = SIGMA_DATA**2 / ((s - SIGMA_MIN) ** 2 + SIGMA_DATA**2)
    c_out = SIGMA_DATA * (s - SIGMA_MIN) / math.sqrt(SIGMA_DATA**2 + s**2)
    c_in = 1 / math.sqrt(s**2 + SIGMA_DATA**2)
    return c_skip, c_out, c_in


@pytest.mark.parametrize("sigma", [0.002, 0.01, 0.5, 0.821, 2.0, 10.0, 80.0])
def test_scalings_match_formulas(sigma: float) -> None:
    got = boundary_scalings(torch.tensor([sigma], dtype=torch.float64), SIGMA_MIN, SIGMA_DATA)
    for value, expected in zip(got, reference_scalings(sigma), strict=True):
        assert value.item() == pytest.approx(expected, rel=1e-12)


def test_c_in_has_its_square_root() -> None:
    # "Where others go wrong" 2: at σ = 80 c_in ≈ 1/80, not 1/6400.
    _, _, c_in = boundary_scalings(torch.tensor(80.0, dtype=torch.float64), SIGMA_MIN, SIGMA_DATA)
    assert c_in.item() == pytest.approx(1 / math.sqrt(6400.25))


@pytest.mark.parametrize("sigma", [0.002, 0.3, 80.0])
def test_c_noise(sigma: float) -> None:
    s = torch.tensor([sigma], dtype=torch.float64)
    assert noise_conditioning(s, "fourier").item() == pytest.approx(0.25 * math.log(sigma))
    assert noise_conditioning(s, "positional").item() == pytest.approx(1000 * 0.25 * math.log(sigma + 1e-44))


def test_boundary_condition_is_exact(tiny_model: ConsistencyModel) -> None:
    x = torch.randn(4, *tiny_model.cfg.image_shape)
    labels = torch.arange(4)
    out = tiny_model(x, SIGMA_MIN, labels)
    assert torch.equal(out, x)  # bit-exact, not approximately
    out = tiny_model(x, torch.full((4,), SIGMA_MIN), labels)
    assert torch.equal(out, x)


def test_boundary_condition_exact_in_bf16(tiny_model: ConsistencyModel) -> None:
    model = tiny_model.to(torch.bfloat16)
    x = torch.randn(2, *model.cfg.image_shape, dtype=torch.bfloat16)
    assert torch.equal(model(x, SIGMA_MIN, torch.tensor([1, 2])), x)


def test_forward_uses_scalings(tiny_model: ConsistencyModel) -> None:
    """f(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise) with per-image σ."""
    x = torch.randn(3, *tiny_model.cfg.image_shape)
    sigma = torch.tensor([0.01, 1.0, 80.0])
    labels = torch.tensor([0, 5, 9])
    c_skip, c_out, c_in = boundary_scalings(sigma, SIGMA_MIN, SIGMA_DATA)
    with torch.no_grad():
        raw = tiny_model.backbone(c_in.view(-1, 1, 1, 1) * x, 0.25 * sigma.log(), labels)
        expected = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * raw
        got = tiny_model(x, sigma, labels)
    torch.testing.assert_close(got, expected)
    # per-image σ gives the same as each image alone
    with torch.no_grad():
        alone = torch.cat([tiny_model(x[i : i + 1], sigma[i].item(), labels[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(got, alone)


def test_sigma_shape_is_checked(tiny_model: ConsistencyModel) -> None:
    with pytest.raises(ValueError, match="sigma must be a scalar"):
        tiny_model(torch.zeros(2, 1, 8, 8), torch.ones(3), torch.zeros(2, dtype=torch.long))


def test_class_labels_required_for_conditional_model(tiny_model: ConsistencyModel) -> None:
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_model(torch.zeros(1, 1, 8, 8), 1.0)


def test_unconditional_refuses_labels() -> None:
    cfg = preset("digits").replace(model_channels=16, num_groups=4, num_classes=0)
    model = ConsistencyModel.from_config(cfg)
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.zeros(1, 1, 8, 8), 1.0, torch.zeros(1, dtype=torch.long))
