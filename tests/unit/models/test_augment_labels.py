"""The augmentation-label input of both backbones (ModelConfig.augment_dim): a zero-initialised no-op at first,
used when trained, skipped when sampling, and stored in checkpoints (older ones load as augment_dim 0)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import checkpoint
from models.config import ConfigError, ModelConfig, preset
from models.consistency import ConsistencyModel
from models.sampling import sample
from tests.conftest import randomize

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = {
    "unet": preset("digits").replace(model_channels=16, num_groups=4),
    "adm": ModelConfig(
        backbone="adm",
        image_channels=3,
        image_size=16,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        head_channels=16,
        embedding="positional",
        num_classes=5,
        num_groups=8,
    ),
}


def inputs(cfg: ModelConfig, n: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *cfg.image_shape, generator=gen)
    sigma = torch.exp(torch.randn(n, generator=gen))
    labels = torch.randint(cfg.num_classes, (n,), generator=gen) if cfg.num_classes else None
    augment = torch.randn(n, 9, generator=gen)
    return x, sigma, labels, augment


def with_and_without(cfg: ModelConfig) -> tuple[ConsistencyModel, ConsistencyModel]:
    """A random model without the input, and the same weights with a fresh (zero) augmentation input."""
    plain = randomize(ConsistencyModel.from_config(cfg), seed=3).eval()
    augmented = ConsistencyModel.from_config(cfg.replace(augment_dim=9)).eval()
    missing, unexpected = augmented.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["backbone.augment_emb.weight"] and unexpected == []
    return plain, augmented


@pytest.mark.parametrize("backbone", ["unet", "adm"])
def test_a_zero_initialised_augmentation_input_computes_what_the_model_without_it_computes(backbone: str) -> None:
    plain, augmented = with_and_without(CONFIGS[backbone])
    layer = augmented.backbone.augment_emb
    assert layer.bias is None and bool((layer.weight == 0).all())
    assert layer.weight.shape == (CONFIGS[backbone].model_channels, 9)  # into the noise embedding's width
    x, sigma, labels, augment = inputs(CONFIGS[backbone])
    with torch.no_grad():
        expected = plain(x, sigma, labels)
        assert torch.equal(augmented(x, sigma, labels, augment_labels=augment), expected)
        assert torch.equal(augmented(x, sigma, labels), expected)  # None: the layer is skipped


@pytest.mark.parametrize("backbone", ["unet", "adm"])
def test_trained_augmentation_weights_condition_the_output_and_zero_labels_do_not(backbone: str) -> None:
    plain, augmented = with_and_without(CONFIGS[backbone])
    torch.nn.init.normal_(augmented.backbone.augment_emb.weight)
    x, sigma, labels, augment = inputs(CONFIGS[backbone])
    with torch.no_grad():
        expected = plain(x, sigma, labels)
        assert not torch.allclose(augmented(x, sigma, labels, augment_labels=augment), expected)
        assert torch.equal(augmented(x, sigma, labels, augment_labels=torch.zeros_like(augment)), expected)
        assert torch.equal(augmented(x, sigma, labels), expected)  # sampling passes nothing: un-augmented


def test_a_model_without_the_input_refuses_augmentation_labels() -> None:
    model = ConsistencyModel.from_config(CONFIGS["unet"])
    x, sigma, labels, augment = inputs(CONFIGS["unet"])
    with pytest.raises(ValueError, match="augment_labels must be None"):
        model(x, sigma, labels, augment_labels=augment)


def test_augment_dim_is_checked_and_defaults_to_zero() -> None:
    assert ModelConfig().augment_dim == 0
    with pytest.raises(ConfigError, match="augment_dim must be an integer 0…64"):
        ModelConfig(augment_dim=-1)
    assert (
        ModelConfig.from_dict({k: v for k, v in ModelConfig().to_dict().items() if k != "augment_dim"}) == ModelConfig()
    )


def test_a_checkpoint_with_augment_dim_9_round_trips_and_samples(tmp_path: Path) -> None:
    """The service loads and samples it like any other: no labels passed, so un-augmented images."""
    _, model = with_and_without(CONFIGS["unet"])
    torch.nn.init.normal_(model.backbone.augment_emb.weight)
    path = checkpoint.save(
        tmp_path / "aug.safetensors", model, class_names=[str(d) for d in range(10)], schedules={1: [80.0]}
    )
    loaded = checkpoint.load(path)
    assert loaded.meta.config.augment_dim == 9
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    images = sample(loaded.model, [0, 1], [80.0], [3, 4])
    assert torch.equal(images, sample(model, [0, 1], [80.0], [3, 4]))


def test_checkpoints_without_the_field_load_with_augment_dim_0() -> None:
    """models/pretrained/digits.safetensors predates augment_dim."""
    shipped = ROOT / "models" / "pretrained" / "digits.safetensors"
    meta = checkpoint.read_meta(shipped.read_bytes())
    assert meta.config.augment_dim == 0
    assert checkpoint.load(shipped).model.backbone.augment_emb is None
