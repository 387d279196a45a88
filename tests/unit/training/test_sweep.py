"""The sweep's SPACE.toml checks, its mapping to Optuna suggestions, the pruning callback and the results files."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from training import sweep
from training.config import resolve_options
from training.loop import StepResult

ROOT = Path(__file__).resolve().parents[3]

VALID = """
[study]
name = "t"
steps = 20
report_every = 5

[train]
model_channels = 8
batch = 16

[space.lr]
type = "float"
low = 1e-4
high = 1e-2
log = true

[space.s0]
type = "int"
low = 2
high = 10
step = 2

[space.curriculum]
type = "categorical"
choices = ["ict", "ct"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.toml"
    path.write_text(text)
    return path


def test_the_digits_example_searches_the_issues_parameters() -> None:
    spec = sweep.load_spec(ROOT / "bench" / "sweep_digits.toml")
    assert {p.name for p in spec.space} == {"lr", "ema_decay", "s0", "s1", "huber_c"}
    assert spec.direction == "minimize" and spec.objective_steps == (1, 2) and spec.train["preset"] == "digits"


def test_a_valid_space_is_parsed_with_defaults(tmp_path: Path) -> None:
    spec = sweep.load_spec(write(tmp_path, VALID))
    assert (spec.name, spec.steps, spec.report_every, spec.trials, spec.eval_samples) == ("t", 20, 5, 12, 2000)
    assert spec.space == (
        sweep.Param("lr", "float", 1e-4, 1e-2, log=True),
        sweep.Param("s0", "int", 2, 10, step=2),
        sweep.Param("curriculum", "categorical", choices=("ict", "ct")),
    )


SPACE_ONLY = '[study]\nname = "t"\n'
LR = '[space.lr]\ntype = "float"\nlow = 1e-4\nhigh = 1e-2\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[study\n", "not valid TOML"),
        (LR, "the [study] table is missing"),
        (SPACE_ONLY, "the [space] table is missing"),
        ("[study]\nsteps = 5\n" + LR, "[study] name: missing"),
        (SPACE_ONLY + 'direction = "down"\n' + LR, "[study] direction = 'down': must be 'minimize' or 'maximize'"),
        (SPACE_ONLY + "steps = 0\n" + LR, "[study] steps = 0: must be an integer >= 1"),
        (SPACE_ONLY + "report_samples = 1\n" + LR, "[study] report_samples = 1: must be an integer >= 2"),
        (SPACE_ONLY + "objective_steps = [1, 1]\n" + LR, "[study] objective_steps = [1, 1]: must be a list of"),
        (SPACE_ONLY + "budget = 5\n" + LR, "[study]: unknown keys ['budget']"),
        (SPACE_ONLY + "[train]\nout = 'x'\n" + LR, "[train] out: set by the sweep (STUDY/trials/NNNN)"),
        (SPACE_ONLY + "[train]\nlearning_rate = 1\n" + LR, "[train]: unknown keys ['learning_rate']"),
        (SPACE_ONLY + "[train]\npreset = 'cifar10'\n" + LR, "[train] preset = 'cifar10': the sweep scores"),
        (SPACE_ONLY + "[train]\nlr = 0.1\n" + LR, "[space.lr]: lr is also set in [train]"),
        (SPACE_ONLY + "[space.steps]\ntype = 'int'\nlow = 1\nhigh = 2\n", "[space.steps]: steps is set by the sweep"),
        (SPACE_ONLY + "[space.learning_rate]\ntype = 'float'\n", "[space.learning_rate]: not a training option"),
        (SPACE_ONLY + "[space.lr]\ntype = 'uniform'\n", "[space.lr] type = 'uniform': must be one of"),
        (SPACE_ONLY + "[space.lr]\ntype = 'float'\nlow = 1e-4\n", "[space.lr] high = None: must be a float number"),
        (SPACE_ONLY + "[space.lr]\ntype = 'float'\nlow = 1e-2\nhigh = 1e-4\n", "[space.lr] low = 0.01: must be <"),
        (SPACE_ONLY + "[space.lr]\ntype = 'float'\nlow = 0\nhigh = 1\nlog = true\n", "> 0 with log = true"),
        (SPACE_ONLY + "[space.lr]\ntype = 'float'\nlow = 0.1\nhigh = 1\nspan = 2\n", "unknown keys ['span']"),
        (SPACE_ONLY + "[space.s0]\ntype = 'int'\nlow = 1.5\nhigh = 4\n", "[space.s0] low = 1.5: must be a int number"),
        (SPACE_ONLY + "[space.recipe]\ntype = 'categorical'\nchoices = []\n", "[space.recipe] choices = []"),
        (SPACE_ONLY + "[space.recipe]\ntype = 'categorical'\nchoices = ['ict']\nlow = 1\n", "only choices"),
        # Checked against the training config at the ends of each range: the error names the option.
        (
            SPACE_ONLY + "[space.ema_decay]\ntype = 'float'\nlow = 0.9\nhigh = 1.0\n",
            "--ema-decay 1.0 must be in [0, 1)",
        ),
        (
            SPACE_ONLY + "[space.s0]\ntype = 'float'\nlow = 2\nhigh = 4\n",
            "[space.s0] a trial with s0 = 2.0 would fail: --s0 2.0 must be of type int",
        ),
        (SPACE_ONLY + "[space.huber_c]\ntype = 'float'\nlow = 0\nhigh = 1\n", "--huber-c 0.0 must be > 0"),
    ],
)
def test_mistakes_name_the_key_and_what_is_allowed(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(sweep.SweepError) as info:
        sweep.load_spec(write(tmp_path, text))
    assert message in str(info.value)
    assert str(tmp_path / "space.toml") in str(info.value)


def test_the_space_maps_to_trial_suggestions_and_run_options(tmp_path: Path) -> None:
    spec = sweep.load_spec(write(tmp_path, VALID))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        params = {p.name: p.suggest(trial) for p in spec.space}
        assert trial.distributions == {
            "lr": FloatDistribution(1e-4, 1e-2, log=True),
            "s0": IntDistribution(2, 10, step=2),
            "curriculum": CategoricalDistribution(["ict", "ct"]),
        }
        assert 1e-4 <= params["lr"] <= 1e-2 and params["s0"] in (2, 4, 6, 8, 10)
        assert params["curriculum"] in ("ict", "ct")
        options = spec.trial_options(params, tmp_path / "trials" / "0000")
        cfg, _ = resolve_options(options)
        assert (cfg.lr, cfg.s0, cfg.curriculum) == (params["lr"], params["s0"], params["curriculum"])
        assert (cfg.steps, cfg.save_every, cfg.sample_every, cfg.model_channels) == (20, 5, 20, 8)
        assert cfg.out == str(tmp_path / "trials" / "0000")


def test_a_searched_huber_c_reaches_the_recipe(tmp_path: Path) -> None:
    spec = sweep.load_spec(write(tmp_path, SPACE_ONLY + "[space.huber_c]\ntype = 'float'\nlow = 1e-3\nhigh = 1e-1\n"))
    trial = optuna.trial.FixedTrial({"huber_c": 0.02})
    cfg, _ = resolve_options(spec.trial_options({p.name: p.suggest(trial) for p in spec.space}, tmp_path))
    assert cfg.recipe_obj().pseudo_huber_c(64) == 0.02


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_reporter_scores_each_checkpoint_a_step_later_and_prunes(tmp_path: Path, monkeypatch) -> None:
    spec = sweep.load_spec(write(tmp_path, VALID))
    scored: list[Path] = []

    def fake_score(path: Path, *_: object) -> tuple[float, dict]:
        scored.append(path)
        return 3.0, {1: 3.0}

    monkeypatch.setattr(sweep, "fd_score", fake_score)
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    reporter = sweep.Reporter(trial, spec, tmp_path, "cpu")
    result = StepResult(loss=None, grad_norm=None, n_k=11, teacher_decay=0.0)
    for _ in range(11):  # steps 1..11: the checkpoints of steps 5 and 10 are scored at steps 6 and 11
        reporter(result)
    assert [p.name for p in scored] == ["step-00000005.safetensors", "step-00000010.safetensors"]
    study.tell(trial, 1.0)
    assert study.trials[0].intermediate_values == {5: 3.0, 10: 3.0}

    pruned = optuna.create_study(pruner=AlwaysPrune()).ask()
    reporter = sweep.Reporter(pruned, spec, tmp_path, "cpu")
    with pytest.raises(optuna.TrialPruned, match="at step 5"):
        for _ in range(6):
            reporter(result)

    monkeypatch.setattr(sweep, "fd_score", lambda *a: (math.nan, {}))
    reporter = sweep.Reporter(optuna.create_study().ask(), spec, tmp_path, "cpu")
    with pytest.raises(optuna.TrialPruned, match="non-finite"):
        for _ in range(6):
            reporter(result)


def test_results_table_csv_and_plots(tmp_path: Path) -> None:
    spec = sweep.load_spec(write(tmp_path, VALID))
    study = optuna.create_study(study_name="t")
    dists = {
        "lr": FloatDistribution(1e-4, 1e-2, log=True),
        "s0": IntDistribution(2, 10, step=2),
        "curriculum": CategoricalDistribution(["ict", "ct"]),
    }
    rows = [({"lr": 1e-3, "s0": 4, "curriculum": "ict"}, 9.5), ({"lr": 3e-3, "s0": 8, "curriculum": "ct"}, 7.25)]
    for params, value in rows[:1]:
        study.add_trial(
            optuna.create_trial(
                params=params,
                distributions=dists,
                value=value,
                user_attrs={"train_s": 12.5, "fd_1step": 10.0, "fd_2step": 9.0, "run": "trials/0000"},
            )
        )
    sweep.write_results(study, spec, tmp_path)
    assert (tmp_path / "history.png").is_file() and not (tmp_path / "importances.png").exists()

    study.add_trial(optuna.create_trial(params=rows[1][0], distributions=dists, value=rows[1][1]))
    study.add_trial(
        optuna.create_trial(
            params=rows[0][0], distributions=dists, state=TrialState.PRUNED, intermediate_values={5: 20.0}
        )
    )
    sweep.write_results(study, spec, tmp_path)
    md = (tmp_path / "results.md").read_text().splitlines()
    assert "Best trial: 1" in md
    header = "| trial | state | lr | s0 | curriculum | objective | fd_1step | fd_2step | last_report_step | last_report"
    assert any(line.startswith(header) for line in md)
    assert "| 0 | COMPLETE | 0.001 | 4 | ict | 9.5 | 10 | 9 | – | – | 12.5 | – | trials/0000 |" in md
    assert any(line.startswith("| **1** (best) | COMPLETE | 0.003 | 8 | ct | 7.25 |") for line in md)
    assert any(line.startswith("| 2 | PRUNED |") and "| 5 | 20 |" in line for line in md)
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("trial,state,lr,s0,curriculum,objective") and len(csv_lines) == 4
    assert (tmp_path / "importances.png").stat().st_size > 0


def test_sigterm_becomes_a_keyboard_interrupt() -> None:
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        sweep.raise_interrupt(signal.SIGTERM, None)


def test_a_signal_swallowed_while_scoring_still_interrupts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SIGTERM inside `with torch.device("meta")` surfaces as torch's "pop from empty mode stack" RuntimeError,
    which the checkpoint reader turns into a CheckpointError (a ValueError): that must not score NaN and go on."""
    def evaluate(*args: object, **kwargs: object) -> dict:
        try:
            sweep.raise_interrupt(signal.SIGTERM, None)
        except KeyboardInterrupt:
            raise ValueError("the network cannot be built (trying to pop from empty mode stack)") from None
        return {}

    monkeypatch.setattr(sweep, "evaluate_checkpoint", evaluate)
    spec = sweep.load_spec(write(tmp_path, VALID))
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted while scoring"):
            sweep.fd_score(tmp_path / "step.safetensors", spec, 10, "cpu")
    finally:
        sweep.INTERRUPTED.clear()
    monkeypatch.setattr(sweep, "evaluate_checkpoint", lambda *a, **k: (_ for _ in ()).throw(ValueError("nan")))
    assert math.isnan(sweep.fd_score(tmp_path / "step.safetensors", spec, 10, "cpu")[0])  # no signal: diverged
