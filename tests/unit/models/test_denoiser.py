"""EDM's denoiser and Heun sampler (models/denoiser.py): scalings, one step, Algorithm 1, the file kind."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from models import checkpoint
from models.config import ModelConfig, preset
from models.consistency import ConsistencyModel, boundary_scalings, noise_conditioning
from models.denoiser import (
    Denoiser,
    edm_scalings,
    euler_step,
    heun_evaluations,
    heun_sample,
    heun_sigmas,
    heun_step,
    sample_heun,
)
from models.sampling import image_noise
from tests.conftest import randomize

ROOT = Path(__file__).resolve().parents[3]


def tiny_denoiser(cfg: ModelConfig) -> Denoiser:
    torch.manual_seed(0)
    return randomize(Denoiser.from_config(cfg.replace(kind="denoiser"))).eval()


def gaussian_denoiser(s: float) -> callable:
    """The ideal denoiser of data ~ N(0, s²): D(x; σ) = x·s²/(s² + σ²)."""
    return lambda x, sigma, labels=None: x * s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize(
    ("sigma", "c_skip", "c_out", "c_in"),
    [
        (0.5, 0.25 / 0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5)),  # σ = σ_d: 1/2, σ_d/√2, √2
        (2.0, 0.25 / 4.25, 1.0 / math.sqrt(4.25), 1 / math.sqrt(4.25)),
    ],
)
def test_edm_scalings_by_hand(sigma: float, c_skip: float, c_out: float, c_in: float) -> None:
    got = edm_scalings(torch.tensor([sigma], dtype=torch.float64), 0.5)
    torch.testing.assert_close(torch.cat(got), torch.tensor([c_skip, c_out, c_in], dtype=torch.float64))


def test_edm_scalings_are_unshifted_unlike_the_consistency_ones() -> None:
    """At σ_min the denoiser does not return x: EDM's c_skip(σ_min) < 1 (the consistency model's is exactly 1)."""
    c_skip, c_out, _ = edm_scalings(torch.tensor([0.002]), 0.5)
    assert c_skip.item() < 1 and c_out.item() > 0


class Recorder(nn.Module):
    """A backbone that records its inputs and returns a fixed output."""

    def __init__(self, out: torch.Tensor) -> None:
        super().__init__()
        self.out, self.calls = out, []

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: object, augment: object = None) -> torch.Tensor:
        self.calls.append((x, c_noise))
        return self.out


def test_denoiser_is_c_skip_x_plus_c_out_f_of_c_in_x_with_the_consistency_c_noise() -> None:
    cfg = preset("digits").replace(kind="denoiser")
    x, f = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0])
    backbone = Recorder(f)
    out = Denoiser(backbone, cfg)(x, sigma)
    c_skip = torch.tensor([0.5, 0.25 / 4.25]).reshape(2, 1, 1, 1)
    c_out = torch.tensor([0.25 / math.sqrt(0.5), 1 / math.sqrt(4.25)]).reshape(2, 1, 1, 1)
    c_in = torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(4.25)]).reshape(2, 1, 1, 1)
    torch.testing.assert_close(out, c_skip * x + c_out * f)
    torch.testing.assert_close(backbone.calls[0][0], c_in * x)
    torch.testing.assert_close(backbone.calls[0][1], noise_conditioning(sigma, cfg.embedding))  # 0.25·ln σ


def test_a_denoisers_weights_load_into_a_consistency_model_unchanged(tiny_config: ModelConfig) -> None:
    cfg = tiny_config.replace(num_classes=0)
    denoiser = tiny_denoiser(cfg)
    model = ConsistencyModel.from_config(cfg)
    model.load_state_dict(denoiser.state_dict())  # strict: the same names and shapes
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.3, 1.0, 20.0])
    # Same backbone output: D and f differ only in c_skip and c_out.
    c_skip, c_out, _ = (c.reshape(-1, 1, 1, 1) for c in edm_scalings(sigma, 0.5))
    f_backbone = (denoiser(x, sigma) - c_skip * x) / c_out
    cs, co, _ = (c.reshape(-1, 1, 1, 1) for c in boundary_scalings(sigma, 0.002, 0.5))
    torch.testing.assert_close(model(x, sigma), cs * x + co * f_backbone, rtol=1e-4, atol=1e-5)


def test_heun_sigmas_are_edm_eq_5_ending_at_zero() -> None:
    assert heun_sigmas(1, 0.002, 80.0) == [80.0, 0.0]
    assert heun_sigmas(2, 0.002, 80.0) == pytest.approx([80.0, 0.002, 0.0])
    middle = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # i = 1 of N = 3
    assert heun_sigmas(3, 0.002, 80.0) == pytest.approx([80.0, middle, 0.002, 0.0])
    assert len(heun_sigmas(18, 0.002, 80.0)) == 19
    assert heun_evaluations(18) == 35 and heun_evaluations(1) == 1
    with pytest.raises(ValueError, match="steps >= 1"):
        heun_sigmas(0, 0.002, 80.0)


def test_one_heun_step_and_one_euler_step_by_hand() -> None:
    """Data N(0, 1), x = 1 at t = 2 to t′ = 1: d = (1 − 1/5)/2 = 0.4, x′ = 0.6, d′ = (0.6 − 0.6/2)/1 = 0.3,
    Heun 1 − (0.4 + 0.3)/2 = 0.65 (the exact ODE gives √2/√5 = 0.632)."""
    denoise = gaussian_denoiser(1.0)
    x = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(heun_step(denoise, x, 2.0, 1.0), torch.full_like(x, 0.65))
    torch.testing.assert_close(euler_step(denoise, x, 2.0, 1.0), torch.full_like(x, 0.6))
    per_image = heun_step(denoise, torch.ones(2, 1, 2, 2), torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(per_image, torch.full_like(per_image, 0.65))


def hand_written_algorithm_1(denoise: callable, x_T: torch.Tensor, steps: int) -> torch.Tensor:
    """EDM Algorithm 1 written out from the paper, step by step."""
    rho, lo, hi = 7.0, 0.002, 80.0
    t = [(hi ** (1 / rho) + i / (steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(steps)]
    t.append(0.0)
    x = x_T
    for i in range(steps):
        t_i = torch.full((x.shape[0],), t[i])
        d = (x - denoise(x, t_i, None)) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if t[i + 1] != 0:
            t_n = torch.full((x.shape[0],), t[i + 1])
            d_prime = (x_next - denoise(x_next, t_n, None)) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


@pytest.mark.parametrize("steps", [2, 5, 18])
def test_heun_sample_is_the_hand_written_algorithm_1(tiny_config: ModelConfig, steps: int) -> None:
    denoiser = tiny_denoiser(tiny_config.replace(num_classes=0))
    x_T = 80.0 * torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = hand_written_algorithm_1(denoiser, x_T, steps)
    torch.testing.assert_close(heun_sample(denoiser, x_T, steps), expected, rtol=1e-5, atol=1e-5)


def test_heun_sample_uses_2n_minus_1_evaluations_and_converges_to_the_gaussian_ode() -> None:
    """For data N(0, s²) the PF-ODE is solved exactly by x(t) = x_T·√(s² + t²)/√(s² + T²)."""
    s, calls = 0.5, []
    denoise = gaussian_denoiser(s)

    class Counting(nn.Module):
        cfg = preset("digits")

        def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: object = None) -> torch.Tensor:
            calls.append(1)
            return denoise(x, sigma)

    x_T = 80.0 * torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = x_T * s / math.sqrt(s**2 + 80.0**2)
    heun_sample(Counting(), x_T, 18)
    assert len(calls) == 35
    errors = [(heun_sample(Counting(), x_T, n) / exact - 1).abs().max().item() for n in (50, 200)]
    assert errors[1] < 1e-3 and 10 < errors[0] / errors[1] < 25  # second order: 4× the steps, 16× less error


def test_seeded_heun_samples_start_from_the_consistency_samplers_x_T(tiny_config: ModelConfig) -> None:
    denoiser = tiny_denoiser(tiny_config)
    images = sample_heun(denoiser, [5, 6], 3, class_labels=[1, 2])
    assert images.shape == (2, 1, 8, 8) and images.abs().max() <= 1
    z = torch.stack([image_noise(seed, (1, 8, 8), 1)[0] for seed in (5, 6)])
    labels = torch.tensor([1, 2])
    torch.testing.assert_close(images, heun_sample(denoiser, 80.0 * z, 3, labels).clamp(-1, 1))
    torch.testing.assert_close(sample_heun(denoiser, [6], 3, class_labels=[2]), images[1:])  # per seed, any batch


def test_a_denoiser_file_says_so_and_loads_as_a_denoiser(tiny_config: ModelConfig, tmp_path: Path) -> None:
    denoiser = tiny_denoiser(tiny_config)
    path = checkpoint.save(tmp_path / "d.safetensors", denoiser, preset="digits")
    assert checkpoint.read_meta_file(path).config.kind == "denoiser"
    loaded = checkpoint.load(path)
    assert isinstance(loaded.model, Denoiser) and loaded.meta.config == denoiser.cfg
    for key, value in denoiser.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    with pytest.raises(ValueError, match="a Denoiser cannot be saved with config kind 'consistency'"):
        checkpoint.save(tmp_path / "x.safetensors", Denoiser.from_config(tiny_config))


def test_checkpoints_without_a_kind_are_consistency_models() -> None:
    """The embedded default predates the field: its architecture has no `kind`, and it loads as before."""
    path = ROOT / "models" / "pretrained" / "digits.safetensors"
    meta = checkpoint.read_meta_file(path)
    assert meta.config.kind == "consistency"
    assert isinstance(checkpoint.load(path).model, ConsistencyModel)
    with pytest.raises(Exception, match="kind must be one of 'consistency', 'denoiser', not 'flow'"):
        ModelConfig(kind="flow")  # type: ignore[arg-type]
