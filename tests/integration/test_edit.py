"""POST /v1/edit and interpolation in /v1/generate, in-process: results, determinism, errors, shared evaluations."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from models import checkpoint
from models.consistency import ConsistencyModel
from models.editing import LUMA, inpainting, super_resolution
from models.sampling import sample, to_uint8
from service.api.edit import to_tensor
from tests.conftest import randomize
from tests.integration.conftest import (
    TINY,
    Gate,
    app_settings,
    decode,
    decode_b64,
    gated,
    metric,
    running_app,
)
from tests.integration.test_api import error_of, metrics_of

pytestmark = pytest.mark.anyio
TWO = [80.0, 0.821]


@pytest.fixture(scope="module")
def rgb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)
    model = randomize(ConsistencyModel.from_config(TINY.replace(image_channels=3, num_classes=0)), seed=5)
    return checkpoint.save(tmp_path_factory.mktemp("models") / "rgb.safetensors", model)


def digit(seed: int = 0, size: int = 8, channels: int = 1) -> np.ndarray:
    """A random uint8 image (H, W, C)."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


def png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def images_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.stack([decode_b64(image["b64"]) for image in response.json()["images"]])


def offline_edit(path: Path, projection: object, seed: int, n: int, sigmas: list[float], label: int) -> np.ndarray:
    model = checkpoint.load(path).model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = sample(model, [seed + i for i in range(n)], sigmas, class_labels=[label] * n,
                   projection=projection, start=projection.start)  # type: ignore[attr-defined]
    finally:
        torch.set_num_threads(threads)
    return to_uint8(x)


async def test_inpainting_keeps_the_known_half_and_is_models_sampling_with_the_projection(
    tiny_checkpoint: Path,
) -> None:
    y = digit(1)
    body = {"task": "inpaint", "image": png_b64(y), "box": [0, 4, 8, 8], "n": 3, "seed": 10, "steps": 2,
            "class_label": 7}
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        response = await client.post("/v1/edit", json=body)
        alone = await client.post("/v1/edit", json={**body, "n": 1, "seed": 11})
        mask = np.zeros((8, 8, 1), dtype=np.uint8)
        mask[4:] = 255
        by_mask = await client.post("/v1/edit", json={**{k: v for k, v in body.items() if k != "box"},
                                                     "mask": png_b64(mask)})
        raw = await client.post("/v1/edit", json={**body, "n": 1}, headers={"Accept": "image/png"})
    out = images_of(response)
    assert [image["seed"] for image in response.json()["images"]] == [10, 11, 12]
    assert (out[:, :4] == y[:4]).all()  # every known pixel, exactly
    omega = torch.zeros(8, 8)
    omega[4:] = 1
    expected = offline_edit(tiny_checkpoint, inpainting(to_tensor(y), omega), 10, 3, TWO, 7)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(images_of(alone)[0], out[1])  # by seed alone, as in a batch
    np.testing.assert_array_equal(images_of(by_mask), out)
    assert raw.headers["content-type"] == "image/png" and raw.headers["x-seed"] == "10"
    np.testing.assert_array_equal(decode(raw.content), out[0])


async def test_super_resolution_averages_back_to_the_low_resolution_input(tiny_checkpoint: Path) -> None:
    low = digit(2, size=4)
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        response = await client.post("/v1/edit", json={"task": "superres", "image": png_b64(low), "factor": 2,
                                                        "n": 2, "seed": 3, "steps": 2, "class_label": 1})
    patches = images_of(response).astype(np.float64).reshape(2, 4, 2, 4, 2, 1)  # (n, h, p, w, p, C)
    means = patches.mean(axis=(2, 4))
    clipped = ((patches == 0) | (patches == 255)).any(axis=(2, 4))  # a pixel left [-1, 1]: the mean cannot stay
    assert (~clipped).sum() >= 8 and np.abs(means - low)[~clipped].max() <= 0.5 + 1e-9  # each pixel rounds alone
    expected = offline_edit(tiny_checkpoint, super_resolution(to_tensor(low), 2), 3, 2, TWO, 1)
    np.testing.assert_array_equal(images_of(response), expected)


async def test_colorization_keeps_the_luma_of_the_grey_input(rgb_checkpoint: Path) -> None:
    grey = digit(3)
    async with running_app(app_settings({"rgb": rgb_checkpoint})) as (_, client):
        response = await client.post("/v1/edit", json={"task": "colorize", "image": png_b64(grey), "seed": 1})
    out = images_of(response).astype(np.float64)[0]  # (8, 8, 3)
    clipped = (out == 0) | (out == 255)  # where the colour left [-1, 1], the luma cannot stay
    luma = out @ np.array(LUMA)
    keep = ~clipped.any(axis=-1)
    assert keep.sum() > 0 and np.abs(luma - grey[..., 0])[keep].max() <= 1.0


async def test_denoising_is_one_evaluation_of_the_input(tiny_checkpoint: Path) -> None:
    y = digit(4)
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        before = await metrics_of(client)
        response = await client.post("/v1/edit", json={"task": "denoise", "image": png_b64(y), "sigma": 0.5,
                                                        "class_label": 3})
        samples = await metrics_of(client)
    model = checkpoint.load(tiny_checkpoint).model
    with torch.no_grad():
        expected = to_uint8(model(to_tensor(y)[None], torch.tensor([0.5]), torch.tensor([3])).clamp(-1, 1))
    assert np.abs(images_of(response).astype(int) - expected.astype(int)).max() <= 1
    passes = metric(samples, "cmserve_forward_passes_total", model="tiny") - metric(
        before, "cmserve_forward_passes_total", model="tiny")
    assert passes == 1
    assert metric(samples, "cmserve_task_images_total", model="tiny", task="denoise") == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"image": png_b64(digit(0, size=6))}, "image"),  # wrong size
        ({"image": base64.b64encode(b"not an image at all").decode()}, "image"),
        ({"image": base64.b64encode(base64.b64decode(png_b64(digit(0)))[:33] + b"\0" * 40).decode()}, "image"),  # a
        # good header (signature, IHDR) over no pixel data: refused when decoded, as the engine thread prepares it
        ({"image": "%%% not base64"}, "image"),
        ({"box": None, "mask": png_b64(digit(0, size=4))}, "mask"),  # a mask of another size
        ({"box": None}, "mask"),  # inpaint needs a mask or a box
        ({"mask": png_b64(digit(0))}, "box"),  # both
        ({"box": [0, 4, 9, 8]}, "box"),  # outside the image
        ({"box": [4, 4, 4, 8]}, "box"),  # empty
        ({"box": [0, 4, 8]}, "box"),
        ({"task": "superres", "box": None, "factor": 3}, "factor"),  # does not divide 8
        ({"task": "superres", "box": None}, "factor"),
        ({"task": "superres", "box": None, "factor": 2}, "image"),  # an 8×8 input is not 4×4
        ({"factor": 2}, "factor"),  # a field of another task
        ({"task": "colorize", "box": None}, "task"),  # a one-channel model
        ({"task": "denoise", "box": None, "sigma": 100.0}, "sigma"),
        ({"task": "denoise", "box": None, "sigma": 0.5, "steps": 2}, "steps"),
        ({"task": "outpaint"}, "task"),
        ({"n": 0}, "n"),
        ({"class_label": 10}, "class_label"),
        ({"steps": 99}, "steps"),
        ({"strength": 1}, "strength"),
    ],
)
async def test_bad_fields_are_422_naming_the_field(tiny_checkpoint: Path, change: dict, field: str) -> None:
    body = {"task": "inpaint", "image": png_b64(digit(5)), "box": [0, 4, 8, 8], **change}
    body = {k: v for k, v in body.items() if v is not None}
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        response = await client.post("/v1/edit", json=body)
    error_of(response, 422, "invalid_request", field)


async def test_a_20_mb_image_is_413(tiny_checkpoint: Path) -> None:
    huge = base64.b64encode(b"\0" * 15_000_000).decode()  # 20 MB of base64
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        response = await client.post("/v1/edit", json={"task": "inpaint", "image": huge, "box": [0, 0, 8, 8]})
    error_of(response, 413, "body_too_large")


def test_the_default_body_cap_admits_an_edit_of_a_256_rgb_png() -> None:
    from service.settings import Settings

    noise = digit(6, size=256, channels=3)  # incompressible: the largest PNG of that size
    body = f'{{"task": "inpaint", "image": "{png_b64(noise)}", "mask": "{png_b64(digit(7, 256))}"}}'
    assert len(body) < Settings().max_body_bytes


async def test_edit_and_generate_requests_share_evaluations(tiny_checkpoint: Path) -> None:
    """While the device is busy, 4 edit and 4 generate requests queue; the next evaluation holds all 8 images."""
    gate = Gate()
    settings = app_settings({"tiny": tiny_checkpoint}, max_batch=8, max_wait_ms=50)
    edit = {"task": "inpaint", "image": png_b64(digit(8)), "box": [0, 4, 8, 8]}
    async with running_app(settings, gated(gate)) as (app, client):
        before = await metrics_of(client)
        gate.close()
        held = asyncio.create_task(client.post("/v1/generate", json={"seed": 1}))
        assert await asyncio.to_thread(gate.waiting.wait, 30)
        calls = [client.post("/v1/edit", json={**edit, "seed": s}) for s in range(4)]
        calls += [client.post("/v1/generate", json={"seed": 100 + s}) for s in range(4)]
        tasks = [asyncio.create_task(c) for c in calls]
        while app.state.service.scheduler.queue_depth("tiny") < 8:
            await asyncio.sleep(0.01)
        gate.open()
        responses = [await held, *await asyncio.gather(*tasks)]
        samples = await metrics_of(client)
    assert all(r.status_code == 200 for r in responses)

    def delta(name: str, **labels: str) -> float:
        return metric(samples, name, model="tiny", **labels) - metric(before, name, model="tiny", **labels)

    assert delta("cmserve_forward_passes_total") == 2  # the held image's evaluation, then all 8 at once
    assert delta("cmserve_batch_size_sum") / delta("cmserve_batch_size_count") == 4.5  # mean images / evaluation
    assert delta("cmserve_task_images_total", task="inpaint") == 4
    assert delta("cmserve_task_images_total", task="generate") == 5
    assert delta("cmserve_task_requests_total", task="inpaint") == 4


# ---------------------------------------------------------------------- interpolation (POST /v1/generate)


async def test_interpolation_ends_are_the_seeds_images_and_points_are_the_same_alone(tiny_checkpoint: Path) -> None:
    strip = {"interpolate": {"seeds": [5, 9], "points": 5}, "steps": 2, "class_label": 4}
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        response = await client.post("/v1/generate", json=strip)
        one = await client.post("/v1/generate", json={**strip, "interpolate": {"seeds": [5, 9], "alphas": [0.25]}})
        a = await client.post("/v1/generate", json={"seed": 5, "steps": 2, "class_label": 4})
        b = await client.post("/v1/generate", json={"seed": 9, "steps": 1, "class_label": 4})
        b_end = await client.post("/v1/generate", json={"interpolate": {"seeds": [5, 9], "alphas": [1.0]},
                                                        "steps": 1, "class_label": 4})
    out = images_of(response)
    assert [i["alpha"] for i in response.json()["images"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert {i["seed"] for i in response.json()["images"]} == {5}
    np.testing.assert_array_equal(out[0], images_of(a)[0])  # α = 0: seed a's own image
    np.testing.assert_array_equal(images_of(one)[0], out[1])  # alone as in the strip
    np.testing.assert_array_equal(images_of(b_end)[0], images_of(b)[0])  # α = 1, one step: seed b's image


@pytest.mark.parametrize(
    ("interpolate", "extra", "field"),
    [
        ({"seeds": [1, 2]}, {}, "interpolate"),  # neither points nor alphas
        ({"seeds": [1, 2], "points": 3, "alphas": [0.5]}, {}, "interpolate"),
        ({"seeds": [1], "points": 3}, {}, "interpolate.seeds"),
        ({"seeds": [1, 2], "alphas": [1.5]}, {}, "interpolate.alphas[0]"),
        ({"seeds": [1, 2], "points": 3, "step": 1}, {}, "interpolate.step"),
        ({"seeds": [1, 2], "points": 3}, {"seed": 4}, "seed"),
        ({"seeds": [1, 2], "points": 3}, {"n": 2}, "n"),
        ({"seeds": [1, 2], "points": 1000}, {}, "n"),  # more images than a request may have
    ],
)
async def test_bad_interpolations_are_422_naming_the_field(tiny_checkpoint: Path, interpolate: dict, extra: dict,
                                                           field: str) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        response = await client.post("/v1/generate", json={"interpolate": interpolate, **extra})
    error_of(response, 422, "invalid_request", field)


async def test_an_edit_refused_for_its_task_fields_counts_under_its_task(tiny_checkpoint: Path) -> None:
    async with running_app(app_settings({"tiny": tiny_checkpoint})) as (_, client):
        refused = await client.post("/v1/edit", json={"task": "colorize", "image": png_b64(digit(9))})
        unparsed = await client.post("/v1/edit", json={"task": "colorize"})  # no image: the task is never read
        samples = await metrics_of(client)
    error_of(refused, 422, "invalid_request", "task")
    error_of(unparsed, 422, "invalid_request", "image")
    assert metric(samples, "cmserve_task_requests_total", model="tiny", task="colorize") == 1
    assert metric(samples, "cmserve_task_requests_total", model="unknown", task="unknown") == 1
