"""Train a consistency model: `python -m training.train --preset digits --out runs/digits [options]`.

Runs on one process, or under `torchrun --nproc_per_node=N -m training.train ...` with DDP (NCCL on
GPU, gloo on CPU; the global --batch is split across ranks). Options come from flags and/or a JSON or
TOML --config file (flags win); the resolved configuration is saved as RUN/config.json. The run folder
gets metrics.csv, samples/step-K.png (1-step and 2-step samples from fixed seeds), checkpoints/ and,
when tensorboard is installed, tb/. `--resume` continues a run exactly where its last checkpoint left it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import logging
import math
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from models import checkpoint
from models.config import PRESETS, ModelConfig, preset
from models.sampling import sample, to_uint8

from .data import load_data
from .loop import DistInfo, LoopConfig, StepResult, Trainer, setup_distributed, teardown_distributed
from .recipe import CHOICES, RECIPES, TECHNIQUE_FLAGS, Recipe, recipe
from .state import CheckpointDir, gather_rng, load_state, restore_rng

log = logging.getLogger("training.train")

DEFAULT_MID_SIGMA = 0.821  # iCT's two-step CIFAR-10 schedule (80, 0.821) until a search rewrites it
SAMPLE_SEEDS_PER_ROW = 10

# Per-preset defaults for the optimisation settings (flags and --config override them).
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    # digits: a small model on 1,437 images; a short CPU run (see README for the embedded default's command).
    "digits": {"steps": 6000, "batch": 128, "lr": 1e-3, "ema_decay": 0.999, "save_every": 500, "sample_every": 500},
    # iCT CIFAR-10: RAdam lr 1e-4, batch 1024, 400k iterations, EMA 0.99993 (iCT §4).
    "cifar10": {
        "steps": 400_000, "batch": 1024, "lr": 1e-4, "ema_decay": 0.99993, "save_every": 5000, "sample_every": 5000
    },
    # not tuned here: CIFAR-10's optimiser settings; set --steps/--batch/--lr for your run.
    "imagenet64": {
        "steps": 400_000, "batch": 1024, "lr": 1e-4, "ema_decay": 0.99993, "save_every": 5000, "sample_every": 5000
    },
}


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run; saved as RUN/config.json (with the derived model and recipe)."""

    out: str
    preset: str = "digits"
    data: str = "digits"  # digits | cifar10:PATH | folder:PATH
    steps: int = 6000  # K, the total iterations (the curriculum's horizon)
    batch: int = 128  # global batch, split across ranks
    lr: float = 1e-3  # RAdam learning rate
    ema_decay: float = 0.999  # EMA of the student, for sampling and export
    ema_warmup: bool = True  # decay min(ema_decay, (1 + k)/(10 + k)) so short runs forget the initial weights
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the iCT paper does not clip)
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; grad scaling for fp16)
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    save_every: int = 500
    sample_every: int = 500
    log_every: int = 50
    keep: int = 2  # checkpoints kept on disk
    stop_after: int | None = None  # stop this invocation after that many steps (checkpointing); resume later
    recipe: str = "ict"
    distance: str | None = None
    timesteps: str | None = None
    curriculum: str | None = None
    teacher: str | None = None
    weighting: str | None = None
    fourier_scale: float | None = None
    dropout: float | None = None
    s0: int | None = None
    s1: int | None = None
    mu0: float | None = None
    model_channels: int | None = None  # preset override
    num_res_blocks: int | None = None  # preset override
    class_cond: str = "auto"  # auto: conditional when the preset is and the data have labels | yes | no
    mid_sigma: float = DEFAULT_MID_SIGMA  # middle σ of the recommended 2-step schedule

    def recipe_obj(self) -> Recipe:
        overrides = {f: getattr(self, f) for f in (*TECHNIQUE_FLAGS.values(), "s0", "s1", "mu0")}
        return recipe(self.recipe, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Settings a resumed run may change; every other explicit flag must equal the saved value.
RESUMABLE_CHANGES = {"out", "save_every", "sample_every", "log_every", "keep", "stop_after", "compile", "device"}
VALIDATORS: dict[str, tuple[Any, str]] = {
    "steps": (lambda v: v >= 1, ">= 1"),
    "batch": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0 and math.isfinite(v), "> 0"),
    "ema_decay": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "grad_clip": (lambda v: v >= 0, ">= 0"),
    "save_every": (lambda v: v >= 1, ">= 1"),
    "sample_every": (lambda v: v >= 0, ">= 0 (0 = never)"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "keep": (lambda v: v >= 1, ">= 1"),
    "stop_after": (lambda v: v is None or v >= 1, ">= 1"),
    "model_channels": (lambda v: v is None or v >= 4, ">= 4"),
    "num_res_blocks": (lambda v: v is None or v >= 1, ">= 1"),
    "mid_sigma": (lambda v: 0.002 < v < 80, "strictly between sigma_min and sigma_max"),
}


# --- command line and config file ---------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise SystemExit(f"error: {message}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m training.train", description=__doc__.split("\n")[0],
                      argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="JSON or TOML file of options (keys as the flags, - or _); flags override it")
    p.add_argument("--resume", nargs="?", const="latest", choices=["latest", "auto"],
                   help="continue from the run folder's newest checkpoint (auto: start fresh if there is none)")
    p.add_argument("--out", help="run folder (required)")
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--data", help="digits | cifar10:PATH | folder:PATH")
    for name, kind, help_ in (
        ("steps", int, "total training iterations K"),
        ("batch", int, "global batch size"),
        ("lr", float, "RAdam learning rate"),
        ("ema_decay", float, "EMA decay of the student for sampling"),
        ("grad_clip", float, "gradient-norm clip (0 = off)"),
        ("seed", int, "seed of initial weights, data order and noise"),
        ("save_every", int, "checkpoint every M steps"),
        ("sample_every", int, "sample grid every M steps (0 = never)"),
        ("log_every", int, "metrics every M steps"),
        ("keep", int, "checkpoints kept on disk"),
        ("stop_after", int, "stop after this many steps in this invocation"),
        ("s0", int, "curriculum start s0"),
        ("s1", int, "curriculum end s1"),
        ("mu0", float, "EMA-teacher decay μ0"),
        ("model_channels", int, "preset override: model_channels"),
        ("num_res_blocks", int, "preset override: num_res_blocks"),
        ("fourier_scale", float, "Fourier embedding scale (iCT 0.02, CT 16)"),
        ("dropout", float, "dropout rate (default: the preset's)"),
        ("mid_sigma", float, "middle σ of the recommended 2-step schedule"),
    ):
        p.add_argument(flag(name), type=kind, help=help_)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, help="ramp the EMA decay up (default on)")
    p.add_argument("--recipe", choices=sorted(RECIPES), help="ict (default) or ct, the original CT baseline")
    for name, kind in CHOICES.items():
        p.add_argument(flag(name), choices=list(get_args(kind)), help=f"override the recipe's {name}")
    p.add_argument("--class-cond", choices=["auto", "yes", "no"])
    return p


def read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_text()
        doc = tomllib.loads(text) if file.suffix == ".toml" else json.loads(text)
    except OSError as e:
        raise SystemExit(f"error: --config {path}: cannot read ({e.strerror or e})") from None
    except (ValueError, tomllib.TOMLDecodeError) as e:
        kind = "TOML" if file.suffix == ".toml" else "JSON"
        raise SystemExit(f"error: --config {path}: not valid {kind} ({e})") from None
    if not isinstance(doc, dict):
        raise SystemExit(f"error: --config {path}: must hold a table/object of options")
    allowed = {f.name for f in dataclasses.fields(RunConfig)}
    options = {k.replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise SystemExit(f"error: --config {path}: unknown options {unknown}; allowed: {sorted(allowed)}")
    check_types(options, f"--config {path}")
    return options


CHOICE_OPTIONS: dict[str, tuple[str, ...]] = {
    "precision": ("fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"),
    "class_cond": ("auto", "yes", "no"),
    "recipe": tuple(sorted(RECIPES)),
}
TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_types(options: dict[str, Any], source: str) -> None:
    """Config-file values must have the option's type (flags are converted by argparse already)."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
    for name, value in options.items():
        kinds = [k.strip() for k in annotations[name].split("|")]
        if value is None and "None" in kinds:
            continue
        allowed = tuple(t for k in kinds for t in TYPES.get(k, ()))
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            raise SystemExit(f"error: {source}: option {name} = {value!r} must be of type {annotations[name]}")


def validate(cfg: RunConfig) -> None:
    for name, choices in CHOICE_OPTIONS.items():
        if getattr(cfg, name) not in choices:
            raise SystemExit(f"error: {flag(name)} {getattr(cfg, name)!r} is not one of {list(choices)}")
    for name, (ok, allowed) in VALIDATORS.items():
        value = getattr(cfg, name)
        if not ok(value):
            raise SystemExit(f"error: {flag(name)} {value} must be {allowed}")
    try:
        cfg.recipe_obj()
    except ValueError as e:
        raise SystemExit(f"error: {e} (see --recipe and the technique flags)") from None


def resolve(argv: list[str] | None) -> tuple[RunConfig, str | None, set[str]]:
    """Defaults < preset defaults < --config file < flags; returns the config, the resume mode, explicit keys."""
    given = vars(build_parser().parse_args(argv))
    resume = given.pop("resume", None)
    file_options = read_config_file(given.pop("config")) if "config" in given else {}
    explicit = {**file_options, **given}
    if "out" not in explicit:
        raise SystemExit("error: --out RUN_FOLDER is required")
    name = explicit.get("preset", "digits")
    if name not in PRESETS:
        raise SystemExit(f"error: --preset {name!r} is not one of {sorted(PRESETS)}")
    merged = {**PRESET_DEFAULTS.get(name, {}), **explicit}
    try:
        cfg = RunConfig(**merged)
    except TypeError as e:
        raise SystemExit(f"error: {e}") from None
    validate(cfg)
    return cfg, resume, set(explicit)


def model_config(cfg: RunConfig, rec: Recipe, num_data_classes: int) -> ModelConfig:
    """The preset with the run's overrides: width, depth, the recipe's Fourier scale and dropout, classes."""
    base = preset(cfg.preset)
    changes: dict[str, Any] = {"fourier_scale": rec.fourier_scale}
    if rec.dropout is not None:
        changes["dropout"] = rec.dropout
    for name in ("model_channels", "num_res_blocks"):
        if getattr(cfg, name) is not None:
            changes[name] = getattr(cfg, name)
    if cfg.class_cond == "yes" and not num_data_classes:
        raise SystemExit(f"error: --class-cond yes needs labelled data; --data {cfg.data} has no labels")
    conditional = cfg.class_cond == "yes" or (cfg.class_cond == "auto" and base.num_classes > 0)
    changes["num_classes"] = num_data_classes if conditional else 0
    try:
        return base.replace(**changes)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


# --- provenance, metadata, samples --------------------------------------------------------------


def git_commit() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None}
    if head.returncode:
        return {"git_commit": None}
    return {"git_commit": head.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def schedules(cfg: RunConfig, model_cfg: ModelConfig) -> dict[int, list[float]]:
    return {1: [model_cfg.sigma_max], 2: [model_cfg.sigma_max, cfg.mid_sigma]}


def provenance(cfg: RunConfig, step: int) -> dict[str, Any]:
    return {
        "trainer": "cmserve training.train",
        **git_commit(),
        "recipe_name": cfg.recipe,
        "recipe": cfg.recipe_obj().to_dict(),
        "steps": step,
        "total_steps": cfg.steps,
        "batch": cfg.batch,
        "lr": cfg.lr,
        "ema_decay": cfg.ema_decay,
        "seed": cfg.seed,
        "data": cfg.data,
    }


def save_model_file(path: Path, model: nn.Module, cfg: RunConfig, class_names: list[str] | None, step: int) -> None:
    checkpoint.save(path, model, preset=cfg.preset, class_names=class_names, training_step=step,
                    schedules=schedules(cfg, model.cfg), provenance=provenance(cfg, step))


def sample_grid(model: nn.Module, cfg: RunConfig) -> Any:
    """Rows of 1-step samples above rows of 2-step samples, from seeds 0…; column j has class j."""
    import numpy as np
    from PIL import Image

    mcfg = model.cfg
    n = 2 * SAMPLE_SEEDS_PER_ROW
    labels = [i % mcfg.num_classes for i in range(n)] if mcfg.num_classes else None
    blocks = []
    for sigmas in schedules(cfg, mcfg).values():
        imgs = to_uint8(sample(model, list(range(n)), sigmas, labels))  # (n, H, W, C)
        rows = imgs.reshape(n // SAMPLE_SEEDS_PER_ROW, SAMPLE_SEEDS_PER_ROW, *imgs.shape[1:])
        lines = [np.concatenate(list(row), axis=1) for row in rows]  # each (H, cols*W, C)
        blocks.append(np.concatenate(lines, axis=0))  # (rows*H, cols*W, C)
    gap = np.full((2, blocks[0].shape[1], blocks[0].shape[2]), 128, dtype=np.uint8)
    grid = np.concatenate([blocks[0], gap, blocks[1]], axis=0)
    scale = max(1, 320 // grid.shape[1])
    img = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
    return img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


# --- the run ------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.csv (and TensorBoard events when tensorboard is installed), written by rank 0."""

    FIELDS = ("step", "loss", "n_k", "teacher_mu", "grad_norm", "images_per_s", "lr", "elapsed_s")

    def __init__(self, run: Path, resume_step: int) -> None:
        self.path = run / "metrics.csv"
        rows = []
        if self.path.is_file() and resume_step > 0:  # drop rows logged after the checkpoint we resume from
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.tb = None
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tb"), purge_step=resume_step + 1)

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class Run:
    cfg: RunConfig
    folder: Path
    trainer: Trainer
    ckpts: CheckpointDir
    class_names: list[str] | None
    dist: DistInfo

    def save(self) -> None:
        """Checkpoint the current step (a collective: every rank contributes its RNG states)."""
        step = self.trainer.step_index
        rng = gather_rng(self.trainer.device, self.dist.world_size)
        if self.dist.is_main:
            latest = self.ckpts.latest()
            if latest is None or latest.step != step:
                state = {**self.trainer.state_dict(), "rng": rng, "world_size": self.dist.world_size}
                writer = lambda path: save_model_file(path, self.trainer.ema, self.cfg, self.class_names, step)  # noqa: E731
                self.ckpts.save(step, writer, state)
                log.info("checkpoint step %d -> %s", step, self.ckpts.folder)
        if self.dist.enabled:
            torch.distributed.barrier()

    def write_samples(self) -> None:
        if not self.dist.is_main:
            return
        path = self.folder / "samples" / f"step-{self.trainer.step_index:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        sample_grid(self.trainer.ema, self.cfg).save(path)

    def resume_from(self, ref_state: dict[str, Any]) -> None:
        if ref_state.get("world_size") != self.dist.world_size:
            raise SystemExit(
                f"error: --resume: the checkpoint was written by {ref_state.get('world_size')} ranks, this job has "
                f"{self.dist.world_size}; exact resume needs the same number"
            )
        self.trainer.load_state_dict(ref_state)
        restore_rng(ref_state["rng"][self.dist.rank], self.trainer.device)


def prepare_folder(cfg: RunConfig, resume: str | None, explicit: set[str]) -> tuple[RunConfig, dict[str, Any] | None]:
    """Check the run folder against the resume mode; on resume, the saved config (with allowed changes)."""
    folder = Path(cfg.out)
    ckpts = CheckpointDir(folder / "checkpoints")
    try:
        latest = ckpts.latest()
    except ValueError as e:
        raise SystemExit(f"error: --resume: {e}") from None
    if latest is None:
        if resume == "latest":
            raise SystemExit(f"error: --resume: {folder} holds no checkpoint (use --resume auto to start fresh)")
        return cfg, None
    if resume is None:
        raise SystemExit(f"error: --out {folder} already holds a run; pass --resume to continue it or choose another")
    saved_doc = json.loads((folder / "config.json").read_text())
    saved = RunConfig(**saved_doc["run"])
    for name in sorted(explicit - RESUMABLE_CHANGES):
        if getattr(cfg, name) != getattr(saved, name):
            raise SystemExit(
                f"error: {flag(name)} {getattr(cfg, name)} differs from the resumed run's {getattr(saved, name)}; "
                f"a resumed run may change only {sorted(flag(n) for n in RESUMABLE_CHANGES - {'out'})}"
            )
    changes = {n: getattr(cfg, n) for n in explicit & RESUMABLE_CHANGES}
    return dataclasses.replace(saved, **changes), load_state(latest.state)


def write_config(folder: Path, cfg: RunConfig, model_cfg: ModelConfig, class_names: list[str] | None) -> None:
    doc = {"run": cfg.to_dict(), "model": model_cfg.to_dict(), "recipe": cfg.recipe_obj().to_dict(),
           "class_names": class_names}
    checkpoint.atomic_write_bytes(folder / "config.json", (json.dumps(doc, indent=2) + "\n").encode())


def train(
    cfg: RunConfig,
    resume: str | None = None,
    explicit: set[str] | None = None,
    on_step: Callable[[StepResult], None] | None = None,
) -> Trainer:
    """Run (or continue) training as `cfg` says; `on_step` sees every step's result; returns the trainer."""
    dist_info, device = setup_distributed(cfg.device)
    try:
        return _train(cfg, resume, explicit or set(), dist_info, device, on_step)
    finally:
        teardown_distributed()


def _train(
    cfg: RunConfig,
    resume: str | None,
    explicit: set[str],
    dist_info: DistInfo,
    device: torch.device,
    on_step: Callable[[StepResult], None] | None,
) -> Trainer:
    cfg, state = prepare_folder(cfg, resume, explicit)
    folder = Path(cfg.out)
    rec = cfg.recipe_obj()
    base = preset(cfg.preset)
    data = load_data(cfg.data, base.image_size, base.image_channels)
    model_cfg = model_config(cfg, rec, data.num_classes)
    class_names = list(data.class_names) if model_cfg.num_classes else None
    loop = LoopConfig(total_steps=cfg.steps, global_batch=cfg.batch, lr=cfg.lr, ema_decay=cfg.ema_decay,
                      ema_warmup=cfg.ema_warmup, grad_clip=cfg.grad_clip, precision=cfg.precision,
                      compile=cfg.compile, seed=cfg.seed)
    trainer = Trainer(model_cfg, rec, loop, data, dist_info, device)
    run = Run(cfg, folder, trainer, CheckpointDir(folder / "checkpoints", cfg.keep), class_names, dist_info)
    if dist_info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        run.ckpts.folder.mkdir(parents=True, exist_ok=True)
        run.ckpts.remove_stale_temporaries()
        write_config(folder, cfg, model_cfg, class_names)
    if state is not None:
        run.resume_from(state)
    start = trainer.step_index
    stop = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    if dist_info.is_main:
        log.info("training %s (%.2f M parameters) with recipe %s on %s, steps %d -> %d of %d, %d rank(s)",
                 cfg.preset, trainer.student.num_parameters() / 1e6, cfg.recipe, device, start, stop, cfg.steps,
                 dist_info.world_size)
    run_steps(run, start, stop, on_step)
    return trainer


def run_steps(run: Run, start: int, stop: int, on_step: Callable[[StepResult], None] | None = None) -> None:
    from tqdm import tqdm

    cfg, trainer, main = run.cfg, run.trainer, run.dist.is_main
    metrics = MetricsLog(run.folder, start) if main else None
    bar = tqdm(total=cfg.steps, initial=start, disable=not main, dynamic_ncols=True, unit="step",
               mininterval=1.0 if sys.stderr.isatty() else 30.0)
    loss_sum, count, t0, t_log = None, 0, time.perf_counter(), time.perf_counter()
    try:
        while trainer.step_index < stop:
            result = trainer.step()
            if on_step is not None:
                on_step(result)
            loss_sum = result.loss if loss_sum is None else loss_sum + result.loss
            count += 1
            k = trainer.step_index
            bar.update(1)
            if k % cfg.log_every == 0 or k == stop:
                now = time.perf_counter()
                row = log_row(run, result, loss_sum / count, count, now - t_log, now - t0)
                if main:
                    metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4g}", N=row["n_k"], img_s=f"{row['images_per_s']:.0f}")
                loss_sum, count, t_log = None, 0, now
            if cfg.sample_every and (k % cfg.sample_every == 0 or k == stop):
                run.write_samples()
            if k % cfg.save_every == 0 or k == stop:
                run.save()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()


def log_row(run: Run, result: StepResult, mean_loss: torch.Tensor, count: int, dt: float, elapsed: float) -> dict:
    """One metrics row; the only host synchronisation of the loop (every --log-every steps)."""
    if run.dist.enabled:
        torch.distributed.all_reduce(mean_loss)
        mean_loss = mean_loss / run.dist.world_size
    return {
        "step": run.trainer.step_index,
        "loss": float(mean_loss.item()),
        "n_k": result.n_k,
        "teacher_mu": result.teacher_decay,
        "grad_norm": float(result.grad_norm.item()) if result.grad_norm is not None else None,
        "images_per_s": count * run.cfg.batch / max(dt, 1e-9),
        "lr": run.cfg.lr,
        "elapsed_s": round(elapsed, 3),
    }


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, resume, explicit = resolve(argv)
    train(cfg, resume, explicit)


if __name__ == "__main__":
    main()
