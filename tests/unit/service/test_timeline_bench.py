"""bench.timeline's timing wrappers follow the methods they wrap, and its report reads what they record."""

from __future__ import annotations

import pytest

from bench.timeline import instrument, report
from models.consistency import ConsistencyModel
from models.sampling import default_sigmas
from service.engine import Engine
from service.scheduler import Job, Scheduler


def test_the_wrappers_time_a_real_scheduler_and_engine(tiny_model: ConsistencyModel,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    data = instrument(monkeypatch.setattr)
    scheduler = Scheduler(max_batch=8, max_wait_s=0.0, max_queue=100)
    scheduler.add_model("tiny", Engine(tiny_model))
    done: list[Job] = []
    for seed in range(3):
        scheduler.submit(Job(model="tiny", sigmas=default_sigmas(2), seed=seed, n=1, class_label=None,
                             deadline=float("inf"), on_done=done.append))
    while scheduler.run_once(block=False):
        pass
    assert len(done) == 3 and all(job.error is None for job in done)
    assert len(data["submits"]) == 3
    assert [size for _, _, size in data["evaluations"]] == [3, 3]  # two steps of the three images
    assert len(data["networks"]) == 2
    for (start, end, _), (net_start, net_end) in zip(data["evaluations"], data["networks"], strict=True):
        assert start <= net_start <= net_end <= end


def test_the_report_splits_evaluations_and_the_gaps_between_them(capsys: pytest.CaptureFixture[str]) -> None:
    # Two cycles of 4 images, 10 ms each: 1 ms of inputs, 8 of network, 1 of results; then 5 ms until the next.
    evaluations = [(0.000, 0.010, 4), (0.015, 0.025, 4), (0.030, 0.040, 4)]
    networks = [(0.001, 0.009), (0.016, 0.024), (0.031, 0.039)]
    submits = [0.012, 0.013, 0.027, 0.028]
    requests = [(0.0, 0.011), (0.0, 0.026)]
    report({"evaluations": evaluations, "networks": networks, "submits": submits, "requests": requests},
           (0.0, 1.0))
    out = capsys.readouterr().out
    assert "3 evaluations, 300 images/s, 4.0 images per evaluation, engine evaluating 75% of the time" in out
    assert "network (Engine.evaluate)  8.00 / 8.00 / 8.00" in out
    assert "gap between evaluations, ms (p10 / median / p90): 5.00 / 5.00 / 5.00" in out
    assert "next evaluation            5.00 / 5.00 / 5.00" in out
