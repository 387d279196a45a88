"""Train a consistency model: `python -m training.train --preset digits --out runs/digits [options]`.

Runs on one process, or under `torchrun --nproc_per_node=N -m training.train ...` with DDP (NCCL on
GPU, gloo on CPU; the global --batch is split across ranks). Options come from flags and/or a JSON or
TOML --config file (flags win); the resolved configuration is saved as RUN/config.json. The run folder
gets metrics.csv, samples/step-K.png (1-step and 2-step samples from fixed seeds), checkpoints/ and,
when tensorboard is installed, tb/. `--resume` continues a run exactly where its last checkpoint left it.
`--recipe edm` pretrains an EDM denoiser on the same backbone; `--recipe ect --init RUN_OR_FILE` tunes one into
a consistency model and `--recipe cd --teacher-model RUN_OR_FILE` distils one (training/hybrid.py).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from models import cli

from .augment import OPS
from .config import RunConfig, choices, flag, resolve_options
from .recipe import CHOICES
from .run import train

# Numeric options: (name, type, help); each becomes a flag --name-with-dashes.
NUMBER_FLAGS = (
    ("steps", int, "total training iterations K"),
    ("batch", int, "global batch size"),
    ("lr", float, "RAdam learning rate"),
    ("data_fraction", float, "train on this fixed, seeded fraction of the data (0 < F <= 1)"),
    ("augment", float, "EDM augmentation probability per op, labels fed to the model (0 = off; EDM 0.12)"),
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
    ("mu0", float, "EMA-teacher decay: CT's μ0 at N = s0 (0.9); ECT and CD with --teacher ema, the fixed μ (0.95)"),
    ("huber_c", float, "pseudo-Huber c (default: iCT's 0.00054·√d)"),
    ("model_channels", int, "preset override: model_channels"),
    ("num_res_blocks", int, "preset override: num_res_blocks"),
    ("fourier_scale", float, "Fourier embedding scale (iCT 0.02, CT 16)"),
    ("dropout", float, "dropout rate (default: the preset's)"),
    ("mid_sigma", float, "middle σ of the recommended 2-step schedule"),
    ("ect_stages", int, "ECT: stages of r = t·(1 − n(t)/2^(stage+1)) over the run (default 8)"),
    ("ect_stage_steps", int, "ECT: steps per stage, the last stage kept to the end (default: steps / ect-stages)"),
    ("cd_levels", int, "CD: Karras levels N whose adjacent pairs the teacher steps between (default 18; CM: 40)"),
)
# Choice options: name -> help; the allowed values are RunConfig's Literal types.
CHOICE_FLAGS = {
    "preset": "model preset",
    "precision": "autocast precision",
    "device": "where to train (auto: CUDA when available)",
    "recipe": "ict (default); ct, the CT baseline; edm, diffusion pretraining; ect (--init); cd (--teacher-model)",
    **{name: f"override the recipe's {name}" for name in CHOICES},
    "ect_weighting": "ECT: the loss weight, gap 1/(t − r) (ECT §3, default) or edm, EDM's λ(t) = SNR(t) + 1/σ_d²",
    "class_cond": "class-conditional model (auto: when the preset is and the data have labels)",
}


def build_parser() -> argparse.ArgumentParser:
    p = cli.OneLineParser(prog="python -m training.train", description=__doc__.split("\n")[0],
                          argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="JSON or TOML file of options (keys as the flags, - or _); flags override it")
    p.add_argument("--resume", nargs="?", const="latest", choices=["latest", "auto"],
                   help="continue from the run folder's newest checkpoint (auto: start fresh if there is none)")
    p.add_argument("--out", help="run folder (required)")
    p.add_argument("--data", help="digits | cifar10:PATH | folder:PATH")
    p.add_argument("--init", metavar="RUN_OR_FILE", help="--recipe ect: the pretrained denoiser (an edm run or file)")
    p.add_argument("--teacher-model", metavar="RUN_OR_FILE", help="--recipe cd: the pretrained denoiser to distil")
    p.add_argument("--augment-ops", metavar="OPS", help=f"--augment: only these ops, comma-separated, of "
                   f"{', '.join(OPS)} (default: all, EDM's; leave out mirrors for digits or text)")
    for name, kind, help_ in NUMBER_FLAGS:
        p.add_argument(flag(name), type=kind, help=help_)
    for name, help_ in CHOICE_FLAGS.items():
        p.add_argument(flag(name), choices=choices(name), help=help_)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    p.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, help="ramp the EMA decay up (default on)")
    return p


def resolve(argv: Sequence[str] | None) -> tuple[RunConfig, str | None, set[str]]:
    """Defaults < preset defaults < --config file < flags; returns the config, the resume mode, explicit keys."""
    given = vars(build_parser().parse_args(argv))
    resume, config_file = given.pop("resume", None), given.pop("config", None)
    cfg, explicit = resolve_options(given, config_file)
    return cfg, resume, explicit


def command(argv: Sequence[str] | None = None) -> None:
    """The training command; mistakes raise `models.cli.CliError`s (ConfigError, DataError)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, resume, explicit = resolve(argv)
    train(cfg, resume, explicit)


def main(argv: Sequence[str] | None = None) -> None:
    """`command`, with a mistake printed as one line `error: ...` and exit code 2."""
    cli.run(command, argv)


if __name__ == "__main__":
    main()
