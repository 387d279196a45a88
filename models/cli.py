"""What every command line of the project shares: an argument parser whose mistakes are one line, and the
error that library code raises for a person to read (only a `__main__` turns it into an exit)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn


class CliError(Exception):
    """A mistake of the person at the command line; the message names the flag or file, the value and what is
    allowed. Library code raises it (or a more specific error); `run` prints it as one line and exits 2."""


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes exit 2 with one line naming the flag, and no usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def run(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None,
        errors: tuple[type[BaseException], ...] = (CliError,)) -> None:
    """Call a command's `main(argv)`; an error of the given kinds becomes one line on stderr and exit code 2."""
    try:
        main(argv)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
