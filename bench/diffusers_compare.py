"""Our sampler against diffusers' ConsistencyModelPipeline on the same public-model network, card and run.

    python -m bench.diffusers_compare --model imagenet64 --device cuda --dtype bf16 --steps 1,2 \\
        --batches 1,16,64,128,256 --json artifacts/gpu/diffusers_compare_imagenet64_bf16.json
    python -m bench.diffusers_compare --model imagenet64 --width-divisor 6 --batches 1,4   # a quick CPU run

No weights are downloaded: diffusers' UNet2DModel is built from the hub model's config (the OpenAI launch
flags of `--model`, see models/convert.py) with seeded random weights (the cost per image is the same), saved
as a hub-shaped pipeline folder and converted with models.convert, exactly as `python -m models convert` does.
Both sides then run 1- and 2-step sampling (launch-script schedules) in `--dtype` on `--device`: ours is
models.sampling.multistep_sample on the converted ConsistencyModel (noise drawn on the device, as the pipeline
does), theirs the pipeline with `timesteps` = the same Karras indices. Each batch size is timed as the best of
a few rounds; the table ends with each side's best batch. `--check` first compares f(x, σ) of both in fp32.
`--save-checkpoint FILE` keeps the converted checkpoint (e.g. to serve it: CM_MODELS=imagenet64=FILE).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

from models.config import ModelConfig
from models.consistency import ConsistencyModel
from models.convert import LAUNCH_TWO_STEP, OPENAI_PRESETS, Converted, config_from_openai_flags, convert
from models.sampling import multistep_sample

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = {  # --model -> (OpenAI flags preset, released model whose schedule is used)
    "imagenet64": ("openai-imagenet64", "cd_imagenet64_l2"),
    "bedroom256": ("openai-lsun256", "cd_bedroom256_lpips"),
}


def diffusers_unet_config(cfg: ModelConfig) -> dict[str, Any]:
    """The UNet2DModel config.json of an ADM ModelConfig (what diffusers' conversion script writes)."""
    attn = [(cfg.image_size >> level) in cfg.attn_resolutions for level in range(len(cfg.channel_mult))]
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.image_channels,
        "out_channels": cfg.image_channels,
        "layers_per_block": cfg.num_res_blocks,
        "num_class_embeds": cfg.num_classes or None,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "attention_head_dim": cfg.head_channels,
        "down_block_types": ["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)],
        "resnet_time_scale_shift": "scale_shift" if cfg.scale_shift_norm else "default",
        "attn_norm_num_groups": cfg.num_groups if cfg.scale_shift_norm else None,
        "norm_num_groups": cfg.num_groups,
        "upsample_type": "resnet",
        "downsample_type": "resnet",
    }


def build(model: str, divisor: int, folder: Path) -> tuple[ConsistencyModelPipeline, ConsistencyModel, str]:
    """diffusers' pipeline with seeded random weights, its hub folder, and our conversion of that folder."""
    preset, model_id = MODELS[model]
    cfg = config_from_openai_flags(OPENAI_PRESETS[preset])
    if divisor > 1:
        cfg = cfg.replace(model_channels=cfg.model_channels // divisor, head_channels=16)
    torch.manual_seed(0)
    unet = UNet2DModel.from_config(diffusers_unet_config(cfg)).eval()
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=LAUNCH_TWO_STEP[model_id][0])
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / f"diffusers-{model_id}", safe_serialization=True)
    ours = convert(folder / f"diffusers-{model_id}").model
    return pipe, ours, model_id


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_images_per_s(fn: Callable[[], object], batch: int, device: torch.device, rounds: int) -> float:
    fn()  # warm-up (cuDNN algorithm choice, allocator)
    sync(device)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return batch / best


@torch.no_grad()
def check(pipe: ConsistencyModelPipeline, ours: ConsistencyModel, device: torch.device) -> float:
    """max |f_ours − f_pipeline| over 5 σ, fp32 on `device`."""
    sched, cfg = pipe.scheduler, ours.cfg
    sigma = torch.tensor([80.0, 20.0, 1.3824, 0.1, 0.002], device=device)
    x = torch.randn(5, *cfg.image_shape, device=device) * sigma.reshape(-1, 1, 1, 1)
    labels = torch.arange(5, device=device) if cfg.num_classes else None
    c_skip, c_out = (c.reshape(-1, 1, 1, 1) for c in sched.get_scalings_for_boundary_condition(sigma))
    c_in = 1 / (sigma**2 + cfg.sigma_data**2).sqrt().reshape(-1, 1, 1, 1)
    t = torch.from_numpy(sched.sigma_to_t(sigma.cpu().double().numpy())).to(device)
    ref = c_skip * x + c_out * pipe.unet(c_in * x, t, class_labels=labels).sample
    return float((ref - ours(x, sigma, labels)).abs().max())


def timesteps_for(steps: int, model_id: str) -> list[int]:
    if steps == 1:
        return [0]
    if steps == 2:
        return [LAUNCH_TWO_STEP[model_id][1], 0]
    raise ValueError(f"--steps: 1 or 2 (the launch script's schedules), got {steps}")


@torch.no_grad()
def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.dtype != "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        pipe, ours, model_id = build(args.model, args.width_divisor, Path(tmp))
        if args.save_checkpoint:
            Converted(ours, model_id, {}, {"source": "bench.diffusers_compare (random weights)"}).save(
                args.save_checkpoint)
    pipe.to(device)
    ours.to(device)
    if args.check:
        print(f"max |f_ours - f_diffusers| over 5 sigmas, fp32 on {device}: {check(pipe, ours, device):.2e}")
    pipe.unet.to(dtype)
    ours.to(dtype)
    cfg, rows = ours.cfg, []
    for steps in args.steps:
        timesteps = timesteps_for(steps, model_id)
        pipe.scheduler.set_timesteps(timesteps=timesteps)
        sigmas = [float(s) for s in pipe.scheduler.sigmas[:steps]]
        for batch in args.batches:
            labels = torch.randint(cfg.num_classes, (batch,), device=device) if cfg.num_classes else None

            def ours_fn(batch: int = batch, labels: torch.Tensor | None = labels, sigmas: list[float] = sigmas
                        ) -> torch.Tensor:
                noise = torch.randn(len(sigmas), batch, *cfg.image_shape, device=device, dtype=dtype)
                return multistep_sample(ours, sigmas[0] * noise[0], sigmas, list(noise[1:]), labels)

            def theirs_fn(batch: int = batch, labels: torch.Tensor | None = labels, timesteps: list[int] = timesteps
                          ) -> torch.Tensor:
                return pipe(batch_size=batch, class_labels=labels, timesteps=timesteps, output_type="pt").images

            row = {"model": args.model, "width_divisor": args.width_divisor, "device": str(device),
                   "dtype": args.dtype, "steps": steps, "batch": batch,
                   "ours_images_per_s": best_images_per_s(ours_fn, batch, device, args.rounds),
                   "diffusers_images_per_s": best_images_per_s(theirs_fn, batch, device, args.rounds)}
            rows.append(row)
            print(f"{steps} step(s) batch {batch:4d}: ours {row['ours_images_per_s']:9.1f} img/s   "
                  f"diffusers {row['diffusers_images_per_s']:9.1f} img/s   "
                  f"×{row['ours_images_per_s'] / row['diffusers_images_per_s']:.2f}", flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for steps in sorted({r["steps"] for r in rows}):
        mine = [r for r in rows if r["steps"] == steps]
        ours = max(mine, key=lambda r: r["ours_images_per_s"])
        theirs = max(mine, key=lambda r: r["diffusers_images_per_s"])
        lines.append(f"{steps} step(s), best batch: ours {ours['ours_images_per_s']:.1f} img/s "
                     f"(batch {ours['batch']}), diffusers {theirs['diffusers_images_per_s']:.1f} img/s "
                     f"(batch {theirs['batch']})")
    return lines


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="imagenet64")
    parser.add_argument("--width-divisor", type=int, default=1, help="divide the block widths (quick CPU runs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--steps", type=int_list, default=[1, 2])
    parser.add_argument("--batches", type=int_list, default=[1, 16, 64, 128, 256])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per batch size (best kept)")
    parser.add_argument("--check", action="store_true", help="first compare f(x, σ) with the pipeline's in fp32")
    parser.add_argument("--save-checkpoint", help="also write the converted checkpoint here (.safetensors)")
    parser.add_argument("--json", help="write the rows and the summary here")
    args = parser.parse_args()
    rows = run(args)
    lines = summary(rows)
    print("\n".join(lines))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": lines}, indent=2))


if __name__ == "__main__":
    main()
