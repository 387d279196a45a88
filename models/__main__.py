"""Small commands: `python -m models info PRESET|FILE`, `sample FILE`, and `convert SRC --out FILE.safetensors`
(the public consistency models: a diffusers pipeline folder, or an OpenAI `.pt` with --preset or --flags)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import CheckpointError, load, recommended_sigmas
from .cli import OneLineParser
from .config import PRESETS, ModelConfig, preset
from .consistency import ConsistencyModel
from .convert import LAUNCH_TWO_STEP, OPENAI_PRESETS, convert
from .denoiser import heun_evaluations, sample_heun
from .sampling import sample, to_uint8


def flops_per_image(model: ConsistencyModel) -> int:
    """FLOPs of one f(x, σ) evaluation for a single image (multiply-add = 2 FLOPs)."""
    cfg = model.cfg
    x = torch.zeros(1, *cfg.image_shape)
    labels = torch.zeros(1, dtype=torch.long) if cfg.num_classes else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.ones(1), labels)
    return counter.get_total_flops()


def describe(cfg: ModelConfig, model: ConsistencyModel) -> str:
    lines = [f"{k:>18}: {v}" for k, v in cfg.to_dict().items()]
    lines.append(f"{'parameters':>18}: {model.num_parameters():,} ({model.num_parameters() / 1e6:.2f} M)")
    lines.append(f"{'GFLOPs per image':>18}: {flops_per_image(model) / 1e9:.4f} (one network evaluation)")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    target = args.target
    if target in PRESETS:
        cfg = preset(target)
        print(f"preset {target}\n{describe(cfg, ConsistencyModel.from_config(cfg))}")
        return
    if not Path(target).exists():
        raise SystemExit(f"error: {target!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
    ck = load(target)
    meta = ck.meta
    print(f"checkpoint {target} (sha256 {ck.sha256[:16]}…)\n{describe(meta.config, ck.model)}")
    print(f"{'preset':>18}: {meta.preset}\n{'training step':>18}: {meta.training_step}")
    print(f"{'class names':>18}: {meta.class_names}\n{'schedules':>18}: {meta.schedules}")
    print(f"{'provenance':>18}: {meta.provenance}")


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*H, columns*W, C) grid, empty cells black."""
    b, h, w, c = images.shape
    rows = math.ceil(b / columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return grid


def cmd_sample(args: argparse.Namespace) -> None:
    from PIL import Image

    ck = load(args.checkpoint)
    seeds = [args.seed + i for i in range(args.n)]
    if ck.meta.config.kind == "denoiser":  # EDM Algorithm 1: --steps Heun steps, 2·steps − 1 evaluations
        images = to_uint8(sample_heun(ck.model, seeds, args.steps))
        how = f"Heun, {heun_evaluations(args.steps)} evaluations"
    else:
        sigmas = recommended_sigmas(ck.meta, args.steps)
        images = to_uint8(sample(ck.model, seeds, sigmas))
        how = f"sigmas {sigmas}"
    grid = image_grid(images, columns=min(args.n, 8))
    scale = max(1, 256 // grid.shape[1])
    pil = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    pil.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(args.out)
    print(f"wrote {args.n} images ({args.steps} step(s), {how}) to {args.out}")


def cmd_convert(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out!r} must end in .safetensors")
    converted = convert(args.src, preset=args.preset, flags=args.flags, model_id=args.model_id,
                        class_names=args.class_names)
    converted.save(out)
    cfg, prov = converted.model.cfg, converted.provenance
    print(f"wrote {out}: {prov['source']} {converted.model_id or 'model'} ({cfg.image_size}x{cfg.image_size}, "
          f"{cfg.num_classes or 'no'} classes, {converted.model.num_parameters() / 1e6:.1f} M parameters), "
          f"schedules {converted.schedules}, source sha256 {prov['sha256'][:16]}…")


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m models", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("info", help="parameters and GFLOPs of a preset or a checkpoint")
    p.add_argument("target", help=f"a preset ({', '.join(sorted(PRESETS))}) or a .safetensors checkpoint")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("convert", help="a diffusers consistency-model folder or an OpenAI .pt -> our checkpoint")
    p.add_argument("src", help="diffusers pipeline folder, or an OpenAI state dict (.pt) with --preset/--flags")
    p.add_argument("--out", required=True, help="the .safetensors file to write (nothing is written on error)")
    p.add_argument("--preset", choices=sorted(OPENAI_PRESETS), help="launch-script model flags of a released model")
    p.add_argument("--flags", help="the launch script's model flags, quoted (instead of --preset)")
    p.add_argument("--model-id", choices=sorted(LAUNCH_TWO_STEP),
                   help="which released model (picks its two-step schedule); default: from the file or folder name")
    p.add_argument("--class-names", help="a text file of class names, one per line, in label order")
    p.set_defaults(func=cmd_convert)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
