"""`python -m service [--config FILE]`: serve the configured models with uvicorn.

SIGTERM (or Ctrl+C) drains: /readyz turns 503 and new requests get 503 while the listener stays open,
in-flight requests finish within CM_DRAIN_S, then the process exits 0. A second signal stops at once.
With CM_WORKERS > 1 (CPU) several worker processes share the port; with CM_FRONTENDS > 1 several front-end
processes share it, in front of one engine process (service/server.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from .signals import hold_signals  # first: it holds SIGTERM/SIGINT while the rest imports (service/signals.py)

received = hold_signals() if __name__ == "__main__" else []

from .engine import resolve_device  # noqa: E402
from .logs import configure_logging  # noqa: E402
from .registry import ModelFilesError, check_model_files  # noqa: E402
from .server import EXIT_CONFIG, FrontendSupervisor, Supervisor, exit_now, serve  # noqa: E402
from .settings import Settings, SettingsError, load_settings, settings_table  # noqa: E402

logger = logging.getLogger("cmserve.main")


def check_settings(settings: Settings) -> None:
    """What the settings alone cannot tell: the device exists, the model files are usable."""
    setting = "CM_DEVICES" if settings.devices else "CM_DEVICE"
    devices = [resolve_device(name, setting) for name in settings.device_names]
    if settings.workers > 1 and devices[0].type != "cpu":
        raise SettingsError(f"CM_WORKERS={settings.workers} with CM_DEVICE={settings.device!r} resolves to "
                            f"{devices[0]}: one process owns a GPU; use CM_WORKERS=1 and one replica per GPU")
    check_model_files(settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE", help="dotenv-style file of CM_NAME=value settings")
    parser.add_argument("--settings-table", action="store_true", help="print every setting (Markdown) and exit")
    args = parser.parse_args(argv)
    if args.settings_table:
        sys.stdout.write(settings_table() + "\n")
        return 0
    configure_logging("info")
    try:
        settings = load_settings(args.config)
        configure_logging(settings.log_level)
        check_settings(settings)
    except (SettingsError, ModelFilesError, ValueError) as e:
        logger.error("cannot start: %s", e)
        return EXIT_CONFIG
    if settings.frontends > 1:
        return FrontendSupervisor(settings, received).run()
    if settings.workers > 1:
        return Supervisor(settings, received).run()
    return serve(settings, received=received)


if __name__ == "__main__":
    exit_now(main())
