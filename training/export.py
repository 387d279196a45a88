"""Export a run's EMA weights as a serving checkpoint: `python -m training.export RUN_DIR --out FILE.safetensors`.

The file is the models/ format: EMA weights, architecture, class names, the recommended sampling
schedules ({1: [σ_max], 2: [σ_max, mid]}; mid from --mid-sigma, else the run's config) and provenance
(git commit, recipe, steps, data). `python -m training.evaluate FILE --search-mid-sigma` may rewrite mid.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from models import checkpoint, cli
from models.checkpoint import CheckpointError
from models.sampling import validate_sigmas

from .config import schedules
from .rundir import provenance, read_saved
from .state import CheckpointDir

log = logging.getLogger("training.export")


class ExportError(cli.CliError):
    """A run folder, step or schedule that cannot be exported; the message names the argument."""


def export(run_dir: Path, out: Path, step: int | None = None, mid_sigma: float | None = None) -> Path:
    """Write the serving checkpoint of `run_dir` (its newest checkpoint, or `step`) to `out`."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ExportError(f"RUN_DIR {run_dir}: no config.json (not a training run folder)")
    cfg, doc = read_saved(run_dir)
    if mid_sigma is not None:
        cfg = dataclasses.replace(cfg, mid_sigma=mid_sigma)
    ckpts = CheckpointDir(run_dir / "checkpoints")
    try:
        ref = ckpts.paths(step) if step is not None else ckpts.latest()
    except ValueError as e:
        raise ExportError(f"RUN_DIR {run_dir}: {e}") from None
    if ref is None or not ref.model.is_file():
        where = f"--step {step}" if step is not None else f"RUN_DIR {run_dir}"
        raise ExportError(f"{where}: no checkpoint in {run_dir / 'checkpoints'}")
    try:
        ck = checkpoint.load(ref.model)
        sched = schedules(cfg, ck.model.cfg)
        for sigmas in sched.values():
            validate_sigmas(sigmas, ck.model.cfg.sigma_min, ck.model.cfg.sigma_max)
    except (CheckpointError, ValueError) as e:
        raise ExportError(str(e)) from None
    # The training-time provenance (git commit of the code that trained it) wins over today's.
    prov = provenance(cfg, ref.step) | ck.meta.provenance | {"run": run_dir.name, "source_checkpoint": ref.model.name}
    checkpoint.save(out, ck.model, preset=cfg.preset, class_names=doc.get("class_names"), training_step=ref.step,
                    schedules=sched, provenance=prov)
    log.info("exported step %d of %s -> %s (%d bytes)", ref.step, run_dir, out, out.stat().st_size)
    return out


def command(argv: Sequence[str] | None = None) -> None:
    """The export command; mistakes raise `ExportError`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    p = cli.OneLineParser(prog="python -m training.export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a training run folder (holds config.json and checkpoints/)")
    p.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    p.add_argument("--step", type=int, help="export this checkpoint step instead of the newest")
    p.add_argument("--mid-sigma", type=float, help="middle σ of the 2-step schedule (default: the run's)")
    args = p.parse_args(argv)
    export(args.run_dir, args.out, args.step, args.mid_sigma)


def main(argv: Sequence[str] | None = None) -> None:
    """`command`, with a mistake printed as one line `error: ...` and exit code 2."""
    cli.run(command, argv)


if __name__ == "__main__":
    main()
