"""Sample quality of a digits checkpoint against the floor (issue 3's quality target).

    python -m bench.quality                                  # models/pretrained/digits.safetensors
    python -m bench.quality runs/digits/export.safetensors --samples 2000 --json

Prints the Fréchet distance (digits classifier feature space) of 1-step and 2-step samples to the held-out
split, the floor (held-out vs training split) and the ratios to the floor. Targets: 1-step <= 2x the
floor, 2-step <= 1.5x. `--check` exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from bench.harness import EMBEDDED_DEFAULT
from models.checkpoint import CheckpointError
from training.evaluate import EvaluationError, evaluate_checkpoint

TARGETS = {1: 2.0, 2: 1.5}  # steps -> largest allowed ratio of the Fréchet distance to the floor


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", nargs="?", type=Path, default=EMBEDDED_DEFAULT)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args()
    if not args.checkpoint.is_file():
        print(f"error: CHECKPOINT {args.checkpoint}: no such file (give a digits checkpoint path)", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        report = evaluate_checkpoint(args.checkpoint, tuple(TARGETS), args.samples, args.seed, args.device, args.batch)
    except (CheckpointError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    met = {r["steps"]: r["ratio_to_floor"] <= TARGETS[r["steps"]] for r in report["results"]}
    if args.json:
        print(json.dumps(report | {"targets": TARGETS, "met": met, "seconds": seconds}, indent=2))
    else:
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
        print(f"# {args.checkpoint} (sha256 {report['sha256'][:16]}…), {args.samples} samples, seed {args.seed}")
        print(f"# device {device}, threads {torch.get_num_threads()}, {seconds:.1f} s")
        print(f"# digits classifier held-out accuracy {report['classifier_accuracy']:.4f}")
        print(f"# floor (held-out vs training split): {report['floor']:.4f}")
        print(f"{'steps':>5} {'Fréchet dist.':>14} {'× floor':>8} {'target':>7} {'met':>4}  sigmas")
        for r in report["results"]:
            k = r["steps"]
            sig = [round(s, 5) for s in r["sigmas"]]
            cells = f"{r['frechet_distance']:>14.4f} {r['ratio_to_floor']:>8.3f} {TARGETS[k]:>7.1f}"
            print(f"{k:>5} {cells} {'yes' if met[k] else 'NO':>4}  {sig}")
    return 1 if args.check and not all(met.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
