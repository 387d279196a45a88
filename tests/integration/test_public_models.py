"""The service with converted public consistency models next to the digits default.

A reduced-width CD ImageNet-64 converted to a checkpoint (with class names) and a reduced-width CD bedroom-256
served straight from its hub-shaped folder (converted in memory at load): classes by index and by name, the
launch-script schedules, 64×64 and 256×256 RGB images that are bit-identical alone and in a batch, and the
per-size default of images per request.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models import checkpoint, convert
from models.consistency import ConsistencyModel
from models.layers import set_per_image
from models.sampling import sample, to_uint8
from service.engine import Engine
from service.registry import EMBEDDED_DEFAULT, default_max_images, max_images_for
from service.settings import Settings
from tests.integration.conftest import app_settings, decode_b64, running_app
from tests.unit.models import public_models as pm

pytest.importorskip("diffusers")

CLASS_NAMES = [f"class-{i:03d}" for i in range(1000)]


@pytest.fixture(scope="module")
def public_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("public")
    imagenet_cfg, bedroom_cfg = pm.REDUCED["cd_imagenet64_l2"], pm.REDUCED["cd_bedroom256_lpips"]
    imagenet = pm.write_hub_folder(root / "diffusers-cd_imagenet64_l2", imagenet_cfg, 40,
                                   pm.diffusers_unet(imagenet_cfg, seed=11))
    names = root / "imagenet_classes.txt"
    names.write_text("\n".join(CLASS_NAMES) + "\n")
    converted = root / "cd_imagenet64_l2.safetensors"
    convert.convert(imagenet, class_names=names).save(converted)
    bedroom = pm.write_hub_folder(root / "diffusers-cd_bedroom256_lpips", bedroom_cfg, 40,
                                  pm.diffusers_unet(bedroom_cfg, seed=12))
    return {"digits": EMBEDDED_DEFAULT, "imagenet64": converted, "bedroom256": bedroom}


def settings(models: dict[str, Path]) -> Settings:
    return app_settings(models, max_batch=4, batch_buckets=[1, 2, 4])


def reference(path: Path, seeds: list[int], sigmas: list[float], labels: list[int] | None = None) -> np.ndarray:
    """models.sampling's pixels, all images in one batch, with the per-image CPU kernels the service uses."""
    model = (convert.load_folder(path) if path.is_dir() else checkpoint.load(path)).model
    set_per_image(model)
    return to_uint8(sample(model, seeds, sigmas, class_labels=labels))


@pytest.mark.anyio
async def test_public_models_next_to_digits(public_models: dict[str, Path]) -> None:
    """One app start (three models warm up): listing, class labels, images bit-identical alone and in a batch and
    models.sampling's, per-size limits."""
    async with running_app(settings(public_models)) as (app, client):
        listing = (await client.get("/v1/models")).json()
        await check_class_labels(client, public_models)
        await check_alone_and_in_a_batch(client, public_models)
        too_many = await client.post("/v1/generate", json={"model": "bedroom256", "n": 17})
        registry = app.state.service.registry
    models = {m["name"]: m for m in listing["models"]}
    assert list(models) == ["digits", "imagenet64", "bedroom256"] and listing["default_model"] == "digits"
    imagenet, bedroom = models["imagenet64"], models["bedroom256"]
    assert imagenet["image_shape"] == [3, 64, 64] and imagenet["num_classes"] == 1000
    assert imagenet["class_names"] == CLASS_NAMES and imagenet["preset"] == "cd_imagenet64_l2"
    assert imagenet["recommended_schedules"]["2"] == pytest.approx([80.0, 1.3823679566])
    assert bedroom["image_shape"] == [3, 256, 256] and bedroom["num_classes"] == 0 and bedroom["class_names"] is None
    assert bedroom["recommended_schedules"]["2"] == pytest.approx([80.0, 4.3655616857])
    assert too_many.status_code in (400, 422) and "CM_MAX_IMAGES_PER_REQUEST" in too_many.text
    limits = [registry.get(name).max_images_per_request for name in ("digits", "imagenet64", "bedroom256")]
    assert limits == [64, 64, 16]
    assert [models[name]["max_images_per_request"] for name in ("digits", "imagenet64", "bedroom256")] == limits
    assert too_many.status_code == 422 and too_many.json()["error"]["field"] == "n"


async def check_class_labels(client: httpx.AsyncClient, public_models: dict[str, Path]) -> None:
    by_index = (await client.post("/v1/generate",
                                  json={"model": "imagenet64", "seed": 9, "class_label": 207})).json()
    by_name = (await client.post("/v1/generate",
                                 json={"model": "imagenet64", "seed": 9, "class_label": "class-207"})).json()
    unknown = await client.post("/v1/generate", json={"model": "imagenet64", "class_label": "tabby"})
    conditional = await client.post("/v1/generate", json={"model": "bedroom256", "class_label": 3})
    assert by_index["images"] == by_name["images"] and by_index["images"][0]["class_label"] == 207
    np.testing.assert_array_equal(decode_b64(by_index["images"][0]["b64"]),
                                  reference(public_models["imagenet64"], [9], [80.0], [207])[0])
    assert unknown.status_code in (400, 422) and "tabby" in unknown.text
    assert conditional.status_code in (400, 422) and "unconditional" in conditional.text


async def check_alone_and_in_a_batch(client: httpx.AsyncClient, public_models: dict[str, Path]) -> None:
    batch_64 = (await client.post("/v1/generate", json={"model": "imagenet64", "n": 3, "seed": 40,
                                                         "steps": 2, "class_label": 1})).json()
    alone_64 = [await client.post("/v1/generate", json={"model": "imagenet64", "seed": 40 + i, "steps": 2,
                                                         "class_label": 1})
                for i in range(3)]  # one at a time: each alone in its batch
    batch_256 = (await client.post("/v1/generate", json={"model": "bedroom256", "n": 2, "seed": 7,
                                                          "steps": 2})).json()
    alone_256 = (await client.post("/v1/generate", json={"model": "bedroom256", "seed": 8, "steps": 2})).json()
    webp = (await client.post("/v1/generate", json={"model": "bedroom256", "seed": 8, "format": "webp"})).json()
    jpeg = (await client.post("/v1/generate", json={"model": "bedroom256", "seed": 8, "format": "jpeg"})).json()
    images_64 = [decode_b64(i["b64"]) for i in batch_64["images"]]
    for i, response in enumerate(alone_64):
        np.testing.assert_array_equal(decode_b64(response.json()["images"][0]["b64"]), images_64[i])
    np.testing.assert_array_equal(np.stack(images_64),
                                  reference(public_models["imagenet64"], [40, 41, 42], batch_64["sigmas"], [1] * 3))
    assert images_64[0].shape == (64, 64, 3)
    second = decode_b64(batch_256["images"][1]["b64"])
    assert second.shape == (256, 256, 3) and batch_256["sigmas"] == pytest.approx([80.0, 4.3655616857])
    np.testing.assert_array_equal(decode_b64(alone_256["images"][0]["b64"]), second)
    assert decode_b64(webp["images"][0]["b64"]).shape == (256, 256, 3)  # lossless WebP
    assert decode_b64(jpeg["images"][0]["b64"]).shape == (256, 256, 3)


def test_images_per_request_default_by_image_size(public_models: dict[str, Path]) -> None:
    assert (default_max_images(8, 64), default_max_images(64, 64), default_max_images(256, 64)) == (64, 64, 16)
    assert default_max_images(256, 8) == 8  # never above CM_MAX_IMAGES_PER_REQUEST's default
    assert max_images_for(settings(public_models), 256) == 16
    explicit = app_settings(public_models, max_batch=4, batch_buckets=[1, 2, 4], max_images_per_request=32)
    assert max_images_for(explicit, 256) == 32  # set explicitly: the same for every model


@pytest.mark.anyio
async def test_a_folder_with_pickled_weights_is_not_served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = pm.REDUCED["cd_imagenet64_l2"]
    folder = pm.write_hub_folder(tmp_path / "pickled", cfg, 40, pm.diffusers_unet(cfg, seed=1), weights="bin")
    async with running_app(app_settings({"pickled": folder}), wait_ready=False) as (app, _):
        await app.state.service.wait_settled()
        assert not app.state.service.ready
    assert "pickled weights are not served" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_size_256_batches_on_the_gpu_fit_or_halve(capsys: pytest.CaptureFixture[str]) -> None:
    """The memory a full-size bedroom-256 batch needs in bf16, and a batch of 256 completing (halved if need be)."""
    cfg = convert.config_from_openai_flags(convert.OPENAI_PRESETS["openai-lsun256"])
    engine = Engine(ConsistencyModel.from_config(cfg), device="cuda", dtype="bf16", buckets=[1, 16, 64, 256])
    sigma = torch.full((256,), 80.0)
    peaks = {}
    for batch in (1, 16, 64, 256):
        torch.cuda.reset_peak_memory_stats()
        result = engine.evaluate(torch.zeros(batch, *cfg.image_shape), sigma[:batch], None)
        assert not result.failed and result.out.shape == (batch, 3, 256, 256)
        peaks[batch] = torch.cuda.max_memory_allocated() / 2**30
    with capsys.disabled():
        print(f"\nbedroom-256 bf16 peak GiB by batch: {peaks}; batches halved after OOM: {engine.oom_splits}")
