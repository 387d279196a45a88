"""bench.techniques seeds: the evaluator's figures at each seed, summarised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.techniques import main
from models.checkpoint import save
from models.consistency import ConsistencyModel
from training import evaluate


def test_seeds_scores_each_checkpoint_at_each_seed_and_differences_them(
    tmp_path: Path, tiny_model: ConsistencyModel, capsys: pytest.CaptureFixture[str]
) -> None:
    path = save(tmp_path / "tiny.safetensors", tiny_model, preset="digits", class_names=[str(i) for i in range(10)],
                schedules={1: [80.0], 2: [80.0, 1.0]})
    out = tmp_path / "seeds.json"
    main(["seeds", f"a={path}", f"b={path}", "--count", "2", "--first-seed", "3", "--samples", "40",
          "--json", str(out)])
    stored = json.loads(out.read_text())
    assert stored["seeds"] == [3, 4] and stored["samples"] == 40
    for seed, column in ((3, 0), (4, 1)):
        report = evaluate.evaluate_checkpoint(path, n_samples=40, seed=seed)
        for row in report["results"]:
            assert stored["fd"]["a"][f"{row['steps']}-step"][column] == row["frechet_distance"]
    assert stored["fd"]["a"] == stored["fd"]["b"]
    printed = capsys.readouterr().out
    assert "+0.00 ± 0.00" in printed  # b against a: the same model on the same seeds


def test_seeds_refuses_a_checkpoint_without_a_name(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="NAME=CHECKPOINT"):
        main(["seeds", str(tmp_path / "x.safetensors")])
