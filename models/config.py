"""Model configuration: one frozen dataclass and the named presets.

Every field is checked when a config is made (from code, a checkpoint header or a converted public model):
its type (an integer is never a bool or a float), its range (the limits below), and the fields together (the
image halves once per level, attention widths split into whole heads, GroupNorm groups divide the widths).
A bad config raises `ConfigError`, whose `problems` each begin with the field they are about.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Embedding = Literal["fourier", "positional"]
Backbone = Literal["unet", "adm"]
Kind = Literal["consistency", "denoiser"]
EMBEDDINGS = ("fourier", "positional")
BACKBONES = ("unet", "adm")
KINDS = ("consistency", "denoiser")

# Limits a config must stay within: a checkpoint header is untrusted input, and the service warms every batch
# bucket up at the model's image size, so sizes are bounded before any network is built.
MAX_IMAGE_SIZE = 1024  # H = W; a megapixel, the service's whole per-request image budget (service/registry.py)
MAX_IMAGE_CHANNELS = 16  # grey, RGB, RGBA, latents
MAX_CHANNELS = 4096  # model_channels × each channel_mult, head_channels and num_groups
MAX_LEVELS = 8  # len(channel_mult), and at most this many attn_resolutions
MAX_RES_BLOCKS = 16  # num_res_blocks
MAX_CLASSES = 100_000  # num_classes
MAX_EMB_MULT = 16  # emb_mult
MAX_SIGMA = 1e4  # sigma_min, sigma_max, sigma_data (EDM uses 80)
MAX_RHO = 100.0
MAX_FOURIER_SCALE = 1e3  # NCSN++ used 16, iCT 0.02
MAX_AUGMENT_DIM = 64  # augment_dim; EDM's pipeline has 9 labels

INT_FIELDS: dict[str, tuple[int, int]] = {  # field -> inclusive range
    "image_channels": (1, MAX_IMAGE_CHANNELS),
    "image_size": (1, MAX_IMAGE_SIZE),
    "model_channels": (1, MAX_CHANNELS),
    "num_res_blocks": (1, MAX_RES_BLOCKS),
    "head_channels": (1, MAX_CHANNELS),
    "num_classes": (0, MAX_CLASSES),
    "emb_mult": (1, MAX_EMB_MULT),
    "num_groups": (1, MAX_CHANNELS),
    "augment_dim": (0, MAX_AUGMENT_DIM),
}
FLOAT_FIELDS: dict[str, tuple[float, bool, float, bool]] = {  # field -> (low, low allowed, high, high allowed)
    "dropout": (0.0, True, 1.0, False),
    "fourier_scale": (0.0, True, MAX_FOURIER_SCALE, True),
    "sigma_min": (0.0, False, MAX_SIGMA, True),
    "sigma_max": (0.0, False, MAX_SIGMA, True),
    "sigma_data": (0.0, False, MAX_SIGMA, True),
    "rho": (0.0, False, MAX_RHO, True),
}
TUPLE_FIELDS: dict[str, tuple[int, int, int]] = {  # field -> (least entries, most entries, largest value)
    "channel_mult": (1, MAX_LEVELS, MAX_CHANNELS),
    "attn_resolutions": (0, MAX_LEVELS, MAX_IMAGE_SIZE),
}
LATER_FIELDS: dict[str, Any] = {"augment_dim": 0, "kind": "consistency"}  # field -> its default (see to_dict)
CHOICE_FIELDS: dict[str, tuple[str, ...]] = {"backbone": BACKBONES, "embedding": EMBEDDINGS, "kind": KINDS}


class ConfigError(ValueError):
    """An invalid ModelConfig; each of `problems` begins with the field it is about."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid ModelConfig: " + "; ".join(problems))
        self.problems = problems


def is_int(value: Any) -> bool:
    """A JSON/Python integer: not a bool (True == 1), not a float (64.0 == 64)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite float, or an integer that converts to one."""
    return (is_int(value) and abs(value) < 2**63) or (isinstance(value, float) and math.isfinite(value))


def interval(low: float, low_ok: bool, high: float, high_ok: bool) -> str:
    return f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"


def field_problem(name: str, value: Any) -> str | None:
    """What is wrong with one field's value on its own (type and range), or None."""
    if name in INT_FIELDS:
        low, high = INT_FIELDS[name]
        if not is_int(value) or not low <= value <= high:
            return f"{name} must be an integer {low}…{high}, got {value!r}"
    elif name in FLOAT_FIELDS:
        low, low_ok, high, high_ok = FLOAT_FIELDS[name]
        inside = is_number(value) and (low < value or (low_ok and value == low))
        if not (inside and (value < high or (high_ok and value == high))):
            return f"{name} must be a finite number in {interval(low, low_ok, high, high_ok)}, got {value!r}"
    elif name in TUPLE_FIELDS:
        least, most, largest = TUPLE_FIELDS[name]
        good = isinstance(value, tuple) and least <= len(value) <= most
        if not good or not all(is_int(v) and 1 <= v <= largest for v in value):
            return f"{name} must be a list of {least}…{most} integers 1…{largest}, got {value!r}"
    elif name in CHOICE_FIELDS:
        if not isinstance(value, str) or value not in CHOICE_FIELDS[name]:
            return f"{name} must be one of {', '.join(map(repr, CHOICE_FIELDS[name]))}, not {value!r}"
    elif not isinstance(value, bool):  # scale_shift_norm
        return f"{name} must be true or false, got {value!r}"
    return None


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
    augment_dim: int = 0  # augmentation labels fed to the noise embedding (EDM: 9); 0 = none, as older checkpoints
    kind: Kind = "consistency"  # what wraps the backbone: f_θ (models/consistency.py) or EDM's D_θ (models/denoiser.py)

    def __post_init__(self) -> None:
        fields = dataclasses.fields(self)
        problems = [p for f in fields if (p := field_problem(f.name, getattr(self, f.name))) is not None]
        if not problems:  # the joint checks assume every field has its type and range
            problems = self.joint_problems()
        if problems:
            raise ConfigError(problems)

    def joint_problems(self) -> list[str]:
        """What is wrong with the fields together."""
        problems = []
        levels = len(self.channel_mult)
        if self.image_size % 2 ** (levels - 1):
            problems.append(f"image_size {self.image_size} is not divisible by 2^(levels-1) = {2 ** (levels - 1)} "
                            f"(channel_mult has {levels} levels, each after the first halves H and W)")
        widths = self.widths
        if max(widths) > MAX_CHANNELS:
            problems.append(f"channel_mult {list(self.channel_mult)} × model_channels {self.model_channels} gives "
                            f"widths {widths}; at most {MAX_CHANNELS}")
        if self.model_channels % 2:
            problems.append(f"model_channels must be even (the noise embedding is cos/sin pairs), got "
                            f"{self.model_channels}")
        if self.sigma_min >= self.sigma_max:
            problems.append(f"sigma_min {self.sigma_min} must be below sigma_max {self.sigma_max}")
        return problems + (self.adm_problems() if self.backbone == "adm" else self.unet_problems())

    def adm_problems(self) -> list[str]:
        """adm: positional embedding, attention widths in whole 64-channel heads, exactly num_groups groups."""
        problems = []
        if self.embedding != "positional":
            problems.append("embedding must be 'positional': the adm backbone needs embedding='positional' "
                            "(its checkpoints were trained with it)")
        attention = sorted({*self.attention_widths, self.widths[-1]})  # the middle block always has attention
        if any(w % self.head_channels for w in attention):
            problems.append(f"head_channels {self.head_channels}: adm attention widths {attention} must be "
                            "multiples of head_channels")
        if any(w % self.num_groups for w in self.widths):
            problems.append(f"num_groups {self.num_groups} must divide every level's width {self.widths} (adm "
                            "GroupNorms have exactly num_groups groups)")
        return problems

    def unet_problems(self) -> list[str]:
        """unet: scale/shift always, attention widths that split into equal heads."""
        problems = []
        if not self.scale_shift_norm:
            problems.append("scale_shift_norm=False needs backbone='adm' (the unet backbone always uses scale/shift)")
        for width in self.attention_widths:
            heads = max(1, width // self.head_channels)  # models/unet.py Attention
            if width % heads:
                problems.append(f"head_channels {self.head_channels} splits attention width {width} into {heads} "
                                "unequal heads; use a divisor of the width")
        return problems

    @property
    def widths(self) -> list[int]:
        """Channels at each level."""
        return [self.model_channels * m for m in self.channel_mult]

    @property
    def attention_widths(self) -> list[int]:
        """Channels at each level whose resolution has self-attention."""
        return [w for level, w in enumerate(self.widths) if self.image_size >> level in self.attn_resolutions]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_channels, self.image_size, self.image_size)

    @property
    def data_dim(self) -> int:
        return self.image_channels * self.image_size * self.image_size

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values; a field added since the first release is left out at its default, so that a
        file written now still loads in a cmserve that predates the field."""
        data = dataclasses.asdict(self)
        for key, default in LATER_FIELDS.items():
            if data[key] == default:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from `to_dict()` output (lists for tuples); unknown keys are an error naming the allowed ones."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError([f"{unknown[0]}: unknown model config keys {unknown}; allowed: {sorted(allowed)}"])
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
