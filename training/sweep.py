"""Hyperparameter search over training runs: `python -m training.sweep SPACE.toml [--out STUDY] [--trials N]`.

Optuna picks each trial's parameters (TPE after a few random trials); a trial is a real training run in its
own run folder, STUDY/trials/NNNN, with SPACE.toml's [train] options and the trial's parameters, and its
objective is the project's evaluation (training.evaluate) of the final EMA model: the mean over
`objective_steps` (default 1- and 2-step sampling) of the Fréchet distance to the held-out digits, with
`eval_samples` images each. Every `report_every` steps the checkpoint just written is scored the same way on
`report_samples` images and reported; a median pruner stops a trial whose score is worse than the median of
earlier trials at the same step. The study lives in a database: STUDY/study.db (SQLite) or `--storage URL`,
any SQLAlchemy URL (a PostgreSQL one, with its driver installed, lets several machines run trials of
one study, each with its own --out). Rerunning continues the study up to --trials finished (complete or
pruned) trials. Ctrl-C or SIGTERM fails the running trial; a trial of a killed process is failed by Optuna's
heartbeat once it is 2 × --heartbeat seconds stale and queued once more with the same parameters. After
every trial the study folder gets results.md, results.csv, history.png, intermediate.png (the reported
scores) and, from 2 complete trials on, importances.png (fANOVA).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import signal
import statistics
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from models import cli

from .config import ConfigError, RunConfig, resolve_options
from .evaluate import evaluate_checkpoint
from .loop import StepResult
from .run import train
from .state import CheckpointDir

log = logging.getLogger("training.sweep")

ParamType = Literal["float", "int", "categorical"]
Direction = Literal["minimize", "maximize"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what --trials counts
SET_BY_SWEEP = {  # [train] options the sweep sets itself, and where they come from
    "out": "STUDY/trials/NNNN",
    "steps": "[study] steps",
    "save_every": "[study] report_every",
    "stop_after": "the sweep (a trial runs to the end)",
}


class SweepError(cli.CliError):
    """A SPACE.toml or sweep option that cannot be used; the message names the key, the value and what is allowed."""


# ---------------------------------------------------------------------------------------------------
# SPACE.toml
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched option: a RunConfig field, its type, and its range (low/high, log scale) or choices."""

    name: str
    type: ParamType
    low: float | None = None
    high: float | None = None
    log: bool = False  # sample uniformly in log space
    step: float | None = None  # grid spacing (float/int); None = continuous (int: 1)
    choices: tuple[Any, ...] = ()  # categorical values (str, int, float, bool)

    def suggest(self, trial: optuna.Trial) -> Any:
        return SUGGEST[self.type](trial, self)

    def extremes(self) -> tuple[Any, Any]:
        """Two values of the range's type that bound it: the ends (numbers) or the first and last choice."""
        if self.type == "categorical":
            return self.choices[0], self.choices[-1]
        kind = float if self.type == "float" else int
        return kind(self.low), kind(self.high)


SUGGEST: dict[str, Callable[[optuna.Trial, Param], Any]] = {
    "float": lambda t, p: t.suggest_float(p.name, p.low, p.high, log=p.log, step=p.step),
    "int": lambda t, p: t.suggest_int(p.name, int(p.low), int(p.high), log=p.log, step=int(p.step or 1)),
    "categorical": lambda t, p: t.suggest_categorical(p.name, list(p.choices)),
}


@dataclass(frozen=True)
class SweepSpec:
    """A parsed SPACE.toml: the [study] settings, the [train] options and the [space.NAME] parameters."""

    name: str  # the study's name in the storage
    direction: Direction = "minimize"  # the Fréchet distance: lower is better
    trials: int = 12  # finished (complete or pruned) trials to reach; --trials overrides
    steps: int = 1000  # per-trial budget: training iterations K (also the curriculum's horizon)
    report_every: int = 100  # checkpoint, cheap score and pruning check every M steps
    report_samples: int = 500  # images per step count of the cheap intermediate score
    eval_samples: int = 2000  # images per step count of the final objective (the evaluate CLI's default)
    objective_steps: tuple[int, ...] = (1, 2)  # the objective is the mean FD over these sampling step counts
    startup_trials: int = 4  # random trials before TPE; trials finished before the pruner may prune
    warmup_steps: int = 0  # no pruning at reports before this training step
    eval_seed: int = 0  # sampling seed of every score (the same noise for every trial)
    seed: int = 0  # the sampler's seed (offset by the number of trials already in the study)
    train: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    space: tuple[Param, ...] = ()

    def trial_options(self, params: Mapping[str, Any], folder: Path) -> dict[str, Any]:
        """The run options of one trial: [train], the trial's parameters, and what the sweep sets."""
        sets = {"out": str(folder), "steps": self.steps, "save_every": self.report_every}
        return {"sample_every": self.steps, **self.train, **params, **sets}


STUDY_KEYS = {f.name for f in dataclasses.fields(SweepSpec)} - {"train", "space"}
PARAM_KEYS = {f.name for f in dataclasses.fields(Param)} - {"name"}


def _expect(ok: bool, where: str, value: Any, allowed: str) -> None:
    if not ok:
        raise SweepError(f"{where} = {value!r}: must be {allowed}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise SweepError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _int_at_least(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _step_counts(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(map(_int_at_least(1), value)) and len(set(value)) == len(value)
    )


# Each [study] key: (test, what the error says is allowed).
STUDY_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string"),
    "direction": (lambda v: v in ("minimize", "maximize"), "'minimize' or 'maximize'"),
    "trials": (_int_at_least(1), "an integer >= 1"),
    "steps": (_int_at_least(1), "an integer >= 1"),
    "report_every": (_int_at_least(1), "an integer >= 1"),
    "report_samples": (_int_at_least(2), "an integer >= 2 (a Fréchet distance needs 2 samples)"),
    "eval_samples": (_int_at_least(2), "an integer >= 2 (a Fréchet distance needs 2 samples)"),
    "objective_steps": (_step_counts, "a list of distinct sampling step counts, e.g. [1, 2]"),
    "startup_trials": (_int_at_least(1), "an integer >= 1"),
    "warmup_steps": (_int_at_least(0), "an integer >= 0"),
    "eval_seed": (_int_at_least(0), "an integer >= 0"),
    "seed": (_int_at_least(0), "an integer >= 0"),
}
assert STUDY_CHECKS.keys() == STUDY_KEYS


def parse_study(table: Any, src: str) -> dict[str, Any]:
    """The [study] table, checked key by key; name is required."""
    where = f"{src}: [study]"
    _expect(isinstance(table, dict), where, table, "a table")
    table = {k.replace("-", "_"): v for k, v in table.items()}
    _unknown(table, STUDY_KEYS, where)
    if "name" not in table:
        raise SweepError(f"{where} name: missing; give the study a name")
    for key, value in table.items():
        test, allowed = STUDY_CHECKS[key]
        _expect(test(value), f"{where} {key}", value, allowed)
    if "objective_steps" in table:
        table["objective_steps"] = tuple(table["objective_steps"])
    return table


def parse_param(name: str, table: Any, where: str) -> Param:
    """One [space.NAME] table: type float/int (low < high, log needs low > 0) or categorical (choices)."""
    _expect(isinstance(table, dict), where, table, "a table with type = 'float' | 'int' | 'categorical'")
    _unknown(table, PARAM_KEYS, where)
    kind = table.get("type")
    _expect(kind in SUGGEST, f"{where} type", kind, f"one of {sorted(SUGGEST)}")
    if kind == "categorical":
        extra = sorted(set(table) - {"type", "choices"})
        _expect(not extra, f"{where} {extra}", "set", "absent for a categorical parameter (only choices)")
        choices = table.get("choices")
        ok = isinstance(choices, list) and choices and all(isinstance(c, str | int | float | bool) for c in choices)
        _expect(bool(ok), f"{where} choices", choices, "a non-empty list of strings, numbers or booleans")
        _expect(len(set(map(repr, choices))) == len(choices), f"{where} choices", choices, "distinct values")
        return Param(name, kind, choices=tuple(choices))
    _expect("choices" not in table, f"{where} choices", table.get("choices"), f"absent for a {kind} parameter")
    check = _number if kind == "float" else lambda v: isinstance(v, int) and not isinstance(v, bool)
    for key in ("low", "high"):
        _expect(key in table and check(table[key]), f"{where} {key}", table.get(key), f"a {kind} number")
    low, high, log_scale, step = table["low"], table["high"], table.get("log", False), table.get("step")
    _expect(low < high, f"{where} low", low, f"< high ({high})")
    _expect(isinstance(log_scale, bool), f"{where} log", log_scale, "true or false")
    _expect(not log_scale or low > 0, f"{where} low", low, "> 0 with log = true")
    if step is not None:
        _expect(check(step) and step > 0, f"{where} step", step, f"a positive {kind} number")
        _expect(not log_scale, f"{where} step", step, "absent with log = true (Optuna cannot combine them)")
    return Param(name, kind, low, high, log_scale, step)


def parse_space(table: Any, train: Mapping[str, Any], src: str) -> tuple[Param, ...]:
    """The [space] table: one sub-table per RunConfig option to search, none also set in [train]."""
    _expect(isinstance(table, dict) and table, f"{src}: [space]", table, "a table of [space.OPTION] tables")
    allowed = {f.name for f in dataclasses.fields(RunConfig)} - set(SET_BY_SWEEP)
    params = []
    for raw, sub in table.items():
        name, where = raw.replace("-", "_"), f"{src}: [space.{raw}]"
        if name in SET_BY_SWEEP:
            raise SweepError(f"{where}: {name} is set by the sweep ({SET_BY_SWEEP[name]}), it cannot be searched")
        if name not in allowed:
            raise SweepError(f"{where}: not a training option; allowed: {sorted(allowed)}")
        if name in train:
            raise SweepError(f"{where}: {name} is also set in [train]; keep it in one place")
        params.append(parse_param(name, sub, where))
    return tuple(params)


def parse_train(table: Any, src: str) -> dict[str, Any]:
    """The [train] table: training options as in `training.train --config` (keys as the flags, - or _)."""
    _expect(isinstance(table, dict), f"{src}: [train]", table, "a table of training options")
    options = {k.replace("-", "_"): v for k, v in table.items()}
    for name in sorted(options.keys() & SET_BY_SWEEP.keys()):
        raise SweepError(f"{src}: [train] {name}: set by the sweep ({SET_BY_SWEEP[name]}); remove it")
    allowed = {f.name for f in dataclasses.fields(RunConfig)} - set(SET_BY_SWEEP)
    _unknown(options, allowed, f"{src}: [train]")
    if options.get("preset", "digits") != "digits":
        raise SweepError(
            f"{src}: [train] preset = {options['preset']!r}: the sweep scores with the digits Fréchet distance; "
            "only 'digits' is supported"
        )
    return options


def check_trial_configs(spec: SweepSpec, src: str) -> None:
    """Resolve the run config at each parameter's two extremes (others at their low end): errors show now."""
    base = {p.name: p.extremes()[0] for p in spec.space}
    for param in spec.space:
        for value in param.extremes():
            try:
                resolve_options(spec.trial_options({**base, param.name: value}, Path("STUDY/trials/0000")))
            except ConfigError as e:
                message = f"{src}: [space.{param.name}] a trial with {param.name} = {value!r} would fail: {e}"
                raise SweepError(message) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check SPACE.toml; every mistake raises SweepError naming the key."""
    src = str(path)
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise SweepError(f"SPACE {src}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepError(f"SPACE {src}: not valid TOML ({e})") from None
    _unknown(doc, {"study", "train", "space"}, src)
    for key in ("study", "space"):
        if key not in doc:
            raise SweepError(f"{src}: the [{key}] table is missing")
    study = parse_study(doc["study"], src)
    train_options = parse_train(doc.get("train", {}), src)
    spec = SweepSpec(**study, train=train_options, space=parse_space(doc["space"], train_options, src))
    if spec.warmup_steps >= spec.steps:
        log.warning(
            "%s: [study] warmup_steps %d >= steps %d: no trial will be pruned", src, spec.warmup_steps, spec.steps
        )
    check_trial_configs(spec, src)
    return spec


# ---------------------------------------------------------------------------------------------------
# One trial
# ---------------------------------------------------------------------------------------------------


def fd_score(checkpoint: Path, spec: SweepSpec, samples: int, device: str) -> tuple[float, dict[int, float]]:
    """The mean over `objective_steps` of the digits Fréchet distance, and each; NaN when sampling diverged."""
    try:
        report = evaluate_checkpoint(
            checkpoint, spec.objective_steps, n_samples=samples, seed=spec.eval_seed, device=device
        )
    except ValueError as e:  # non-finite samples of a diverged model
        if INTERRUPTED.is_set():  # a signal raised inside torch's `with torch.device(...)` comes out as this error
            raise KeyboardInterrupt(f"interrupted while scoring {checkpoint}") from e
        log.warning("scoring %s failed (%s): counted as NaN", checkpoint, e)
        return math.nan, {}
    fds = {row["steps"]: row["frechet_distance"] for row in report["results"]}
    return statistics.fmean(fds.values()), fds


class Reporter:
    """The trial's training callback: after each checkpoint, score it cheaply, report, and prune if hopeless."""

    def __init__(self, trial: optuna.Trial, spec: SweepSpec, folder: Path, device: str) -> None:
        self.trial, self.spec, self.device = trial, spec, device
        self.ckpts = CheckpointDir(folder / "checkpoints")
        self.step = 0  # a trial always starts at step 0
        self.eval_s = 0.0  # time spent scoring, left out of the training time
        self.t0 = time.perf_counter()

    def train_seconds(self) -> float:
        return round(time.perf_counter() - self.t0 - self.eval_s, 1)

    def __call__(self, _: StepResult) -> None:
        # run_steps calls back before it checkpoints step k, so the checkpoint of step k−1 is scored at step k.
        self.step += 1
        done = self.step - 1
        if done == 0 or done % self.spec.report_every:
            return
        t0 = time.perf_counter()
        value, _ = fd_score(self.ckpts.paths(done).model, self.spec, self.spec.report_samples, self.device)
        self.eval_s += time.perf_counter() - t0
        log.info("trial %d step %d: score %.4f", self.trial.number, done, value)
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"non-finite score at step {done}")
        self.trial.report(value, done)
        if self.trial.should_prune():
            self.trial.set_user_attr("train_s", self.train_seconds())
            raise optuna.TrialPruned(f"score {value:.4f} at step {done} is worse than the median")


def eval_device(train_options: Mapping[str, Any]) -> str:
    """Score on the device the trials train on."""
    wanted = train_options.get("device", "auto")
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


def run_trial(trial: optuna.Trial, spec: SweepSpec, study_dir: Path) -> float:
    """Train one trial's run folder to the budget and return its objective."""
    params = {p.name: p.suggest(trial) for p in spec.space}
    folder = study_dir / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("run", str(folder.relative_to(study_dir)))
    cfg, explicit = resolve_options(spec.trial_options(params, folder))
    device = eval_device(spec.train)
    log.info("trial %d: %s -> %s", trial.number, params, folder)
    reporter = Reporter(trial, spec, folder, device)
    train(cfg, explicit=explicit, on_step=reporter)
    trial.set_user_attr("train_s", reporter.train_seconds())
    final = CheckpointDir(folder / "checkpoints").latest()
    assert final is not None and final.step == spec.steps, final
    value, fds = fd_score(final.model, spec, spec.eval_samples, device)
    for k, fd in fds.items():
        trial.set_user_attr(f"fd_{k}step", fd)
    return value


# ---------------------------------------------------------------------------------------------------
# Results: results.md, results.csv, history.png, importances.png
# ---------------------------------------------------------------------------------------------------


def result_rows(study: optuna.Study, spec: SweepSpec) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        last_report = max(t.intermediate_values) if t.intermediate_values else None
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                **{p.name: t.params.get(p.name) for p in spec.space},
                "objective": t.value,
                **{f"fd_{k}step": t.user_attrs.get(f"fd_{k}step") for k in spec.objective_steps},
                "last_report_step": last_report,
                "last_report": t.intermediate_values[last_report] if last_report is not None else None,
                "train_s": t.user_attrs.get("train_s"),
                "retry_of": t.system_attrs.get("failed_trial"),
                "run": t.user_attrs.get("run"),
            }
        )
    return rows


def cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], best: int | None, title: str) -> str:
    head = list(rows[0]) if rows else ["trial"]
    lines = [
        f"# {title}",
        "",
        f"Best trial: {best if best is not None else '–'}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in rows:
        cells = [cell(row[k]) for k in head]
        if row["trial"] == best:
            cells[0] = f"**{cells[0]}** (best)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    return min(complete, key=lambda t: sign * t.value)


def save_plots(study: optuna.Study, study_dir: Path) -> None:
    """history.png (objective by trial), intermediate.png (reported scores) and, from 2 complete trials on,
    importances.png (fANOVA)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    plots = {"history.png": ovm.plot_optimization_history, "intermediate.png": ovm.plot_intermediate_values}
    if complete >= 2:
        plots["importances.png"] = ovm.plot_param_importances
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = plot(study)
            ax.figure.set_size_inches(8, 5)
            ax.figure.tight_layout()
            ax.figure.savefig(study_dir / name, dpi=100)
        except (ValueError, RuntimeError, ZeroDivisionError) as e:  # e.g. importances of constant parameters
            log.warning("%s not drawn: %s", name, e)
        finally:
            plt.close("all")


def write_results(study: optuna.Study, spec: SweepSpec, study_dir: Path) -> None:
    """results.md and results.csv (one row per trial) and the plots, rewritten from the storage."""
    rows = result_rows(study, spec)
    best = best_trial(study)
    title = f"Study {study.study_name}: {spec.direction} mean FD over {list(spec.objective_steps)}-step sampling"
    (study_dir / "results.md").write_text(markdown_table(rows, best.number if best else None, title))
    with (study_dir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    save_plots(study, study_dir)


# ---------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------


def open_storage(url: str, heartbeat: int) -> optuna.storages.RDBStorage:
    """The study database, with a heartbeat so a killed worker's trial is failed and queued again once."""
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat,
            grace_period=2 * heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )


def open_study(spec: SweepSpec, storage: optuna.storages.RDBStorage, study_dir: Path) -> optuna.Study:
    """Create the study or continue it (same name and direction); seed the sampler past the trials it has."""
    study = optuna.create_study(study_name=spec.name, storage=storage, direction=spec.direction, load_if_exists=True)
    if study.direction.name.lower() != spec.direction:
        raise SweepError(
            f"[study] direction = {spec.direction!r}: the stored study {spec.name!r} is "
            f"{study.direction.name.lower()}; use another name"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a killed worker's trial, once its heartbeat is stale
    existing = len(study.get_trials(deepcopy=False))
    if not existing and any((study_dir / "trials").glob("*")):
        raise SweepError(
            f"--out {study_dir}: trials/ holds run folders but the study {spec.name!r} has no trials; "
            "choose another --out or remove them"
        )
    check_space_unchanged(study, spec)
    # A fixed seed alone would replay the first run's random trials on every rerun.
    sampler = optuna.samplers.TPESampler(n_startup_trials=spec.startup_trials, seed=spec.seed + existing)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials, n_warmup_steps=spec.warmup_steps)
    return optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler, pruner=pruner)


def check_space_unchanged(study: optuna.Study, spec: SweepSpec) -> None:
    """Record SPACE.toml in a new study; warn when a continued study's differs."""
    current = json.loads(json.dumps(dataclasses.asdict(spec)))  # as the storage gives it back (lists, not tuples)
    saved = study.user_attrs.get("space")
    if saved is None:
        study.set_user_attr("space", current)
    elif saved != current:
        log.warning("SPACE.toml differs from the one study %r began with; its trials may not be comparable", spec.name)


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def sweep(spec: SweepSpec, study_dir: Path, trials: int, storage_url: str | None = None, heartbeat: int = 60) -> int:
    """Run trials until the study has `trials` finished ones; returns how many it has."""
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(storage_url or f"sqlite:///{study_dir.resolve() / 'study.db'}", heartbeat)
    study = open_study(spec, storage, study_dir)
    remaining = trials - finished(study)
    log.info("study %r: %d finished trial(s), %d to go", spec.name, finished(study), max(remaining, 0))
    try:
        if remaining > 0:
            study.optimize(
                lambda trial: run_trial(trial, spec, study_dir),
                n_trials=remaining,
                catch=(cli.CliError, ValueError, RuntimeError),  # a trial's bad combination or divergence fails it
                callbacks=[
                    optuna.study.MaxTrialsCallback(trials, states=FINISHED),  # across all workers of the study
                    lambda s, _: write_results(s, spec, study_dir),
                ],
            )
    finally:
        write_results(study, spec, study_dir)
    return finished(study)


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(prog="python -m training.sweep", description=__doc__.split("\n")[0])
    p.add_argument("space", metavar="SPACE.toml", help="the study: [study], [train] and [space.OPTION] tables")
    p.add_argument("--out", type=Path, help="study folder (default: sweeps/<study name>)")
    p.add_argument("--trials", type=int, help="finished trials to reach (default: [study] trials)")
    p.add_argument("--storage", help="SQLAlchemy URL of the study database (default: sqlite:///STUDY/study.db)")
    p.add_argument(
        "--heartbeat",
        type=int,
        default=60,
        help="seconds between a trial's heartbeats; a trial silent for twice that is failed",
    )
    return p


INTERRUPTED = threading.Event()  # set by a signal: the interrupt stands even if a library swallowed its exception


def raise_interrupt(signum: int, _frame: Any) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt(f"signal {signum}")


def command(argv: Sequence[str] | None = None) -> None:
    """The sweep command; mistakes raise `models.cli.CliError`s."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    if args.trials is not None and args.trials < 1:
        raise SweepError(f"--trials {args.trials}: must be >= 1")
    if args.heartbeat < 1:
        raise SweepError(f"--heartbeat {args.heartbeat}: must be >= 1 second")
    spec = load_spec(args.space)
    study_dir = args.out or Path("sweeps") / spec.name
    INTERRUPTED.clear()
    previous = signal.signal(signal.SIGTERM, raise_interrupt)  # SIGTERM fails the running trial like Ctrl-C
    try:
        done = sweep(spec, study_dir, args.trials or spec.trials, args.storage, args.heartbeat)
    except KeyboardInterrupt:
        log.warning("interrupted: the running trial is marked failed; rerun the same command to continue")
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("study %r: %d finished trial(s); results in %s", spec.name, done, study_dir / "results.md")


def main(argv: Sequence[str] | None = None) -> None:
    """`command`, with a mistake printed as one line `error: ...` and exit code 2."""
    cli.run(command, argv)


if __name__ == "__main__":
    main()
