"""The editing projections (CM Algorithm 4) and slerp: each keeps exactly what the reference knows."""

from __future__ import annotations

import pytest
import torch

from models.editing import (
    LUMA,
    colorization,
    from_patches,
    inpainting,
    orthogonal_with_first,
    project_rows,
    super_resolution,
    to_patches,
    upsample,
)
from models.sampling import image_noise, interpolation_noise, slerp


def uniform(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("v", [torch.ones(4), torch.ones(16), torch.tensor(LUMA)])
def test_transforms_are_orthogonal_with_the_given_first_axis(v: torch.Tensor) -> None:
    q = orthogonal_with_first(v)
    assert torch.allclose(q.T @ q, torch.eye(len(v), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q[:, 0], v.double() / v.double().norm(), atol=1e-12)


def test_patches_round_trip() -> None:
    x = uniform(2, 3, 8, 8)
    assert torch.equal(from_patches(to_patches(x, 2), 2), x)
    assert torch.equal(to_patches(x, 4)[0, 0, 0, 0], x[0, 0, :4, :4].flatten())


def test_inpainting_keeps_every_known_pixel_bit_for_bit() -> None:
    y, x0 = uniform(3, 8, 8, seed=1), uniform(5, 3, 8, 8, seed=2)
    mask = torch.zeros(8, 8)
    mask[4:] = 1  # regenerate the lower half
    projection = inpainting(y, mask)
    out = projection(x0)
    assert torch.equal(out[:, :, :4], y[:, :4].expand(5, -1, -1, -1))  # known: y exactly
    assert torch.equal(out[:, :, 4:], x0[:, :, 4:])  # regenerated: the model's
    assert torch.equal(projection.start[0, :, :4], y[:, :4]) and not projection.start[0, :, 4:].any()


@pytest.mark.parametrize("p", [2, 4])
def test_super_resolution_averages_back_to_the_low_resolution_input(p: int) -> None:
    low, x0 = uniform(1, 8 // p, 8 // p, seed=3), uniform(4, 1, 8, 8, seed=4)
    projection = super_resolution(low, p)
    out = projection(x0)
    means = torch.nn.functional.avg_pool2d(out, p)  # (4, 1, 8/p, 8/p)
    assert torch.allclose(means, low.expand_as(means), atol=1e-6)
    # the rest of each patch is the model's: the projection moves every pixel of a patch by the same amount
    shift = (out - x0).reshape(4, 1, 8 // p, p, 8 // p, p)
    assert torch.allclose(shift, shift[:, :, :, :1, :, :1].expand_as(shift), atol=1e-6)
    assert torch.allclose(projection.start[0], upsample(low, p), atol=1e-6)


def test_colorization_keeps_the_luma_of_the_input() -> None:
    grey, x0 = uniform(1, 8, 8, seed=5), uniform(3, 3, 8, 8, seed=6)
    out = colorization(grey)(x0)
    luma = torch.einsum("c,bchw->bhw", torch.tensor(LUMA), out)
    assert torch.allclose(luma, grey.expand_as(luma), atol=1e-6)
    # the chroma of the model's estimate is kept: x0 and out differ along the luma axis only
    diff = (out - x0).movedim(1, -1)  # (B, H, W, 3)
    direction = torch.tensor(LUMA) / torch.tensor(LUMA).norm()
    assert torch.allclose(diff, (diff @ direction).unsqueeze(-1) * direction, atol=1e-6)


def test_projections_are_idempotent() -> None:
    low, x0 = uniform(3, 4, 4, seed=7), uniform(2, 3, 8, 8, seed=8)
    for projection in (super_resolution(low, 2), colorization(low[0].repeat_interleave(2, 0).repeat_interleave(2, 1)),
                       inpainting(x0[0], torch.eye(8))):
        once = projection(x0)
        assert torch.allclose(projection(once), once, atol=1e-6)


def test_project_rows_passes_each_part_through_its_own_projection_bit_for_bit() -> None:
    """The batched path (every projection inpainting's) and the per-part path (a super-resolution among them) both
    give each part's rows what its projection alone gives, and leave unprojected rows as they are."""
    x0 = uniform(7, 1, 8, 8, seed=9)
    lower, box = torch.zeros(8, 8), torch.zeros(8, 8)
    lower[4:], box[2:5, 1:7] = 1, 1
    a, b = inpainting(uniform(1, 8, 8, seed=10), lower), inpainting(uniform(1, 8, 8, seed=11).numpy(), box.numpy())
    for parts in ([(None, 1), (a, 2), (b, 1), (None, 2), (a, 1)],
                  [(a, 1), (super_resolution(uniform(1, 4, 4, seed=12), 2), 2), (None, 3), (b, 1)]):
        expected, at = [], 0
        for projection, size in parts:
            rows = x0[at : at + size]
            expected.append(rows if projection is None else projection(rows))
            at += size
        assert torch.equal(project_rows(x0, parts), torch.cat(expected))
    assert project_rows(x0, [(None, 7)]) is x0


def test_slerp_at_zero_and_one_returns_the_seeds_own_noise() -> None:
    a, b = image_noise(1, (1, 8, 8), 1)[0], image_noise(2, (1, 8, 8), 1)[0]
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert abs(float(mid.norm()) - 0.5 * float(a.norm() + b.norm())) < 0.1 * float(a.norm())  # on the sphere
    assert torch.equal(slerp(a, a, 0.3), a)  # parallel: no division by sin 0


def test_interpolation_noise_is_the_seeds_x_t_at_the_ends_and_shares_later_steps() -> None:
    noise = interpolation_noise((3, 4), [0.0, 0.5, 1.0], (1, 8, 8), steps=2)
    a, b = image_noise(3, (1, 8, 8), 2), image_noise(4, (1, 8, 8), 2)
    assert noise.shape == (3, 2, 1, 8, 8)
    assert torch.equal(noise[0], a) and torch.equal(noise[2, 0], b[0])
    assert torch.equal(noise[1, 1], a[1]) and torch.equal(noise[2, 1], a[1])
    assert torch.equal(interpolation_noise((3, 4), [0.5], (1, 8, 8), 2)[0], noise[1])  # alone as in the strip
