"""The run's configuration: a typed frozen `RunConfig`, its per-preset defaults, and the one validation pass.

Options come from a JSON/TOML file and from flags (flags win); `resolve_options` merges them over the
preset's defaults and `validate` checks every field's type, choice and range once, raising `ConfigError`
with the flag, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from models.cli import CliError
from models.config import ModelConfig, preset

from .augment import AUGMENT_DIM, OPS
from .recipe import (
    TECHNIQUE_FLAGS,
    Curriculum,
    Distance,
    EctWeighting,
    Recipe,
    Teacher,
    Timesteps,
    Weighting,
    recipe,
)

PresetName = Literal["digits", "cifar10", "imagenet64"]  # the keys of models.config.PRESETS
RecipeName = Literal["ict", "ct", "edm", "ect", "cd"]  # the keys of training.recipe.RECIPES
Precision = Literal["fp32", "bf16", "fp16"]
DeviceRequest = Literal["auto", "cpu", "cuda"]
ClassCond = Literal["auto", "yes", "no"]

DEFAULT_MID_SIGMA = 0.821  # iCT's two-step CIFAR-10 schedule (80, 0.821) until a search rewrites it


class ConfigError(CliError):
    """An option that cannot be used; the message names the flag (or file), the value and what is allowed."""


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

    out: str  # the run folder
    preset: PresetName = "digits"
    data: str = "digits"  # digits | cifar10:PATH | folder:PATH
    data_fraction: float = 1.0  # train on this fixed, seeded fraction of the data (small-data experiments)
    augment: float = 0.0  # EDM augmentation: probability p of each op (EDM: 0.12), labels fed to the model; 0 = off
    augment_ops: str | None = None  # comma-separated subset of augment.OPS; None: all of them (EDM's)
    steps: int = 6000  # K, the total iterations (the curriculum's horizon)
    batch: int = 128  # global batch, split across ranks
    lr: float = 1e-3  # RAdam learning rate
    ema_decay: float = 0.999  # EMA of the student, for sampling and export
    ema_warmup: bool = True  # decay min(ema_decay, (1 + k)/(10 + k)) so short runs forget the initial weights
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the iCT paper does not clip)
    seed: int = 0  # initial weights, data order and noise
    precision: Precision = "fp32"  # autocast dtype; fp16 adds grad scaling
    compile: bool = False  # torch.compile the student
    device: DeviceRequest = "auto"  # auto: CUDA when available
    save_every: int = 500  # checkpoint every M steps
    sample_every: int = 500  # sample grid every M steps; 0 = never
    log_every: int = 50  # metrics row every M steps (the loop's only host sync)
    keep: int = 2  # checkpoints kept on disk
    stop_after: int | None = None  # stop this invocation after that many steps (checkpointing); resume later
    recipe: RecipeName = "ict"
    distance: Distance | None = None  # None: the recipe's choice (likewise for the technique fields below)
    timesteps: Timesteps | None = None
    curriculum: Curriculum | None = None
    teacher: Teacher | None = None
    weighting: Weighting | None = None
    fourier_scale: float | None = None
    dropout: float | None = None
    s0: int | None = None  # curriculum start
    s1: int | None = None  # curriculum end
    mu0: float | None = None  # EMA-teacher decay at N = s0 (CT)
    huber_c: float | None = None  # pseudo-Huber c; None = iCT's 0.00054·√d
    model_channels: int | None = None  # preset override
    num_res_blocks: int | None = None  # preset override
    class_cond: ClassCond = "auto"  # auto: conditional when the preset is and the data have labels
    mid_sigma: float = DEFAULT_MID_SIGMA  # middle σ of the recommended 2-step schedule
    init: str | None = None  # ECT: the pretrained denoiser to tune, a run folder (its newest checkpoint) or a file
    teacher_model: str | None = None  # CD: the pretrained denoiser to distil, a file or a run folder
    ect_stages: int | None = None  # ECT: stages of the mapping function over the run (default 8)
    ect_stage_steps: int | None = None  # ECT: iterations per stage; None: the run's steps / ect_stages
    ect_weighting: EctWeighting | None = None  # ECT: gap, 1/(t − r) (default), or edm, EDM's λ(t)
    cd_levels: int | None = None  # CD: Karras levels N of the teacher's steps (default 18; CM: 40 on ImageNet 64)

    def recipe_obj(self) -> Recipe:
        fields = (*TECHNIQUE_FLAGS.values(), "s0", "s1", "mu0", "huber_c", "ect_stages", "ect_stage_steps",
                  "ect_weighting", "cd_levels")
        overrides = {f: getattr(self, f) for f in fields}
        return recipe(self.recipe, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The allowed range of each numeric option: (test, what the error says is allowed).
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (lambda v: v >= 1, ">= 1"),
    "data_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "augment": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = off)"),
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
    "huber_c": (lambda v: v is None or (v > 0 and math.isfinite(v)), "> 0"),
    "mid_sigma": (lambda v: 0.002 < v < 80, "strictly between sigma_min and sigma_max"),
    "ect_stages": (lambda v: v is None or v >= 1, ">= 1"),
    "ect_stage_steps": (lambda v: v is None or v >= 1, ">= 1"),
    "cd_levels": (lambda v: v is None or v >= 2, ">= 2"),
}
# Options only some recipes read: option -> those recipes. The others refuse them rather than ignore them.
CONSISTENCY_TRAINING = ("ict", "ct")
RECIPE_OPTIONS: dict[str, tuple[str, ...]] = {
    "init": ("ect",),
    "ect_stages": ("ect",),
    "ect_stage_steps": ("ect",),
    "ect_weighting": ("ect",),
    "teacher_model": ("cd",),
    "cd_levels": ("cd",),
    "curriculum": CONSISTENCY_TRAINING,
    "s0": CONSISTENCY_TRAINING,
    "s1": CONSISTENCY_TRAINING,
    "timesteps": (*CONSISTENCY_TRAINING, "cd"),  # CD: the law of the level index on its fixed grid
    "weighting": (*CONSISTENCY_TRAINING, "cd"),
    "teacher": (*CONSISTENCY_TRAINING, "ect", "cd"),  # ECT, CD: stop-gradient student or θ⁻ (EMA, fixed μ = --mu0)
    "mu0": (*CONSISTENCY_TRAINING, "ect", "cd"),
    "distance": (*CONSISTENCY_TRAINING, "ect", "cd"),
    "huber_c": (*CONSISTENCY_TRAINING, "ect", "cd"),
}
# Recipes that start from a pretrained denoiser: recipe -> the option naming it. Their architecture is the
# denoiser's, so the options that would change it are refused.
PRETRAINED_OPTIONS: dict[str, str] = {"ect": "init", "cd": "teacher_model"}
ARCHITECTURE_OPTIONS = ("model_channels", "num_res_blocks", "fourier_scale")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunConfig)


def choices(name: str) -> list[str] | None:
    """The allowed values of a `Literal` option (alone or `| None`); None for other options."""
    hint = field_types()[name]
    literals = [a for a in (hint, *get_args(hint)) if get_origin(a) is Literal]
    return list(get_args(literals[0])) if literals else None


def accepts(hint: Any, value: Any) -> bool:
    """Whether `value` has the type `hint` (a class, a Literal, or a union of them); bools are not numbers."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        return any(accepts(alt, value) for alt in get_args(hint))
    if get_origin(hint) is Literal:
        return isinstance(value, str) and value in get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, hint) and (hint is bool or not isinstance(value, bool))


def validate(cfg: RunConfig, origin: Mapping[str, str] | None = None) -> None:
    """Check every option's type, choice and range in one pass; `origin` names where file values came from."""
    origin = origin or {}
    annotations = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
    for name, hint in field_types().items():
        value = getattr(cfg, name)
        if not accepts(hint, value):
            if choices(name) is not None:
                raise ConfigError(f"{flag(name)} {value!r} is not one of {choices(name)}")
            source = f"{origin[name]}: option {name} =" if name in origin else flag(name)
            raise ConfigError(f"{source} {value!r} must be of type {annotations[name]}")
        if name in RANGES and not RANGES[name][0](value):
            raise ConfigError(f"{flag(name)} {value} must be {RANGES[name][1]}")
    try:
        cfg.recipe_obj()
    except ValueError as e:
        raise ConfigError(f"{e} (see --recipe and the technique flags)") from None
    validate_recipe_options(cfg)
    validate_augment_ops(cfg)


def augment_ops(cfg: RunConfig) -> tuple[str, ...] | None:
    """--augment-ops as names (None: every op)."""
    return None if cfg.augment_ops is None else tuple(op.strip() for op in cfg.augment_ops.split(","))


def validate_augment_ops(cfg: RunConfig) -> None:
    ops = augment_ops(cfg)
    if ops is None:
        return
    if cfg.augment == 0:
        raise ConfigError("--augment-ops needs --augment P > 0 (the probability of each op)")
    unknown = [op for op in ops if op not in OPS]
    if unknown or len(set(ops)) != len(ops):
        raise ConfigError(f"--augment-ops {cfg.augment_ops!r}: each op once, from {', '.join(OPS)}")


def validate_recipe_options(cfg: RunConfig) -> None:
    """Options only with the recipes that read them; --init and --teacher-model, which ECT and CD need, must exist."""
    for name, readers in RECIPE_OPTIONS.items():
        if getattr(cfg, name) is not None and cfg.recipe not in readers:
            allowed = " or ".join(readers)
            raise ConfigError(f"{flag(name)} is only used with --recipe {allowed}, not --recipe {cfg.recipe}")
    option = PRETRAINED_OPTIONS.get(cfg.recipe)
    if option is None:
        return
    path = getattr(cfg, option)
    if path is None:
        raise ConfigError(f"--recipe {cfg.recipe} needs {flag(option)} RUN_OR_FILE: the pretrained denoiser (a "
                          "--recipe edm run folder or its exported .safetensors file)")
    if not Path(path).exists():
        raise ConfigError(f"{flag(option)} {path}: no such file or run folder")
    for name in ARCHITECTURE_OPTIONS:
        if getattr(cfg, name) is not None:
            raise ConfigError(f"{flag(name)}: --recipe {cfg.recipe} keeps the architecture of {flag(option)} {path}")


def read_config_file(path: str) -> dict[str, Any]:
    """The options of a JSON or TOML file (keys as the flags, - or _); unknown keys are an error."""
    file = Path(path)
    kind = "TOML" if file.suffix == ".toml" else "JSON"
    try:
        text = file.read_text()
        doc = tomllib.loads(text) if kind == "TOML" else json.loads(text)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError are ValueErrors
        raise ConfigError(f"--config {path}: not valid {kind} ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: must hold a table/object of options")
    allowed = {f.name for f in dataclasses.fields(RunConfig)}
    options = {k.replace("-", "_"): v for k, v in doc.items()}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"--config {path}: unknown options {unknown}; allowed: {sorted(allowed)}")
    return options


def resolve_options(flags: Mapping[str, Any], config_file: str | None = None) -> tuple[RunConfig, set[str]]:
    """Defaults < the preset's defaults < the config file < flags, validated; also the options given explicitly."""
    file_options = read_config_file(config_file) if config_file is not None else {}
    origin = {name: f"--config {config_file}" for name in file_options.keys() - flags.keys()}
    explicit = {**file_options, **flags}
    if "out" not in explicit:
        raise ConfigError("--out RUN_FOLDER is required")
    name = explicit.get("preset", "digits")
    defaults = PRESET_DEFAULTS.get(name, {}) if isinstance(name, str) else {}
    cfg = RunConfig(**{**defaults, **explicit})
    validate(cfg, origin)
    return cfg, set(explicit)


def model_config(cfg: RunConfig, rec: Recipe, num_data_classes: int) -> ModelConfig:
    """The preset with the run's overrides: width, depth, the recipe's Fourier scale and dropout, classes."""
    base = preset(cfg.preset)
    changes: dict[str, Any] = {"fourier_scale": rec.fourier_scale}
    if rec.dropout is not None:
        changes["dropout"] = rec.dropout
    for name in ("model_channels", "num_res_blocks"):
        if getattr(cfg, name) is not None:
            changes[name] = getattr(cfg, name)
    if cfg.augment > 0:
        changes["augment_dim"] = AUGMENT_DIM  # the model is conditioned on the augmentation labels
    if cfg.class_cond == "yes" and not num_data_classes:
        raise ConfigError(f"--class-cond yes needs labelled data; --data {cfg.data} has no labels")
    conditional = cfg.class_cond == "yes" or (cfg.class_cond == "auto" and base.num_classes > 0)
    changes["num_classes"] = num_data_classes if conditional else 0
    try:
        return base.replace(**changes)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def schedules(cfg: RunConfig, model_cfg: ModelConfig) -> dict[int, list[float]]:
    """The recommended σ lists by step count: {1: [σ_max], 2: [σ_max, mid]}; none for a denoiser (Heun samples it)."""
    if model_cfg.kind == "denoiser":
        return {}
    return {1: [model_cfg.sigma_max], 2: [model_cfg.sigma_max, cfg.mid_sigma]}
