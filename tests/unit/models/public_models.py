"""Stand-ins for the public consistency models: hub-shaped diffusers folders and OpenAI state dicts, random weights.

No weights can be downloaded here. The configs below are the hub's `unet/config.json` and
`scheduler/scheduler_config.json` of openai/diffusers-cd_imagenet64_l2 (CD and CT ImageNet-64 share the UNet)
and openai/diffusers-cd_bedroom256_lpips, as diffusers' scripts/convert_consistency_to_diffusers.py writes them;
`reduced` scales the block widths down for the default test run (same structure, same tensor names).
The OpenAI state dict is written with that repository's key names by inverting the conversion script's walk
(its own counters, not models/convert.py's), so the two converters are checked against each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

IMAGENET64_UNET: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.17.0.dev0",
    "act_fn": "silu",
    "add_attention": True,
    "attention_head_dim": 64,
    "attn_norm_num_groups": 32,
    "block_out_channels": [192, 384, 576, 768],
    "center_input_sample": False,
    "class_embed_type": None,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "downsample_padding": 1,
    "downsample_type": "resnet",
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 3,
    "layers_per_block": 3,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": 1000,
    "num_train_timesteps": None,
    "out_channels": 3,
    "resnet_time_scale_shift": "scale_shift",
    "sample_size": 64,
    "time_embedding_type": "positional",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "upsample_type": "resnet",
}

BEDROOM256_UNET: dict[str, Any] = {
    **IMAGENET64_UNET,
    "attn_norm_num_groups": None,
    "block_out_channels": [256, 256, 512, 512, 1024, 1024],
    "down_block_types": ["ResnetDownsampleBlock2D"] * 3 + ["AttnDownBlock2D"] * 3,
    "layers_per_block": 2,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "sample_size": 256,
    "up_block_types": ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"] * 3,
}


def scheduler_config(num_train_timesteps: int) -> dict[str, Any]:
    return {
        "_class_name": "CMStochasticIterativeScheduler",
        "_diffusers_version": "0.17.0.dev0",
        "clip_denoised": True,
        "num_train_timesteps": num_train_timesteps,
        "rho": 7.0,
        "s_noise": 1.0,
        "sigma_data": 0.5,
        "sigma_max": 80.0,
        "sigma_min": 0.002,
    }


# model id -> (hub UNet config, the scheduler's num_train_timesteps, the OpenAI flags preset)
MODELS: dict[str, tuple[dict[str, Any], int, str]] = {
    "cd_imagenet64_l2": (IMAGENET64_UNET, 40, "openai-imagenet64"),
    "ct_imagenet64": (IMAGENET64_UNET, 201, "openai-imagenet64"),
    "cd_bedroom256_lpips": (BEDROOM256_UNET, 40, "openai-lsun256"),
}


def reduced(unet: dict[str, Any], divisor: int, head_dim: int) -> dict[str, Any]:
    """The same UNet with every block width divided by `divisor` (still 32 norm groups, several heads)."""
    widths = [c // divisor for c in unet["block_out_channels"]]
    return {**unet, "block_out_channels": widths, "attention_head_dim": head_dim}


REDUCED = {  # the default test run: ImageNet-64 at 1/6 width (4-8 heads), bedroom-256 at 1/8 (4-8 heads)
    "cd_imagenet64_l2": reduced(IMAGENET64_UNET, 6, head_dim=16),
    "ct_imagenet64": reduced(IMAGENET64_UNET, 6, head_dim=16),
    "cd_bedroom256_lpips": reduced(BEDROOM256_UNET, 8, head_dim=16),
}


def openai_flags(unet: dict[str, Any]) -> str:
    """The launch-script model flags for a (possibly reduced) hub UNet config."""
    mc = unet["block_out_channels"][0]
    mult = ",".join(str(c // mc) for c in unet["block_out_channels"])
    return (
        f"--image_size {unet['sample_size']} --num_channels {mc} --channel_mult {mult} "
        f"--num_res_blocks {unet['layers_per_block']} --num_head_channels {unet['attention_head_dim']} "
        f"--attention_resolutions 32,16,8 --class_cond {unet['num_class_embeds'] is not None} "
        f"--use_scale_shift_norm {unet['resnet_time_scale_shift'] == 'scale_shift'} --resblock_updown True "
        "--dropout 0.0 --use_fp16 True --weight_schedule uniform"
    )


def diffusers_unet(unet: dict[str, Any], seed: int) -> torch.nn.Module:
    """diffusers' UNet2DModel for `unet` with seeded random weights (every parameter, zero-inits included)."""
    from diffusers import UNet2DModel

    model = UNet2DModel.from_config(unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / max(1, p[0].numel()) ** 0.5)
    return model.eval()


def write_hub_folder(folder: Path, unet_cfg: dict[str, Any], train_steps: int, model: torch.nn.Module,
                     weights: str = "safetensors") -> Path:
    """model_index.json, unet/{config.json, weights}, scheduler/scheduler_config.json, as on the hub."""
    from safetensors.torch import save_file

    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    index = {"_class_name": "ConsistencyModelPipeline", "_diffusers_version": "0.17.0.dev0",
             "scheduler": ["diffusers", "CMStochasticIterativeScheduler"], "unet": ["diffusers", "UNet2DModel"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "unet" / "config.json").write_text(json.dumps(unet_cfg, indent=2))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(train_steps), indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, folder / "unet" / "diffusion_pytorch_model.safetensors")
    else:
        torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    return folder


def _resnet(sd: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    parts = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    return {f"{old}.{o}.{p}": sd[f"{new}.{n}.{p}"] for o, n in parts.items() for p in ("weight", "bias")
            if f"{new}.{n}.{p}" in sd}


def _attention(sd: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    out = {f"{old}.norm.{p}": sd[f"{new}.group_norm.{p}"] for p in ("weight", "bias")}
    qkv_w = torch.cat([sd[f"{new}.to_{x}.weight"] for x in "qkv"])  # the script chunks qkv in three: q, k, v
    out[f"{old}.qkv.weight"] = qkv_w[:, :, None, None]  # cm/unet.py: conv_nd(2, C, 3C, 1)
    out[f"{old}.qkv.bias"] = torch.cat([sd[f"{new}.to_{x}.bias"] for x in "qkv"])
    out[f"{old}.proj_out.weight"] = sd[f"{new}.to_out.0.weight"][:, :, None, None]
    out[f"{old}.proj_out.bias"] = sd[f"{new}.to_out.0.bias"]
    return out


def openai_state_dict(model: torch.nn.Module, unet: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The same weights under cm/unet.py's names: diffusers' conversion script run backwards."""
    sd = dict(model.state_dict())
    plain = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    out = {f"{old}.{p}": sd[f"{new}.{p}"] for old, new in plain.items() for p in ("weight", "bias")}
    if unet["num_class_embeds"] is not None:
        out["label_emb.weight"] = sd["class_embedding.weight"]
    layers, down = unet["layers_per_block"], unet["down_block_types"]
    current = 1
    for i, kind in enumerate(down):
        for j in range(layers):
            out |= _resnet(sd, f"input_blocks.{current}.0", f"down_blocks.{i}.resnets.{j}")
            if kind == "AttnDownBlock2D":
                out |= _attention(sd, f"input_blocks.{current}.1", f"down_blocks.{i}.attentions.{j}")
            current += 1
        if i != len(down) - 1:
            out |= _resnet(sd, f"input_blocks.{current}.0", f"down_blocks.{i}.downsamplers.0")
            current += 1
    out |= _resnet(sd, "middle_block.0", "mid_block.resnets.0")
    out |= _attention(sd, "middle_block.1", "mid_block.attentions.0")
    out |= _resnet(sd, "middle_block.2", "mid_block.resnets.1")
    current = 0
    for i, kind in enumerate(unet["up_block_types"]):
        attn = kind == "AttnUpBlock2D"
        for j in range(layers + 1):
            out |= _resnet(sd, f"output_blocks.{current}.0", f"up_blocks.{i}.resnets.{j}")
            if attn:
                out |= _attention(sd, f"output_blocks.{current}.1", f"up_blocks.{i}.attentions.{j}")
            current += 1
        if i != len(down) - 1:
            out |= _resnet(sd, f"output_blocks.{current - 1}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0")
    assert sum(t.numel() for t in out.values()) == sum(t.numel() for t in sd.values())
    return {k: v.clone() for k, v in out.items()}


def pipeline(model: torch.nn.Module, train_steps: int) -> Any:
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    scheduler = CMStochasticIterativeScheduler(**{k: v for k, v in scheduler_config(train_steps).items()
                                                  if not k.startswith("_")})
    pipe = ConsistencyModelPipeline(unet=model, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def karras_indices(steps: int, train_steps: int, two_step: int) -> list[int]:
    """The pipeline's `timesteps` (descending Karras indices) for our 1-, 2- and 4-step schedules."""
    if steps == 1:
        return [0]
    if steps == 2:
        return [two_step, 0]
    ratio = train_steps // steps  # what the pipeline itself does for num_inference_steps
    return [i * ratio for i in reversed(range(steps))]


def reference_sample(pipe: Any, x_T: torch.Tensor, timesteps: list[int], labels: torch.Tensor | None,
                     seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """diffusers' pipeline output in [-1, 1], and the per-step noise it drew (to feed ours the same)."""
    gen = torch.Generator().manual_seed(seed)
    replay = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x_T.shape, generator=replay) for _ in timesteps]  # one draw after every step
    out = pipe(batch_size=x_T.shape[0], class_labels=labels, timesteps=timesteps, generator=gen,
               latents=x_T / pipe.scheduler.init_noise_sigma, output_type="pt").images
    if len(timesteps) == 1:
        noises = []
    return out * 2 - 1, noises
