"""The one-line-error parser and runner every command line shares."""

from __future__ import annotations

import pytest

from models.cli import CliError, OneLineParser, run


def test_a_usage_mistake_is_one_line_naming_the_flag_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    parser = OneLineParser(prog="python -m thing")
    parser.add_argument("--lr", type=float)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--lr", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "python -m thing: error: argument --lr: invalid float value: 'abc'\n"


def test_run_prints_a_cli_error_as_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    def main(argv: object) -> None:
        raise CliError("--out x: not a folder")

    with pytest.raises(SystemExit) as e:
        run(main, [])
    assert e.value.code == 2 and capsys.readouterr().err == "error: --out x: not a folder\n"


def test_run_lets_other_errors_through() -> None:
    def main(argv: object) -> None:
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        run(main, [])
