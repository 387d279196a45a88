"""The waiting rule alone: when a batch runs, as a table of plain numbers."""

from __future__ import annotations

from typing import Any

import pytest

from service.batching import COMING_BACK, MIN_QUIET_S, QUIET_EVALUATION, QUIET_GAPS, batch_wait

# An idle device, 2 of 8 images waiting, arrivals 1 ms apart and one just now, 100 ms evaluations, max_wait 30 ms,
# no answered client seen coming back yet.
BASE: dict[str, Any] = dict(queued=2, max_batch=8, idle=True, answered=0, returned=0, came_back=0.0, gap=0.001,
                            since_arrival=0.0, evaluation_s=0.1, waited=0.0, max_wait=0.03)
RUN = 0.0  # any answer <= 0: run now

CASES = [
    # (what, changes to BASE, seconds still to wait)
    ("a full batch runs now", dict(queued=8), RUN),
    ("idle: a lone image (gap >= max_wait) runs now", dict(gap=0.03), RUN),
    ("idle: arrivals keep coming: wait QUIET_GAPS gaps", {}, QUIET_GAPS * 0.001),
    ("idle: the quiet time counts from the latest arrival", dict(since_arrival=0.002), QUIET_GAPS * 0.001 - 0.002),
    ("idle: quiet for QUIET_GAPS gaps: run", dict(since_arrival=0.003), RUN),
    ("idle: the quiet time is at least MIN_QUIET_S", dict(gap=1e-5), MIN_QUIET_S),
    ("idle: while answered clients are coming back, at least a tenth of an evaluation",
     dict(gap=1e-4, answered=4, returned=3), QUIET_EVALUATION * 0.1),
    ("idle: ... and a 1 ms pause does not end it", dict(gap=1e-4, answered=4, returned=3, since_arrival=0.001),
     QUIET_EVALUATION * 0.1 - 0.001),
    ("idle: once all are back, the short quiet time again", dict(gap=1e-4, answered=4, returned=4),
     QUIET_GAPS * 1e-4),
    ("idle: at most max_wait in all", dict(waited=0.029), 0.001),
    ("idle: max_wait is over", dict(waited=0.03), RUN),
    ("busy: as many answered as waited: wait up to an evaluation", dict(idle=False, answered=2), 0.1),
    ("busy: ... or max_wait when longer", dict(idle=False, answered=2, evaluation_s=0.01), 0.03),
    ("busy: ... counting the time waited", dict(idle=False, answered=2, waited=0.04), 0.06),
    ("busy: some are back: still wait", dict(idle=False, queued=3, answered=2, returned=1), 0.1),
    ("busy: all are back: run", dict(idle=False, queued=4, answered=2, returned=2), RUN),
    ("busy: more answered than waited", dict(idle=False, queued=2, answered=5), 0.1),
    ("busy: fewer answered than waited: run", dict(idle=False, queued=3, answered=2), RUN),
    ("busy: fewer answered than waited, and fewer than COMING_BACK came back before: run",
     dict(idle=False, queued=3, answered=2, came_back=COMING_BACK - 0.01), RUN),
    ("busy: fewer answered than waited, but answered clients have been coming back: wait",
     dict(idle=False, queued=3, answered=2, came_back=COMING_BACK), 0.1),
    ("busy: ... until all are back", dict(idle=False, queued=5, answered=2, returned=2, came_back=1.0), RUN),
    ("busy: ... or an evaluation has passed", dict(idle=False, queued=3, answered=2, came_back=1.0, waited=0.1),
     RUN),
    ("busy: none answered (another model's, or no request ended): run", dict(idle=False, queued=1), RUN),
    ("busy: waited an evaluation: run", dict(idle=False, answered=2, waited=0.1), RUN),
    ("busy: a full batch runs now", dict(idle=False, queued=8, answered=8), RUN),
]


@pytest.mark.parametrize(("changes", "expected"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_batch_wait(changes: dict[str, Any], expected: float) -> None:
    left = batch_wait(**{**BASE, **changes})
    if expected == RUN:
        assert left <= 0
    else:
        assert left == pytest.approx(expected)
