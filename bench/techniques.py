"""The seed's other techniques against iCT on digits, at equal wall-clock budgets (issue 19's measurements).

    python -m bench.techniques train ict --minutes 20            # (a) iCT from scratch, the default's recipe
    python -m bench.techniques train edm --minutes 8             # EDM pretraining (shared by (b) and (c))
    python -m bench.techniques train ect --minutes 12            # (b) = EDM 8 min + ECT 12 min
    python -m bench.techniques train ect-s4 --minutes 12         # (b) with 4 stages of the mapping function, not 8
    python -m bench.techniques train cd --minutes 12             # (c) = EDM 8 min + CD 12 min
    python -m bench.techniques train small --minutes 8           # 10% of the digits split, no augmentation
    python -m bench.techniques train small-aug --minutes 8       # the same with --augment 0.12
    python -m bench.techniques train small-aug-geom --minutes 8  # ... and --augment-ops translate,scale,aniso
    python -m bench.techniques report --json bench/results/techniques_cpu.json
    python -m bench.techniques seeds ict=runs/techniques40/ict/checkpoints/step-00006916.safetensors edm=...

Every arm trains the embedded default's model (digits preset, 64 channels, class-conditional, batch 128, lr 5e-4,
EMA 0.999) with `python -m training.train` at OMP_NUM_THREADS=1. A budget in minutes becomes a number of steps
K (the curricula's horizon) from the arm's own speed, measured by a 12-step calibration run just before; the
run checkpoints 8 times so that the report can draw quality against training images. `report` scores every
checkpoint with the project's evaluator (`training.evaluate`: Fréchet distance in the digits classifier's
feature space, 2,000 samples, 1 and 2 steps; the EDM denoiser with Heun at 19 and 35 evaluations; the small-data
arms also the memorisation ratio) and checks the issue's targets. Arms run as separate processes so that two
can share the machine's cores side by side; each records its wall time.

`seeds` scores final checkpoints again over several sampling seeds: one 2,000-sample Fréchet distance moves by
about ±0.7 with the seed on digits, as much as most differences between arms, while models compared on the
same seed move together. Seeds start at 1 because `training.evaluate --search-mid-sigma` picks a 2-step middle σ on
seed 0's images.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import REPO, write_json
from training import evaluate

OUT = REPO / "runs" / "techniques"
COMMON = ["--preset", "digits", "--model-channels", "64", "--batch", "128", "--lr", "5e-4", "--ema-decay", "0.999",
          "--seed", "0", "--log-every", "50"]
ARMS: dict[str, list[str]] = {  # arm -> its training flags beyond COMMON (the pretrained paths are filled in)
    "ict": ["--recipe", "ict"],
    "edm": ["--recipe", "edm"],
    "ect": ["--recipe", "ect", "--init", "{edm}"],
    "ect-s4": ["--recipe", "ect", "--init", "{edm}", "--ect-stages", "4"],  # the mapping's gap halves 4 times, not 8
    "cd": ["--recipe", "cd", "--teacher-model", "{edm}"],
    "small": ["--recipe", "ict", "--data-fraction", "0.1"],
    "small-aug": ["--recipe", "ict", "--data-fraction", "0.1", "--augment", "0.12"],
    # the same without the ops that change a digit's meaning (mirrors; rotations turn a 6 into a 9)
    "small-aug-geom": ["--recipe", "ict", "--data-fraction", "0.1", "--augment", "0.12", "--augment-ops",
                       "translate,scale,aniso"],
}
SMALL_DATA = ("small", "small-aug", "small-aug-geom")  # arms scored for memorisation too
PRETRAINED = {"ect": "edm", "ect-s4": "edm", "cd": "edm"}  # arms that start from another arm's final checkpoint
CHECKPOINTS = 8
HEUN_STEPS = (10, 18)  # 19 and 35 evaluations (Heun: 2N − 1)


def train_argv(arm: str, out: Path, steps: int, save_every: int) -> list[str]:
    common = list(COMMON)
    if arm in PRETRAINED:  # ECT and CD take the denoiser's architecture
        i = common.index("--model-channels")
        del common[i : i + 2]
    extra = [a.format(edm=out / "edm") for a in ARMS[arm]]
    return [sys.executable, "-m", "training.train", "--out", str(out / arm), *common, *extra, "--steps", str(steps),
            "--save-every", str(save_every), "--keep", str(CHECKPOINTS + 1), "--sample-every", "0"]


def seconds_per_step(arm: str, out: Path, env: dict[str, str]) -> float:
    """The arm's seconds per step from a 12-step run (steps 4…12 of its metrics.csv; the first ones warm up)."""
    folder = out / "calibrate"
    shutil.rmtree(folder / arm, ignore_errors=True)  # a previous calibration's run would refuse the new one
    argv = train_argv(arm, folder.parent, 12, 100)
    argv[argv.index("--out") + 1] = str(folder / arm)
    argv[argv.index("--log-every") + 1] = "4"
    subprocess.run(argv, env=env, check=True, cwd=REPO, capture_output=True)
    rows = list(csv.DictReader((folder / arm / "metrics.csv").open()))
    times = {int(r["step"]): float(r["elapsed_s"]) for r in rows}
    return (times[12] - times[4]) / 8


def train(args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out: Path = args.out
    if args.arm in PRETRAINED and not (out / PRETRAINED[args.arm] / "done.json").is_file():
        raise SystemExit(f"train {args.arm}: run `train {PRETRAINED[args.arm]}` first (its run goes in {out})")
    step_s = seconds_per_step(args.arm, out, env)
    steps = args.steps or max(CHECKPOINTS, round(args.minutes * 60 / step_s))
    print(f"{args.arm}: {step_s * 1000:.0f} ms per step -> {steps} steps for {args.minutes:g} min", flush=True)
    started = time.monotonic()
    subprocess.run(train_argv(args.arm, out, steps, max(1, steps // CHECKPOINTS)), env=env, check=True, cwd=REPO)
    wall = time.monotonic() - started
    write_json(out / args.arm / "done.json", {"arm": args.arm, "minutes": args.minutes, "steps": steps,
                                              "seconds_per_step": step_s, "wall_s": wall, "threads": args.threads,
                                              "batch": 128, "finished": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                      time.gmtime())})
    print(f"{args.arm}: trained {steps} steps in {wall / 60:.1f} min", flush=True)


def checkpoints(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*.safetensors"))


def step_of(path: Path) -> int:
    return int(path.stem.removeprefix("step-"))


def score(path: Path, samples: int, memorisation: bool = False) -> dict[str, float]:
    """FD at 1 and 2 steps (and the memorisation ratio); cached beside the checkpoint, so a report can rerun."""
    cache = path.with_suffix(f".score{samples}{'m' if memorisation else ''}.json")
    if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        return json.loads(cache.read_text())
    report = evaluate.evaluate_checkpoint(path, steps=[1, 2], n_samples=samples, memorisation=memorisation)
    row: dict[str, float] = {}
    for result in report["results"]:
        row[f"fd{result['steps']}"] = result["frechet_distance"]
        if memorisation:
            row[f"memorisation{result['steps']}"] = result["memorisation_ratio"]
    cache.write_text(json.dumps(row))
    return row


def report(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    marks = {arm: out / arm / "done.json" for arm in ARMS}
    done = {arm: json.loads(mark.read_text()) for arm, mark in marks.items() if mark.is_file()}
    edm_images = done["edm"]["steps"] * 128 if "edm" in done else 0
    result: dict[str, Any] = {"arms": done, "curves": {}, "floor": evaluate.digits_floor(), "edm_images": edm_images}
    for arm in ("ict", "ect", "ect-s4", "cd"):
        if arm not in done:
            continue
        offset = edm_images if arm in PRETRAINED else 0
        result["curves"][arm] = [{"step": step_of(p), "images": offset + step_of(p) * 128, **score(p, args.samples)}
                                 for p in checkpoints(out / arm)]
    if "edm" in done:
        final = checkpoints(out / "edm")[-1]
        heun = evaluate.evaluate_checkpoint(final, heun_steps=list(HEUN_STEPS), n_samples=args.samples)
        result["edm_heun"] = {str(r["nfe"]): r["frechet_distance"] for r in heun["results"]}
    for arm in SMALL_DATA:
        if arm in done:
            result[arm] = score(checkpoints(out / arm)[-1], args.samples, memorisation=True)
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
    return result


def seeds(args: argparse.Namespace) -> dict[str, Any]:
    """Each NAME=CHECKPOINT's FD at seeds first … first + count − 1 (consistency models at 1 and 2 steps, EDM
    denoisers with Heun at 35 evaluations): {name: {sampler: [FD per seed]}}, printed as mean ± standard deviation
    with every model's difference from the first one's on the same seeds."""
    named = [spec.partition("=")[::2] for spec in args.checkpoints]
    bad = [spec for spec, (name, path) in zip(args.checkpoints, named, strict=True) if not name or not path]
    if bad:
        raise SystemExit(f"seeds: expected NAME=CHECKPOINT, got {bad[0]!r}")
    seed_list = list(range(args.first_seed, args.first_seed + args.count))
    result: dict[str, Any] = {}
    for name, path in named:
        rows: dict[str, list[float]] = {}
        for seed in seed_list:
            report = evaluate.evaluate_checkpoint(Path(path), n_samples=args.samples, seed=seed)
            for r in report["results"]:
                sampler = f"heun{r['nfe']}" if "nfe" in r else f"{r['steps']}-step"
                rows.setdefault(sampler, []).append(r["frechet_distance"])
        result[name] = rows
    print(format_seeds(result, seed_list, args.samples))
    if args.json:
        write_json(args.json, {"seeds": seed_list, "samples": args.samples, "fd": result})
    return result


def format_seeds(result: dict[str, dict[str, list[float]]], seed_list: list[int], samples: int) -> str:
    lines = [f"Fréchet distance, {samples:,} samples at seeds {seed_list[0]}-{seed_list[-1]}: mean ± std "
             "(mean difference from the first model, same sampler, same seeds)"]
    first = next(iter(result.values()), {})
    for name, rows in result.items():
        for sampler, values in rows.items():
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            line = f"  {name:<16} {sampler:<8} {statistics.mean(values):6.2f} ± {spread:4.2f}"
            if sampler in first and rows is not first:
                diffs = [v - w for v, w in zip(values, first[sampler], strict=True)]
                line += f"   {statistics.mean(diffs):+6.2f} ± {statistics.stdev(diffs) if len(diffs) > 1 else 0.0:4.2f}"
            lines.append(line)
    return "\n".join(lines)


def first_reaching(curve: list[dict[str, Any]], key: str, target: float) -> int | None:
    """Training images of the first checkpoint at or below `target` in `key`, or None."""
    return next((row["images"] for row in curve if row[key] <= target), None)


def format_report(result: dict[str, Any]) -> str:
    lines = [f"Fréchet distance (floor {result['floor']:.3f}), 2,000 samples:"]
    for arm, curve in result["curves"].items():
        lines.append(f"  {arm}:")
        lines += [f"    {row['images']:>9,} images  1 step {row['fd1']:7.2f}  2 steps {row['fd2']:7.2f}"
                  for row in curve]
    if "edm_heun" in result:
        lines.append("  EDM denoiser, Heun: " + ", ".join(f"{n} evaluations {fd:.2f}"
                                                          for n, fd in result["edm_heun"].items()))
    curves, pretrained = result["curves"], result.get("edm_images", 0)
    for arm in ("ect", "ect-s4", "cd"):
        if "ict" not in curves or arm not in curves:
            continue
        final = curves["ict"][-1]
        for key in ("fd1", "fd2"):
            reached = first_reaching(curves[arm], key, final[key])
            share = "never" if reached is None else (
                f"{reached / final['images']:.2f}× of iCT's images with the pretraining's, "
                f"{(reached - pretrained) / final['images']:.2f}× without")
            lines.append(f"  {arm} reaches iCT's final {key} {final[key]:.2f}: {share} (target ≤ 0.5)")
        if "edm_heun" in result:
            best = min(row["fd2"] for row in curves[arm])
            ratio = curves[arm][-1]["fd2"] / result["edm_heun"]["35"]
            lines.append(f"  {arm} 2-step / EDM's 35 evaluations: {ratio:.2f} at the end, "
                         f"{best / result['edm_heun']['35']:.2f} at its best checkpoint (target ≤ 1.1)")
    for arm in SMALL_DATA:
        if arm in result:
            r = result[arm]
            lines.append(f"  {arm}: FD 1 step {r['fd1']:.2f}, 2 steps {r['fd2']:.2f}; nearest-training-digit "
                         f"distance ratio {r['memorisation1']:.3f} / {r['memorisation2']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT, help="the arms' run folders")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one arm for a wall-clock budget")
    t.add_argument("arm", choices=sorted(ARMS))
    t.add_argument("--minutes", type=float, required=True)
    t.add_argument("--steps", type=int, help="train this many steps instead (e.g. another arm's, for equal images)")
    t.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the run")
    r = sub.add_parser("report", help="score every arm's checkpoints")
    r.add_argument("--samples", type=int, default=2000)
    r.add_argument("--json", type=Path)
    s = sub.add_parser("seeds", help="score checkpoints over several sampling seeds")
    s.add_argument("checkpoints", nargs="+", metavar="NAME=CHECKPOINT")
    s.add_argument("--count", type=int, default=5, help="how many seeds")
    s.add_argument("--first-seed", type=int, default=1)
    s.add_argument("--samples", type=int, default=2000)
    s.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    {"train": train, "report": report, "seeds": seeds}[args.command](args)


if __name__ == "__main__":
    main()
