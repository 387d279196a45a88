"""Presets: each builds, counts its parameters and runs a forward pass."""

from __future__ import annotations

import pytest
import torch

from models import convert
from models.__main__ import flops_per_image
from models.config import MAX_CHANNELS, MAX_IMAGE_SIZE, PRESETS, ConfigError, ModelConfig, preset
from models.consistency import ConsistencyModel
from tests.unit.models.public_models import BEDROOM256_UNET, IMAGENET64_UNET, scheduler_config


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


def test_fields_added_later_are_left_out_at_their_defaults_so_older_readers_load_the_file() -> None:
    cfg = preset("digits")
    assert not {"kind", "augment_dim"} & set(cfg.to_dict())  # what a cmserve before them wrote and can read
    for later in (cfg.replace(kind="denoiser"), cfg.replace(augment_dim=9)):
        data = later.to_dict()
        assert ModelConfig.from_dict(data) == later
        assert set(data) - set(cfg.to_dict()) == ({"kind"} if later.kind == "denoiser" else {"augment_dim"})


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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_channels": 64.0}, r"model_channels must be an integer 1…4096, got 64\.0"),
        ({"model_channels": True}, r"model_channels must be an integer 1…4096, got True"),
        ({"model_channels": -64}, r"model_channels must be an integer 1…4096, got -64"),
        ({"model_channels": 63}, r"model_channels must be even"),
        ({"model_channels": 4096, "channel_mult": (2,)}, r"channel_mult \[2\] × model_channels 4096 gives widths"),
        ({"model_channels": 1024, "channel_mult": (1, 8)}, r"gives widths \[1024, 8192\]; at most 4096"),
        ({"num_res_blocks": 200_000}, r"num_res_blocks must be an integer 1…16"),
        ({"num_res_blocks": 0}, r"num_res_blocks must be an integer 1…16"),
        ({"image_size": 4096}, r"image_size must be an integer 1…1024"),
        ({"image_size": 2**40}, r"image_size must be an integer 1…1024"),
        ({"head_channels": 0}, r"head_channels must be an integer 1…4096"),
        ({"num_groups": -3}, r"num_groups must be an integer 1…4096"),
        ({"num_classes": 10**6}, r"num_classes must be an integer 0…100000"),
        ({"channel_mult": ()}, r"channel_mult must be a list of 1…8 integers"),
        ({"channel_mult": (1,) * 9}, r"channel_mult must be a list of 1…8 integers"),
        ({"channel_mult": (1, 0)}, r"channel_mult must be a list of 1…8 integers 1…4096, got \(1, 0\)"),
        ({"channel_mult": [1, 2]}, r"channel_mult must be a list"),  # a tuple: the config is hashable
        ({"attn_resolutions": (0,)}, r"attn_resolutions must be a list of 0…8 integers 1…1024"),
        ({"sigma_max": float("inf")}, r"sigma_max must be a finite number in \(0, 10000\]"),
        ({"sigma_data": float("nan")}, r"sigma_data must be a finite number"),
        ({"rho": 0}, r"rho must be a finite number in \(0, 100\]"),
        ({"dropout": True}, r"dropout must be a finite number in \[0, 1\)"),
        ({"scale_shift_norm": 1}, r"scale_shift_norm must be true or false, got 1"),
        ({"backbone": 3}, r"backbone must be one of 'unet', 'adm', not 3"),
        ({"model_channels": 40, "attn_resolutions": (8,), "head_channels": 13}, r"splits attention width 40 into 3"),
        ({"sigma_min": 80.0}, r"sigma_min 80\.0 must be below sigma_max 80\.0"),
    ],
)
def test_every_field_is_type_and_range_checked(change: dict, message: str) -> None:
    """Issue 20: config values from an untrusted header are checked by type (bool and float are not int) and
    range before any network is built; each problem begins with its field."""
    with pytest.raises(ConfigError, match=message) as info:
        preset("digits").replace(**change)
    field = next(iter(change)) if len(change) == 1 else None
    assert field is None or any(p.startswith(field) for p in info.value.problems) or "sigma_min" in change


def test_adm_num_groups_must_divide_the_widths() -> None:
    adm = ModelConfig(backbone="adm", image_size=16, model_channels=32, channel_mult=(1, 2), embedding="positional",
                      head_channels=16, num_groups=8)
    with pytest.raises(ConfigError, match=r"num_groups 12 must divide every level's width \[32, 64\]"):
        adm.replace(num_groups=12)


def test_the_limits_admit_the_real_models() -> None:
    """The presets and the public models (ImageNet-64, LSUN-256; flags and diffusers configs) are within limits."""
    configs = [*PRESETS.values(), *(convert.config_from_openai_flags(f) for f in convert.OPENAI_PRESETS.values())]
    configs += [convert.config_from_diffusers(u, scheduler_config(40), "hub") for u in (IMAGENET64_UNET,
                                                                                       BEDROOM256_UNET)]
    for cfg in configs:
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.image_size <= MAX_IMAGE_SIZE and max(cfg.widths) <= MAX_CHANNELS
    assert {c.image_size for c in configs} >= {64, 256}
