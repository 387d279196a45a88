"""Presets: each builds, counts its parameters and runs a forward pass."""

from __future__ import annotations

import pytest
import torch

from models.__main__ import flops_per_image
from models.config import PRESETS, ModelConfig, preset
from models.consistency import ConsistencyModel


def forward_once(cfg: ModelConfig, batch: int = 2) -> torch.Tensor:
    model = ConsistencyModel.from_config(cfg).eval()
    x = torch.randn(batch, *cfg.image_shape)
    labels = torch.randint(cfg.num_classes, (batch,)) if cfg.num_classes else None
    with torch.no_grad():
        return model(x, torch.tensor([80.0, 0.5][:batch]), labels)


def test_digits_preset_size_and_forward() -> None:
    cfg = preset("digits")
    model = ConsistencyModel.from_config(cfg)
    assert model.num_parameters() <= 1_500_000
    assert cfg.image_shape == (1, 8, 8) and cfg.num_classes == 10
    assert forward_once(cfg).shape == (2, 1, 8, 8)
    assert 0.05e9 < flops_per_image(model) < 0.5e9


@pytest.mark.slow
def test_cifar10_preset() -> None:
    cfg = preset("cifar10")
    assert cfg.dropout == 0.3 and cfg.fourier_scale == 0.02 and cfg.embedding == "fourier"
    n = ConsistencyModel.from_config(cfg).num_parameters()
    assert 50e6 < n < 62e6  # NCSN++-sized, about 56 M
    assert forward_once(cfg).shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_imagenet64_preset() -> None:
    cfg = preset("imagenet64")
    assert cfg.embedding == "positional" and cfg.num_classes == 1000
    assert forward_once(cfg, batch=1).shape == (1, 3, 64, 64)


def test_large_presets_build_on_meta() -> None:
    """The fast check for cifar10/imagenet64: shapes and parameter counts without allocating."""
    for name in ("cifar10", "imagenet64"):
        with torch.device("meta"):
            model = ConsistencyModel.from_config(PRESETS[name])
        assert model.num_parameters() > 10e6


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        preset("mnist")


def test_config_round_trip_and_unknown_keys() -> None:
    cfg = preset("cifar10")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"embedding": "learned"}, "embedding"),
        ({"dropout": 1.5}, "dropout"),
        ({"image_size": 6, "channel_mult": (1, 2, 2)}, "divisible"),
        ({"sigma_min": 100.0}, "sigma_min"),
    ],
)
def test_invalid_config_is_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preset("digits").replace(**change)


def test_attention_and_positional_variant_runs() -> None:
    cfg = preset("digits").replace(
        model_channels=32,
        channel_mult=(1, 2),
        attn_resolutions=(4,),
        head_channels=16,
        embedding="positional",
        num_groups=8,
        dropout=0.1,
    )
    assert forward_once(cfg).shape == (2, 1, 8, 8)
