"""bench.scheduler_cost's closed loop reproduces the served batches it stands for."""

from __future__ import annotations

import pytest

from bench.scheduler_cost import measure


def test_the_random_mix_batches_hold_the_clients_not_answered_by_the_evaluation_before() -> None:
    # A fraction f = 1/2.5 of each batch is answered and misses the next evaluation: B = 64 / (1 + f).
    _, images = measure(clients=64, steps=[1, 4], evaluations=300, seed=0)
    assert images == pytest.approx(64 / 1.4, rel=0.05)


def test_one_step_clients_all_come_back_for_the_evaluation_after_the_next() -> None:
    per_evaluation, images = measure(clients=64, steps=[1], evaluations=50, seed=0)
    assert images == 64
    assert per_evaluation > 0
