"""The iCT paper's ablation in miniature on digits, at one equal budget for every variant.

    python -m bench.ablation --budget 2000                 # iCT, CT, and iCT with each technique set back to CT's
    python -m bench.ablation --budget 300 --samples 500    # a quick look
    python -m bench.ablation --variants ict,ct --json runs/ablation/table.json

Every variant trains the same class-conditional digits model (same width, batch, learning rate, seed
and number of steps) with `training.run.train`, then `training.evaluate` scores the EMA weights: the
Fréchet distance of 1-step and 2-step samples (schedules [80] and [80, mid]) to the held-out split,
next to the floor (held-out vs training split). Finished variants are reused when run again.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path
from typing import Any

from bench.harness import write_json
from models.config import preset
from training import evaluate
from training.config import RunConfig
from training.recipe import RECIPES, TECHNIQUE_FLAGS, ablation_variants
from training.run import train
from training.state import CheckpointDir

log = logging.getLogger("bench.ablation")


def run_config(name: str, args: argparse.Namespace) -> RunConfig:
    """The RunConfig of one variant: its recipe as explicit technique choices, everything else shared."""
    base = name.partition("/")[0]
    recipe = ablation_variants()[name]
    techniques = {f: getattr(recipe, f) for f in TECHNIQUE_FLAGS.values()}
    return RunConfig(
        out=str(args.out / name.replace("/", "__").replace("=", "-")),
        preset="digits", data="digits", steps=args.budget, batch=args.batch, lr=args.lr, ema_decay=args.ema_decay,
        seed=args.seed, save_every=args.budget, sample_every=args.budget, log_every=max(1, args.budget // 20),
        recipe=base, model_channels=args.model_channels, **techniques,
    )


def same_training(a: RunConfig, b: RunConfig) -> bool:
    """Two variants that resolve to the same recipe and model on digits (e.g. dropout None vs 0.0)."""
    ra, rb = a.recipe_obj(), b.recipe_obj()
    da = ra.dropout if ra.dropout is not None else preset("digits").dropout
    db = rb.dropout if rb.dropout is not None else preset("digits").dropout
    return ra.replace(dropout=da) == rb.replace(dropout=db)


def train_variant(cfg: RunConfig) -> tuple[Path, float]:
    ckpts = CheckpointDir(Path(cfg.out) / "checkpoints")
    latest = ckpts.latest() if ckpts.folder.is_dir() else None
    if latest is not None and latest.step == cfg.steps:
        log.info("%s: reusing the finished run", cfg.out)
        with (Path(cfg.out) / "metrics.csv").open() as f:
            last = list(csv.DictReader(f))[-1]
        return latest.model, float(last["elapsed_s"])
    start = time.perf_counter()
    train(cfg, resume="auto" if latest is not None else None, explicit=set())
    return CheckpointDir(Path(cfg.out) / "checkpoints").latest().model, time.perf_counter() - start


def table(rows: list[dict[str, Any]], floor: float) -> str:
    lines = [
        "| variant | FD 1 step | FD 2 steps | 1-step / floor | 2-step / floor | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['fd'][1]:.3f} | {r['fd'][2]:.3f} | {r['fd'][1] / floor:.2f} | "
            f"{r['fd'][2] / floor:.2f} | {r['train_s']:.0f} |"
        )
    lines.append(f"| floor (held-out vs training split) | {floor:.3f} | {floor:.3f} | 1.00 | 1.00 | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=int, default=2000, help="training steps of every variant")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--model-channels", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=2000, help="samples per Fréchet distance")
    p.add_argument("--variants", help=f"comma-separated subset of {', '.join(ablation_variants())}")
    p.add_argument("--out", type=Path, default=Path("runs/ablation"))
    p.add_argument("--json", type=Path, help="also write the table as JSON")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = args.variants.split(",") if args.variants else list(ablation_variants())
    unknown = sorted(set(names) - set(ablation_variants()))
    if unknown:
        raise SystemExit(f"error: --variants {','.join(unknown)}: unknown; choose from {list(ablation_variants())}")

    configs = {n: run_config(n, args) for n in names}
    rows = []
    for name, cfg in configs.items():
        twin = next((o for o in ("ict",) if o != name and o in configs and same_training(cfg, configs[o])), None)
        if twin is not None:
            log.info("%s trains exactly like %s on digits (the preset has no dropout); not run twice", name, twin)
            continue
        model_file, seconds = train_variant(cfg)
        report = evaluate.evaluate_checkpoint(model_file, steps=(1, 2), n_samples=args.samples, seed=args.seed)
        fd = {r["steps"]: r["frechet_distance"] for r in report["results"]}
        rows.append({"variant": name, "fd": fd, "train_s": seconds, "floor": report["floor"]})
        log.info("%s: FD 1 step %.3f, 2 steps %.3f (floor %.3f)", name, fd[1], fd[2], report["floor"])
    floor = rows[0]["floor"]
    print(f"\nAblation on digits: {args.budget} steps x batch {args.batch}, lr {args.lr}, EMA {args.ema_decay}, "
          f"model_channels {args.model_channels}, {args.samples} samples per Fréchet distance (recipes: "
          f"ict = {RECIPES['ict'].to_dict()}; ct = {RECIPES['ct'].to_dict()})\n")
    print(table(rows, floor))
    if args.json:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()
