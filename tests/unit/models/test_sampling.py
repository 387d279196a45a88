"""Schedules and CM Algorithm 1, against hand-written references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from models.consistency import ConsistencyModel
from models.sampling import (
    default_sigmas,
    image_class_label,
    image_noise,
    karras_sigmas,
    multistep_sample,
    noise_scales,
    renoise,
    renoise_scale,
    sample,
    step_input,
    to_uint8,
    validate_sigmas,
)


def test_karras_grid_matches_formula() -> None:
    n, lo, hi, rho = 11, 0.002, 80.0, 7.0
    got = karras_sigmas(n)
    for i in range(1, n + 1):  # σ_i = (σ_min^{1/ρ} + (i−1)/(N−1)·(σ_max^{1/ρ} − σ_min^{1/ρ}))^ρ
        expected = (lo ** (1 / rho) + (i - 1) / (n - 1) * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho
        assert got[i - 1].item() == pytest.approx(expected, rel=1e-12)
    assert got[0].item() == pytest.approx(lo) and got[-1].item() == pytest.approx(hi)
    assert torch.all(got[1:] > got[:-1])  # ascending
    with pytest.raises(ValueError, match="n >= 2"):
        karras_sigmas(1)


def test_default_sigmas() -> None:
    assert default_sigmas(1) == [80.0]
    assert default_sigmas(2) == [80.0, 0.821]  # the iCT paper's CIFAR-10 two-step schedule
    four = default_sigmas(4)
    assert len(four) == 4 and four[0] == pytest.approx(80.0)
    assert all(b < a for a, b in itertools.pairwise(four)) and four[-1] > 0.002
    validate_sigmas(four, 0.002, 80.0)


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        ([], "at least one"),
        ([81.0], "exceeds sigma_max"),
        ([80.0, 1.0, 1.0], "strictly decreasing"),
        ([80.0, 2.0, 3.0], "strictly decreasing"),
        ([80.0, 0.002], "> sigma_min"),
        ([80.0, float("nan")], "finite"),
    ],
)
def test_validate_sigmas_refuses(sigmas: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_sigmas(sigmas, 0.002, 80.0)


def algorithm_1(model: ConsistencyModel, z: torch.Tensor, taus: list[float], labels: torch.Tensor) -> torch.Tensor:
    """CM Algorithm 1 written out by hand, image by image, with z[j] the j-th noise of each image."""
    out = []
    for b in range(z.shape[1]):
        lab = labels[b : b + 1]
        x = model(taus[0] * z[0, b : b + 1], torch.tensor([taus[0]]), lab).clamp(-1, 1)
        for j in range(1, len(taus)):
            x = x + math.sqrt(taus[j] ** 2 - 0.002**2) * z[j, b : b + 1]
            x = model(x, torch.tensor([taus[j]]), lab).clamp(-1, 1)
        out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("taus", [[80.0], [80.0, 0.821], [80.0, 10.0, 2.0, 0.5]])
@torch.no_grad()
def test_multistep_sample_is_algorithm_1(tiny_model: ConsistencyModel, taus: list[float]) -> None:
    torch.manual_seed(1)
    z = torch.randn(len(taus), 3, 1, 8, 8)
    labels = torch.tensor([0, 3, 7])
    got = multistep_sample(tiny_model, taus[0] * z[0], taus, list(z[1:]), labels)
    torch.testing.assert_close(got, algorithm_1(tiny_model, z, taus, labels), rtol=1e-5, atol=1e-6)
    assert got.min() >= -1 and got.max() <= 1


def test_multistep_sample_checks_its_inputs(tiny_model: ConsistencyModel) -> None:
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="step noises"):
        multistep_sample(tiny_model, x, [80.0, 1.0], [], torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="strictly decreasing"):
        multistep_sample(tiny_model, x, [1.0, 80.0], [x], torch.zeros(1, dtype=torch.long))


def test_noise_scales_are_sigma_1_then_the_renoise_scales_in_float32() -> None:
    sigmas, sigma_min = [80.0, 2.5, 0.821], 0.002
    scales = noise_scales(sigmas, sigma_min)
    assert scales[0] == 80.0  # x_T = σ_1·z_1 (Algorithm 1, line 1)
    for got, sigma in zip(scales[1:], sigmas[1:], strict=True):  # √(τ² − ε²) (line 5), rounded to float32
        assert got == pytest.approx(math.sqrt(sigma**2 - sigma_min**2), rel=1e-7)
        assert got == float(np.float32(got))
    sigma = torch.tensor(sigmas[1:], dtype=torch.float32)
    assert renoise_scale(sigma, sigma_min).to(torch.float32).tolist() == scales[1:]


def test_renoise_is_x_plus_scale_times_z_per_image() -> None:
    x, z = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    scale = torch.tensor([1.0, 2.0, 0.5])
    expected = torch.stack([x[i] + scale[i] * z[i] for i in range(3)])
    assert torch.equal(renoise(x, scale, z), expected)
    assert torch.equal(renoise(None, 80.0, z), 80.0 * z)  # estimates of zero: x_T = σ_1·z_1
    assert torch.equal(renoise(x, float(scale[1]), z), x + scale[1] * z)  # one scale for all: same bits
    sigma = torch.tensor([0.5, 2.0, 80.0])
    assert torch.equal(step_input(x, sigma, z, 0.002), renoise(x, renoise_scale(sigma, 0.002).float(), z))


def test_image_noise_is_per_seed_and_prefix_stable() -> None:
    a = image_noise(42, (1, 8, 8), 4)
    assert a.shape == (4, 1, 8, 8)
    assert torch.equal(a, image_noise(42, (1, 8, 8), 4))
    assert torch.equal(a[:2], image_noise(42, (1, 8, 8), 2))  # z_1 is the same for any step count
    assert not torch.equal(a, image_noise(43, (1, 8, 8), 4))
    assert image_noise(2**64 - 1, (1, 8, 8), 1).shape == (1, 1, 8, 8)  # seed + i may exceed 2^63


def test_class_label_from_seed() -> None:
    labels = [image_class_label(s, 10) for s in range(200)]
    assert labels == [image_class_label(s, 10) for s in range(200)]
    assert set(labels) == set(range(10))


def test_a_reused_generator_draws_what_a_fresh_one_does() -> None:
    """The engine thread reseeds one generator for every draw: whatever it drew before, the values are those of
    a generator made for the seed (the normal sampler keeps no state across manual_seed)."""
    gen = torch.Generator()
    torch.randn(7, generator=gen)  # an odd count leaves a cached Box-Muller value behind in some samplers
    for seed in (0, 42, 2**64 - 1):
        for shape, steps in (((1, 8, 8), 4), ((3, 2, 2), 1)):  # 256 and 12 values: vectorised and scalar paths
            assert torch.equal(image_noise(seed, shape, steps, gen), image_noise(seed, shape, steps))
        assert image_class_label(seed, 10, gen) == image_class_label(seed, 10)
        torch.randn(3, generator=gen)


@pytest.mark.parametrize("taus", [[80.0], [80.0, 0.821]])
def test_same_seed_same_image_alone_or_in_a_batch(tiny_model: ConsistencyModel, taus: list[float]) -> None:
    alone = to_uint8(sample(tiny_model, [1234], taus))
    batch_seeds = [7, 99, 1234, *range(500, 513)]  # 16 images, the seed of interest third
    batch = to_uint8(sample(tiny_model, batch_seeds, taus))
    assert batch.shape == (16, 8, 8, 1)
    np.testing.assert_array_equal(alone[0], batch[2])
    np.testing.assert_array_equal(alone, to_uint8(sample(tiny_model, [1234], taus)))
    assert not np.array_equal(batch[0], batch[1])


def test_explicit_class_labels_are_used(tiny_model: ConsistencyModel) -> None:
    a = sample(tiny_model, [5, 5], [80.0], class_labels=[1, 2])
    assert not torch.equal(a[0], a[1])
    default = sample(tiny_model, [5], [80.0])
    drawn = sample(tiny_model, [5], [80.0], class_labels=[image_class_label(5, 10)])
    assert torch.equal(default, drawn)


def test_to_uint8() -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 5, 1)
    assert out.ravel().tolist() == [0, 64, 128, 255, 255]
