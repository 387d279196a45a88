"""Convert the public consistency models (openai/consistency_models) into our checkpoint format.

Two sources: a diffusers pipeline folder (`model_index.json`, `unet/config.json` of a UNet2DModel with its
weights, `scheduler/scheduler_config.json` of a CMStochasticIterativeScheduler), or an original OpenAI state
dict (`.pt`) with the model flags of that repository's launch script. Both become the `adm` backbone
(models/adm.py), whose tensor names are OpenAI's. Pickled files (`.bin`, `.pt`) are read only here, only with
`torch.load(..., weights_only=True)`, and only when they hold a flat dict of tensors; the service reads
safetensors alone (`load_folder` refuses a pickled folder). diffusers itself is never imported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shlex
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from .checkpoint import CheckpointError, CheckpointMeta, LoadedCheckpoint, save
from .config import ModelConfig
from .consistency import ConsistencyModel
from .sampling import karras_sigmas

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
PIPELINE_CLASS = "ConsistencyModelPipeline"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASS = "CMStochasticIterativeScheduler"
DOWN_TYPES = {"ResnetDownsampleBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
UP_TYPES = {"ResnetUpsampleBlock2D": False, "AttnUpBlock2D": True}

# The two-step samplers of openai/consistency_models scripts/launch.sh: `--ts 0,i,N-1 --steps N`. Step j runs
# at Karras index ts[j] of an N-point grid from σ_max (index 0) down to σ_min (index N-1), so the two sigmas
# are σ_0 = σ_max and σ_i; see `karras_index_sigma`. Model id -> (N, i).
LAUNCH_TWO_STEP: dict[str, tuple[int, int]] = {
    "cd_imagenet64_l2": (40, 22),
    "cd_imagenet64_lpips": (40, 22),
    "ct_imagenet64": (201, 106),
    "cd_bedroom256_l2": (40, 18),
    "cd_bedroom256_lpips": (40, 17),
    "ct_bedroom256": (151, 67),
    "ct_cat256": (151, 62),
}

# The model flags of scripts/launch.sh for the released checkpoints (sampling-only flags left out).
OPENAI_PRESETS: dict[str, str] = {
    "openai-imagenet64": "--attention_resolutions 32,16,8 --class_cond True --use_scale_shift_norm True "
    "--dropout 0.0 --image_size 64 --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
    "--resblock_updown True",
    "openai-lsun256": "--attention_resolutions 32,16,8 --class_cond False --use_scale_shift_norm False "
    "--dropout 0.0 --image_size 256 --num_channels 256 --num_head_channels 64 --num_res_blocks 2 "
    "--resblock_updown True",
}
OPENAI_CHANNEL_MULT = {64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}  # cm/script_util.py
OPENAI_NUM_CLASSES = 1000


class ConvertError(CheckpointError):
    """A source that cannot be converted; the one-line message names the file, the field or tensor, and why."""


@dataclass
class Converted:
    """A converted model and everything our checkpoint header records about it."""

    model: ConsistencyModel
    model_id: str | None
    schedules: dict[int, list[float]]
    provenance: dict[str, Any]
    class_names: list[str] | None = None

    def save(self, out: str | os.PathLike[str]) -> Path:
        return save(
            out,
            self.model,
            preset=self.model_id,
            class_names=self.class_names,
            schedules=self.schedules,
            provenance=self.provenance,
        )


# ---------------------------------------------------------------------------------------------- schedules


def karras_index_sigma(i: int, n: int, sigma_min: float, sigma_max: float, rho: float) -> float:
    """σ at Karras index i of n, index 0 = σ_max (CM `karras_diffusion.py` sampler `ts`; EDM eq. 5)."""
    return float(karras_sigmas(n, sigma_min, sigma_max, rho).flip(0)[i])


def recommended_schedules(model_id: str | None, cfg: ModelConfig) -> dict[int, list[float]]:
    """One step at σ_max; two steps at the launch script's Karras indices where the model is known."""
    schedules = {1: [cfg.sigma_max]}
    if model_id in LAUNCH_TWO_STEP:
        n, i = LAUNCH_TWO_STEP[model_id]
        schedules[2] = [cfg.sigma_max, karras_index_sigma(i, n, cfg.sigma_min, cfg.sigma_max, cfg.rho)]
    return schedules


def guess_model_id(name: str, image_size: int | None = None, train_steps: int | None = None) -> str | None:
    """The released model a file or folder name stands for (`cd_imagenet64_l2.pt`, `diffusers-ct_bedroom256`)."""
    lowered = name.lower().replace("-", "_")
    for model_id in sorted(LAUNCH_TWO_STEP, key=len, reverse=True):
        if model_id in lowered:
            return model_id
    # Unnamed folders: ImageNet-64 is unambiguous by its scheduler's N (both CD losses share ts 0,22,39).
    by_shape = {(64, 40): "cd_imagenet64_l2", (64, 201): "ct_imagenet64"}
    return by_shape.get((image_size or 0, train_steps or 0))


def train_steps_of(model_id: str | None) -> int | None:
    return LAUNCH_TWO_STEP[model_id][0] if model_id in LAUNCH_TWO_STEP else None


# ---------------------------------------------------------------------------------------------- reading files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: not readable JSON ({first_line(e)})") from None
    if not isinstance(doc, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return doc


def read_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `torch.save`d flat dict of tensors, read with weights_only=True; anything more is refused."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise ConvertError(
            f"{path}: not a plain state dict of tensors (torch.load weights_only: {first_line(e)})"
        ) from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: holds a {type(obj).__name__}, not a state dict (a dict of tensors)")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ConvertError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; a state dict holds tensors only"
            )
    return obj


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise ConvertError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


# ---------------------------------------------------------------------------------------------- key names

RESNET_PARTS = {  # ADM ResBlock module -> diffusers ResnetBlock2D module
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def module_pairs(cfg: ModelConfig) -> Iterator[tuple[str, str, str]]:
    """(ADM module, diffusers module, kind) for every module with weights, walking both UNets in step."""
    yield "time_embed.0", "time_embedding.linear_1", "plain"
    yield "time_embed.2", "time_embedding.linear_2", "plain"
    yield "label_emb", "class_embedding", "plain"
    yield "input_blocks.0.0", "conv_in", "plain"
    levels = len(cfg.channel_mult)
    index = 1
    for level in range(levels):
        attention = (cfg.image_size >> level) in cfg.attn_resolutions
        for j in range(cfg.num_res_blocks):
            yield f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resnet"
            if attention:
                yield f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", "attention"
            index += 1
        if level != levels - 1:
            yield f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0", "resnet"
            index += 1
    yield "middle_block.0", "mid_block.resnets.0", "resnet"
    yield "middle_block.1", "mid_block.attentions.0", "attention"
    yield "middle_block.2", "mid_block.resnets.1", "resnet"
    index = 0
    for up, level in enumerate(reversed(range(levels))):
        attention = (cfg.image_size >> level) in cfg.attn_resolutions
        for j in range(cfg.num_res_blocks + 1):
            yield f"output_blocks.{index}.0", f"up_blocks.{up}.resnets.{j}", "resnet"
            if attention:
                yield f"output_blocks.{index}.1", f"up_blocks.{up}.attentions.{j}", "attention"
            index += 1
        if level:
            yield f"output_blocks.{index - 1}.{2 if attention else 1}", f"up_blocks.{up}.upsamplers.0", "resnet"
    yield "out.0", "conv_norm_out", "plain"
    yield "out.2", "conv_out", "plain"


def diffusers_to_adm(tensors: dict[str, torch.Tensor], cfg: ModelConfig, name: str) -> dict[str, torch.Tensor]:
    """Rename (and, for attention, stack q, k, v into one (3C, C, 1, 1) qkv) a UNet2DModel state dict."""
    expected = adm_state_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str, target: str) -> torch.Tensor:
        if key not in tensors:
            raise ConvertError(f"{name}: no tensor {key!r} (needed for {target!r}); does the config describe it?")
        used.add(key)
        return tensors[key]

    for adm, dif, kind in module_pairs(cfg):
        for param in ("weight", "bias"):
            if kind == "resnet":
                for a_part, d_part in RESNET_PARTS.items():
                    target = f"{adm}.{a_part}.{param}"
                    if target in expected:
                        out[target] = take(f"{dif}.{d_part}.{param}", target)
            elif kind == "attention":
                if f"{adm}.norm.{param}" in expected:
                    out[f"{adm}.norm.{param}"] = take(f"{dif}.group_norm.{param}", f"{adm}.norm.{param}")
                qkv = [take(f"{dif}.to_{p}.{param}", f"{adm}.qkv.{param}") for p in "qkv"]
                try:  # (three, heads, channels) row order: q rows, then k rows, then v rows
                    out[f"{adm}.qkv.{param}"] = torch.cat(qkv).reshape(expected[f"{adm}.qkv.{param}"])
                except RuntimeError:
                    shapes = [tuple(t.shape) for t in qkv]
                    raise ConvertError(f"{name}: {dif}.to_q/k/v.{param} have shapes {shapes}, which do not make "
                                       f"{adm}.qkv.{param} of shape {tuple(expected[f'{adm}.qkv.{param}'])}") from None
                proj = take(f"{dif}.to_out.0.{param}", f"{adm}.proj_out.{param}")
                out[f"{adm}.proj_out.{param}"] = proj.reshape(*proj.shape, 1, 1) if param == "weight" else proj
            elif f"{adm}.{param}" in expected:
                out[f"{adm}.{param}"] = take(f"{dif}.{param}", f"{adm}.{param}")
    extra = [k for k in tensors if k not in used]
    if extra:
        raise ConvertError(f"{name}: unexpected tensor {extra[0]!r} ({len(extra)} in all) for this config")
    return out


def adm_state_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Tensor name -> shape of the ADM backbone for `cfg`, without allocating."""
    with torch.device("meta"):
        backbone = ConsistencyModel.from_config(cfg).backbone
    return {k: v.shape for k, v in backbone.state_dict().items()}


def check_state_dict(tensors: dict[str, torch.Tensor], cfg: ModelConfig, name: str) -> None:
    """Same names and shapes as the ADM backbone of `cfg`; the message names the first mismatch."""
    expected = adm_state_shapes(cfg)
    for key, shape in expected.items():
        if key not in tensors:
            raise ConvertError(f"{name}: missing tensor {key!r} (shape {tuple(shape)}) of this model")
        if tensors[key].shape != shape:
            got = tuple(tensors[key].shape)
            raise ConvertError(f"{name}: tensor {key!r} has shape {got}, the model needs {tuple(shape)}")
    extra = [k for k in tensors if k not in expected]
    if extra:
        raise ConvertError(f"{name}: unexpected tensor {extra[0]!r} ({len(extra)} in all) for this model")
    bad = next((k for k, t in tensors.items() if not t.is_floating_point() or not torch.isfinite(t).all()), None)
    if bad is not None:
        raise ConvertError(f"{name}: tensor {bad!r} is not finite floating point")


def build_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], name: str) -> ConsistencyModel:
    check_state_dict(tensors, cfg, name)
    model = ConsistencyModel.from_config(cfg)
    model.backbone.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- diffusers


def config_from_diffusers(unet: dict[str, Any], scheduler: dict[str, Any], name: str) -> ModelConfig:
    """The ModelConfig of a UNet2DModel config.json + CMStochasticIterativeScheduler config; refuses what differs."""
    if unet.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise ConvertError(f"{name}: unet _class_name {unet['_class_name']!r} is not supported; only {UNET_CLASS}")
    required = {  # key -> the one value the ADM backbone computes (missing keys take diffusers' default)
        "center_input_sample": (False, False),
        "time_embedding_type": ("positional", "positional"),
        "flip_sin_to_cos": (True, True),
        "freq_shift": (0, 0),
        "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
        "mid_block_scale_factor": (1, 1),
        "downsample_type": ("conv", "resnet"),
        "upsample_type": ("conv", "resnet"),
        "act_fn": ("silu", "silu"),
        "norm_eps": (1e-5, 1e-5),
        "add_attention": (True, True),
        "class_embed_type": (None, None),
    }
    for key, (default, needed) in required.items():
        if unet.get(key, default) != needed:
            value = unet.get(key, default)
            raise ConvertError(f"{name}: {key} = {value!r} is not supported; the ADM backbone needs {needed!r}")
    down, up = list(unet.get("down_block_types", [])), list(unet.get("up_block_types", []))
    for key, types, allowed in (("down_block_types", down, DOWN_TYPES), ("up_block_types", up, UP_TYPES)):
        for i, block in enumerate(types):
            if block not in allowed:
                raise ConvertError(f"{name}: {key}[{i}] = {block!r} is not supported; supported: {sorted(allowed)}")
    if not down or [DOWN_TYPES[b] for b in down] != [UP_TYPES[b] for b in reversed(up)]:
        raise ConvertError(f"{name}: up_block_types {up} do not mirror down_block_types {down}")
    channels = [int(c) for c in unet.get("block_out_channels", [])]
    if len(channels) != len(down) or any(c % channels[0] for c in channels):
        raise ConvertError(f"{name}: block_out_channels {channels} must be multiples of the first, one per down block")
    mc = channels[0]
    if unet.get("time_embedding_dim") not in (None, 4 * mc):
        raise ConvertError(f"{name}: time_embedding_dim {unet['time_embedding_dim']} is not supported; need 4 × {mc}")
    groups = int(unet.get("norm_num_groups", 32))
    attn_groups = unet.get("attn_norm_num_groups")
    shift = unet.get("resnet_time_scale_shift", "default")
    if shift not in ("default", "scale_shift"):
        raise ConvertError(f"{name}: resnet_time_scale_shift {shift!r} is not supported; use default or scale_shift")
    if (attn_groups if attn_groups is not None else (groups if shift == "default" else None)) != groups:
        raise ConvertError(f"{name}: attn_norm_num_groups {attn_groups!r}: the mid-block attention needs a GroupNorm "
                           f"of norm_num_groups ({groups}) groups")
    in_ch, out_ch = int(unet.get("in_channels", 3)), int(unet.get("out_channels", 3))
    if in_ch != out_ch:
        raise ConvertError(f"{name}: out_channels {out_ch} != in_channels {in_ch}; learned variance is not supported")
    size = unet.get("sample_size")
    if not isinstance(size, int):
        raise ConvertError(f"{name}: sample_size {size!r} must be one integer (square images)")
    if scheduler.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
        found = scheduler["_class_name"]
        raise ConvertError(f"{name}: scheduler _class_name {found!r} is not supported; only {SCHEDULER_CLASS}")
    if scheduler.get("s_noise", 1.0) != 1.0 or scheduler.get("clip_denoised", True) is not True:
        raise ConvertError(f"{name}: scheduler s_noise must be 1.0 and clip_denoised true (CM Algorithm 1)")
    try:
        return ModelConfig(
            backbone="adm",
            image_channels=in_ch,
            image_size=size,
            model_channels=mc,
            channel_mult=tuple(c // mc for c in channels),
            num_res_blocks=int(unet.get("layers_per_block", 2)),
            attn_resolutions=tuple(size >> i for i, b in enumerate(down) if DOWN_TYPES[b]),
            head_channels=int(unet.get("attention_head_dim") or 8),
            dropout=float(unet.get("dropout", 0.0)),
            embedding="positional",
            num_classes=int(unet.get("num_class_embeds") or 0),
            emb_mult=4,
            num_groups=groups,
            scale_shift_norm=shift == "scale_shift",
            sigma_min=float(scheduler.get("sigma_min", 0.002)),
            sigma_max=float(scheduler.get("sigma_max", 80.0)),
            sigma_data=float(scheduler.get("sigma_data", 0.5)),
            rho=float(scheduler.get("rho", 7.0)),
        )
    except (TypeError, ValueError) as e:
        raise ConvertError(f"{name}: {first_line(e)}") from None


def folder_weights(folder: Path, allow_pickle: bool) -> Path:
    unet = folder / "unet"
    if not unet.is_dir():
        raise ConvertError(f"{folder}: no unet/ folder; a diffusers pipeline holds model_index.json, unet/, scheduler/")
    for fname in WEIGHT_FILES if allow_pickle else WEIGHT_FILES[:1]:
        if (unet / fname).is_file():
            return unet / fname
    if not allow_pickle and (unet / WEIGHT_FILES[1]).is_file():
        raise ConvertError(f"{unet / WEIGHT_FILES[1]}: pickled weights are not served; convert the folder first "
                           "(python -m models convert FOLDER --out FILE.safetensors)")
    raise ConvertError(f"{unet}: no {' or '.join(WEIGHT_FILES)}")


def convert_folder(folder: Path, model_id: str | None = None, allow_pickle: bool = True) -> Converted:
    """A diffusers ConsistencyModelPipeline folder (as on the hub) -> our model, schedules and provenance."""
    index = read_json(folder / "model_index.json")
    if index.get("_class_name", PIPELINE_CLASS) != PIPELINE_CLASS:
        raise ConvertError(f"{folder / 'model_index.json'}: pipeline {index['_class_name']!r} is not {PIPELINE_CLASS}")
    weights = folder_weights(folder, allow_pickle)
    unet_cfg = read_json(folder / "unet" / "config.json")
    sched_cfg = read_json(folder / "scheduler" / "scheduler_config.json")
    cfg = config_from_diffusers(unet_cfg, sched_cfg, str(folder / "unet" / "config.json"))
    tensors = read_safetensors(weights) if weights.suffix == ".safetensors" else read_pickled_state_dict(weights)
    model = build_model(cfg, diffusers_to_adm(tensors, cfg, str(weights)), str(weights))
    train_steps = sched_cfg.get("num_train_timesteps")
    model_id = model_id or guess_model_id(folder.resolve().name, cfg.image_size, train_steps)
    provenance = {
        "source": "diffusers",
        "path": str(folder),
        "weights": str(weights.relative_to(folder)),
        "sha256": sha256_file(weights),
        "model_id": model_id,
        "num_train_timesteps": train_steps,
        "unet_config_sha256": sha256_file(folder / "unet" / "config.json"),
        "scheduler_config_sha256": sha256_file(folder / "scheduler" / "scheduler_config.json"),
    }
    return Converted(model, model_id, recommended_schedules(model_id, cfg), provenance)


# ---------------------------------------------------------------------------------------------- OpenAI


def str2bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "t", "y"):
        return True
    if lowered in ("false", "0", "no", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not a boolean (True/False)")


class FlagParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        raise ConvertError(f"OpenAI flags: {message}")


def config_from_openai_flags(flags: str) -> ModelConfig:
    """The ModelConfig of cm/script_util.py create_model() for the launch script's model flags."""
    p = FlagParser(add_help=False)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--num_channels", type=int, default=128)
    p.add_argument("--num_res_blocks", type=int, default=2)
    p.add_argument("--channel_mult", default="")
    p.add_argument("--attention_resolutions", default="32,16,8")
    p.add_argument("--num_head_channels", type=int, default=-1)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--class_cond", type=str2bool, default=False)
    p.add_argument("--use_scale_shift_norm", type=str2bool, default=True)
    p.add_argument("--resblock_updown", type=str2bool, default=False)
    p.add_argument("--learn_sigma", type=str2bool, default=False)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sigma_min", type=float, default=0.002)
    p.add_argument("--sigma_max", type=float, default=80.0)
    args, _sampling_flags = p.parse_known_args(shlex.split(flags))  # --use_fp16, --sampler, … do not shape weights
    if args.num_head_channels <= 0:
        raise ConvertError("OpenAI flags: --num_head_channels must be set (the released models use 64); a fixed "
                           "--num_heads is not supported")
    if not args.resblock_updown:
        raise ConvertError("OpenAI flags: --resblock_updown False is not supported (the released models use True)")
    if args.learn_sigma:
        raise ConvertError("OpenAI flags: --learn_sigma True is not supported (consistency models predict no variance)")
    if args.channel_mult:
        mult = tuple(int(m) for m in args.channel_mult.split(","))
    elif args.image_size in OPENAI_CHANNEL_MULT:
        mult = OPENAI_CHANNEL_MULT[args.image_size]
    else:
        raise ConvertError(f"OpenAI flags: no channel_mult default for --image_size {args.image_size}; add one")
    try:
        return ModelConfig(
            backbone="adm",
            image_channels=3,
            image_size=args.image_size,
            model_channels=args.num_channels,
            channel_mult=mult,
            num_res_blocks=args.num_res_blocks,
            attn_resolutions=tuple(int(r) for r in args.attention_resolutions.split(",") if r),
            head_channels=args.num_head_channels,
            dropout=args.dropout,
            embedding="positional",
            num_classes=OPENAI_NUM_CLASSES if args.class_cond else 0,
            emb_mult=4,
            num_groups=32,  # cm/nn.py normalization(): always 32 groups
            scale_shift_norm=args.use_scale_shift_norm,
            sigma_min=args.sigma_min,
            sigma_max=args.sigma_max,
        )
    except ValueError as e:
        raise ConvertError(f"OpenAI flags: {first_line(e)}") from None


def convert_openai(path: Path, flags: str, model_id: str | None = None, preset: str | None = None) -> Converted:
    """An original OpenAI state dict (`torch.save(model.state_dict())`) with its launch-script model flags."""
    cfg = config_from_openai_flags(flags)
    tensors = read_pickled_state_dict(path)
    model = build_model(cfg, tensors, str(path))
    model_id = model_id or guess_model_id(path.name)
    provenance = {
        "source": "openai",
        "path": str(path),
        "sha256": sha256_file(path),
        "model_id": model_id,
        "num_train_timesteps": train_steps_of(model_id),
        "flags": preset or flags,
    }
    return Converted(model, model_id, recommended_schedules(model_id, cfg), provenance)


# ---------------------------------------------------------------------------------------------- entry points


def read_class_names(path: Path, num_classes: int) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"--class-names {path}: not readable ({first_line(e)})") from None
    if len(names) != num_classes:
        raise ConvertError(f"--class-names {path}: {len(names)} names for a model with {num_classes} classes")
    if len(set(names)) != len(names):
        raise ConvertError(f"--class-names {path}: names must be unique")
    return names


def convert(
    src: str | os.PathLike[str],
    *,
    preset: str | None = None,
    flags: str | None = None,
    model_id: str | None = None,
    class_names: str | os.PathLike[str] | None = None,
) -> Converted:
    """Convert a diffusers folder, or an OpenAI `.pt` with `preset` or `flags`."""
    src = Path(src)
    if "edm_" in src.name.lower():
        raise ConvertError(f"{src}: an EDM teacher (edm_*), not a consistency model: it needs an ODE solver")
    if model_id is not None and model_id not in LAUNCH_TWO_STEP:
        raise ConvertError(f"--model-id {model_id!r} is not one of {sorted(LAUNCH_TWO_STEP)}")
    if src.is_dir():
        if preset or flags:
            raise ConvertError(f"{src}: a diffusers folder carries its own config; drop --preset/--flags")
        converted = convert_folder(src, model_id)
    elif src.is_file():
        if bool(preset) == bool(flags):
            choices = ", ".join(OPENAI_PRESETS)
            raise ConvertError(f"{src}: an OpenAI state dict needs exactly one of --preset ({choices}) or --flags")
        if preset is not None and preset not in OPENAI_PRESETS:
            raise ConvertError(f"--preset {preset!r} is not one of {sorted(OPENAI_PRESETS)}")
        converted = convert_openai(src, OPENAI_PRESETS[preset] if preset else str(flags), model_id, preset)
    else:
        raise ConvertError(f"{src}: no such file or folder")
    if class_names is not None:
        if not converted.model.cfg.num_classes:
            raise ConvertError(f"--class-names: {src} is unconditional")
        converted.class_names = read_class_names(Path(class_names), converted.model.cfg.num_classes)
    return converted


def load_folder(folder: str | os.PathLike[str], device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> LoadedCheckpoint:
    """Serve a diffusers folder whose weights are safetensors directly: converted in memory, never unpickled."""
    folder = Path(folder)
    converted = convert_folder(folder, allow_pickle=False)
    meta = CheckpointMeta(
        config=converted.model.cfg,
        preset=converted.model_id,
        schedules=converted.schedules,
        provenance=converted.provenance,
    )
    model = converted.model.to(device=device, dtype=dtype)
    return LoadedCheckpoint(model=model, meta=meta, path=folder, sha256=converted.provenance["sha256"])
