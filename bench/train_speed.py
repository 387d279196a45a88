"""Training throughput (images/s) of full iCT steps: student forward/backward, teacher forward, RAdam, EMA.

    python -m bench.train_speed                                   # digits preset on the CPU, batch 128
    python -m bench.train_speed --model-channels 64               # the embedded default's width
    python -m bench.train_speed --preset cifar10 --device cuda --precision bf16 [--compile]

Digits train on the real training split; other presets on random images of the preset's shape (the
speed of a step does not depend on the pixels). For cifar10 the default batch is 128 per GPU, the
share of one GPU in iCT's global batch of 1024 on 8 GPUs, and the script prints how long one
400k-iteration run would take on 8 such GPUs, assuming DDP scales linearly (it says so).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.harness import machine, sync, write_json
from models.config import PRESETS, preset
from training.data import Dataset, load_digits_train
from training.loop import DistInfo, LoopConfig, Trainer
from training.recipe import RECIPES

ICT_CIFAR_ITERATIONS = 400_000
ICT_CIFAR_BATCH = 1024
GPUS = 8


def synthetic_data(shape: tuple[int, int, int], num_classes: int, n: int = 4096) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, max(num_classes, 1), (n,), generator=gen) if num_classes else None
    return Dataset(images, labels, tuple(str(i) for i in range(num_classes)), flip=True, name="synthetic")


def measure(trainer: Trainer, warmup: int, steps: int) -> float:
    """Images per second over `steps` timed steps after `warmup` untimed ones."""
    for _ in range(warmup):
        trainer.step()
    sync(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        result = trainer.step()
    result.loss.item()  # waits for the last step
    sync(trainer.device)
    return steps * trainer.loop.global_batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="digits", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, help="per-device batch (default: 128)")
    p.add_argument("--model-channels", type=int, help="preset override")
    p.add_argument("--recipe", default="ict", choices=sorted(RECIPES))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, help="timed steps (default: 20 on CPU, 50 on GPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 3, 15 with --compile)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = preset(args.preset)
    if args.model_channels:
        cfg = cfg.replace(model_channels=args.model_channels)
    recipe = RECIPES[args.recipe]
    cfg = cfg.replace(fourier_scale=recipe.fourier_scale)
    data = load_digits_train() if args.preset == "digits" else synthetic_data(cfg.image_shape, cfg.num_classes)
    batch = args.batch or 128
    steps = args.steps or (50 if device.type == "cuda" else 20)
    warmup = args.warmup if args.warmup is not None else (15 if args.compile else 3)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    loop = LoopConfig(total_steps=ICT_CIFAR_ITERATIONS, global_batch=batch, lr=1e-4, ema_decay=0.9999,
                      grad_clip=0.0, precision=args.precision, compile=args.compile)
    trainer = Trainer(cfg, recipe, loop, data, DistInfo(), device)
    rate = measure(trainer, warmup, steps)
    params = trainer.student.num_parameters()
    result = {
        "preset": args.preset, "model_channels": cfg.model_channels, "parameters": params, "device": str(device),
        "machine": machine(device), "precision": args.precision, "compile": args.compile, "batch": batch,
        "recipe": args.recipe, "timed_steps": steps, "images_per_s": rate, "seconds_per_step": batch / rate,
    }
    print(f"{args.preset} ({params / 1e6:.2f} M parameters, {args.recipe}, {args.precision}"
          f"{', compiled' if args.compile else ''}) on {result['machine']}")
    print(f"batch {batch}: {rate:,.1f} images/s of training ({batch / rate * 1000:.1f} ms per step)")
    if args.preset == "cifar10":
        images = ICT_CIFAR_ITERATIONS * ICT_CIFAR_BATCH
        hours = images / (GPUS * rate) / 3600
        result["ict_cifar10_run_hours_on_8"] = hours
        print(f"one iCT CIFAR-10 run ({ICT_CIFAR_ITERATIONS:,} iterations x batch {ICT_CIFAR_BATCH}) on {GPUS} such "
              f"devices with batch {ICT_CIFAR_BATCH // GPUS} each: {hours:.1f} hours, ASSUMING DDP SCALES LINEARLY "
              f"(no all-reduce or input cost measured here)")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
