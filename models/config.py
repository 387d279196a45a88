"""Model configuration: one frozen dataclass and the named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Embedding = Literal["fourier", "positional"]
Backbone = Literal["unet", "adm"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the UNet backbone plus the consistency-model constants (CM §3, iCT §3)."""

    backbone: Backbone = "unet"  # unet (models/unet.py, ours) or adm (models/adm.py, OpenAI's checkpoints)
    image_channels: int = 1  # C of the data
    image_size: int = 8  # H = W of the data
    model_channels: int = 64  # channels at the first resolution
    channel_mult: tuple[int, ...] = (1, 2)  # per resolution level; each level after the first halves H, W
    num_res_blocks: int = 2  # residual blocks per level in the encoder (decoder has one more)
    attn_resolutions: tuple[int, ...] = ()  # resolutions (H) that get self-attention after each block
    head_channels: int = 64  # channels per attention head
    dropout: float = 0.0  # iCT: 0.3 on CIFAR-10
    embedding: Embedding = "fourier"  # fourier (NCSN++) or positional (ADM) noise embedding
    fourier_scale: float = 0.02  # iCT §3.2: 0.02 instead of NCSN++'s 16
    num_classes: int = 0  # 0 = unconditional
    emb_mult: int = 4  # embedding width = emb_mult * model_channels
    num_groups: int = 32  # GroupNorm groups (unet: capped by the channel count; adm: exactly this)
    scale_shift_norm: bool = True  # adm: FiLM scale/shift after the second norm, else the embedding is added
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0

    def __post_init__(self) -> None:
        problems = []
        if self.image_channels < 1 or self.image_size < 1:
            problems.append("image_channels and image_size must be positive")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            problems.append(f"image_size {self.image_size} is not divisible by 2^(levels-1)")
        if not self.channel_mult or min(self.channel_mult) < 1:
            problems.append("channel_mult needs at least one positive entry")
        if self.embedding not in ("fourier", "positional"):
            problems.append(f"embedding must be 'fourier' or 'positional', not {self.embedding!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), not {self.dropout}")
        if self.backbone not in ("unet", "adm"):
            problems.append(f"backbone must be 'unet' or 'adm', not {self.backbone!r}")
        if self.backbone == "adm" and self.embedding != "positional":
            problems.append("the adm backbone needs embedding='positional' (its checkpoints were trained with it)")
        if self.backbone == "adm":
            levels = range(len(self.channel_mult))
            attn_levels = [lvl for lvl in levels if self.image_size >> lvl in self.attn_resolutions]
            widths = sorted({self.model_channels * self.channel_mult[lvl] for lvl in [*attn_levels, -1]})
            if any(w % self.head_channels for w in widths):
                problems.append(f"adm attention widths {widths} must be multiples of head_channels "
                                f"{self.head_channels}")
        if self.backbone == "unet" and not self.scale_shift_norm:
            problems.append("scale_shift_norm=False needs backbone='adm' (the unet backbone always uses scale/shift)")
        if self.num_classes < 0:
            problems.append("num_classes must be >= 0")
        if not 0 < self.sigma_min < self.sigma_max:
            problems.append("need 0 < sigma_min < sigma_max")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.image_size, self.image_size)

    @property
    def data_dim(self) -> int:
        return self.image_channels * self.image_size * self.image_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict()` output; unknown keys are an error naming the allowed ones."""
        allowed = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(allowed)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


PRESETS: dict[str, ModelConfig] = {
    # 1x8x8 digits, class-conditional: one 8x8 level (a 3x3 conv there does 4x the work per weight
    # of one at 4x4, so the matmul units stay busy on a CPU), no attention; 1.28 M parameters.
    "digits": ModelConfig(
        image_channels=1,
        image_size=8,
        model_channels=96,
        channel_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=(),
        emb_mult=2,
        num_classes=10,
        dropout=0.0,
    ),
    # NCSN++-sized CIFAR-10 network of the iCT paper (about 56 M parameters), dropout 0.3.
    "cifar10": ModelConfig(
        image_channels=3,
        image_size=32,
        model_channels=128,
        channel_mult=(2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(16,),
        dropout=0.3,
        embedding="fourier",
        fourier_scale=0.02,
    ),
    # ADM-like ImageNet 64x64, class-conditional, positional noise embedding.
    "imagenet64": ModelConfig(
        image_channels=3,
        image_size=64,
        model_channels=192,
        channel_mult=(1, 2, 3, 4),
        num_res_blocks=3,
        attn_resolutions=(32, 16, 8),
        dropout=0.2,
        embedding="positional",
        num_classes=1000,
    ),
}


def preset(name: str) -> ModelConfig:
    """The named preset; an unknown name is an error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
