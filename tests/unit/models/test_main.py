"""`python -m models info|sample`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from models.__main__ import main
from models.checkpoint import save
from models.consistency import ConsistencyModel


def test_info_preset(capsys: pytest.CaptureFixture[str]) -> None:
    main(["info", "digits"])
    out = capsys.readouterr().out
    assert "parameters: 1,280,545" in out and "GFLOPs per image" in out


def test_info_and_sample_checkpoint(
    tmp_path: Path, tiny_model: ConsistencyModel, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save(tmp_path / "m.safetensors", tiny_model, preset="digits", training_step=7)
    main(["info", str(path)])
    assert "training step: 7" in capsys.readouterr().out
    main(["sample", str(path), "--n", "10", "--steps", "2", "--out", str(tmp_path / "grid.png")])
    with Image.open(tmp_path / "grid.png") as img:
        assert img.size[0] > 8 * 8 and img.size[1] > 8


def test_bad_target_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="neither a preset"):
        main(["info", "nonsense"])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit) as exc:
        main(["info", str(bad)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")
