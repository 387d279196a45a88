"""Where a served cycle's time goes: the engine's evaluations and the event loop's work between them.

    python -m bench.timeline                         # 1 worker, c=64 n=1 1-step, wrk 5 s
    python -m bench.timeline --concurrency 4 --n 8
    python -m bench.timeline --steps random          # each request 1 or 4 steps (bench/wrk/random.lua)
    python -m bench.timeline --env CM_CPU_PARALLEL=operators

Starts `python -m service` (the embedded default model) with its scheduler and requests timed (this module,
run with --serve, wraps Scheduler._run, Engine.evaluate, Scheduler.submit and the requests' end, and writes
their timestamps when the server exits), drives it with wrk (bench/wrk/post.lua, or random.lua) after a 1 s
warm-up, and prints: images/s, images per evaluation, the share of time the engine evaluates, an
evaluation's wall time per image by batch size and its parts (the inputs, the network, the results), the gaps
between evaluations, and for batches that follow a batch of the same size the anatomy of the gap: when the
last response of the batch before went out, when the first and last new requests reached the scheduler, and
when the next evaluation started (ms after the batch before ended).
An evaluation here is Scheduler._run: the engine's own Python (each image's noise, the batch's inputs, the
results) and the network. Server log: --log. docs/perf-log.md ("Where a served cycle goes") has what it showed.
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench.harness import WrkRun, drive, require_wrk, service, warm_up


def instrument(patch: Callable[[Any, str, Any], None] = setattr) -> dict[str, list]:
    """Time the scheduler's evaluations, the network, submissions and the requests' ends; returns the lists the
    timestamps go to (`patch`: how to replace a method, setattr or a test's monkeypatch.setattr)."""
    from service import engine, scheduler
    from service.api.generate import GenerateHandler

    data: dict[str, list] = {"evaluations": [], "networks": [], "submits": [], "requests": []}
    run, submit, end = scheduler.Scheduler._run, scheduler.Scheduler.submit, GenerateHandler.end
    evaluate = engine.Engine.evaluate

    def timed_run(self: Any, device: Any, lane: Any, runs: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        try:
            return run(self, device, lane, runs, *args, **kwargs)
        finally:
            data["evaluations"].append((start, time.monotonic(), sum(r.size for r in runs)))

    def timed_evaluate(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()
        try:
            return evaluate(self, *args, **kwargs)
        finally:
            data["networks"].append((start, time.monotonic()))

    def timed_submit(self: Any, job: Any) -> None:
        data["submits"].append(time.monotonic())
        submit(self, job)

    def timed_end(self: Any, log: Any, status: int) -> None:
        data["requests"].append((log.started, time.monotonic()))  # arrival; the response went out just before
        end(self, log, status)

    patch(scheduler.Scheduler, "_run", timed_run)
    patch(scheduler.Scheduler, "submit", timed_submit)
    patch(engine.Engine, "evaluate", timed_evaluate)
    patch(GenerateHandler, "end", timed_end)  # both entry points end a request here
    return data


def serve(out: Path) -> int:
    """The service, timed; the timestamps go to `out` when it exits."""
    from service.__main__ import main

    data = instrument()
    atexit.register(lambda: out.write_text(json.dumps(data)))
    return main([])


def quantiles(values: list[float]) -> str:
    if len(values) < 2:
        return " / ".join(f"{v:.2f}" for v in values) or "-"
    q = statistics.quantiles(values, n=10)
    return f"{q[0]:.2f} / {statistics.median(values):.2f} / {q[-1]:.2f}"


def report(data: dict[str, list], window: tuple[float, float]) -> None:
    lo, hi = window
    evals = [e for e in data["evaluations"] if lo <= e[0] and e[1] <= hi]
    if len(evals) < 3:
        raise SystemExit("too few evaluations in the measured window")
    span = evals[-1][1] - evals[0][0]
    images = sum(e[2] for e in evals)
    busy = sum(e[1] - e[0] for e in evals)
    print(f"{len(evals)} evaluations, {images / span:.0f} images/s, {images / len(evals):.1f} images per evaluation, "
          f"engine evaluating {busy / span:.0%} of the time")
    per_size: dict[int, list[float]] = defaultdict(list)
    for start, end, size in evals:
        per_size[size].append((end - start) / size * 1e6)
    for size in sorted(per_size, key=lambda s: -len(per_size[s]))[:6]:
        times = per_size[size]
        print(f"  batch {size:4d}: {len(times):4d} evaluations, {statistics.median(times):6.0f} µs per image (median)")
    networks = data["networks"]
    split: list[tuple[float, float, float]] = []  # per evaluation: before the network, the network, after it
    for start, end, _ in evals:
        i = bisect.bisect_left(networks, start, key=lambda n: n[0])
        if i < len(networks) and networks[i][1] <= end:
            split.append(((networks[i][0] - start) * 1e3, (networks[i][1] - networks[i][0]) * 1e3,
                          (end - networks[i][1]) * 1e3))
    if split:
        print("an evaluation's parts, ms (p10 / median / p90):")
        for n, name in enumerate(("inputs (noise, batch)", "network (Engine.evaluate)", "results")):
            print(f"  {name:26s} {quantiles([s[n] for s in split])}")
    gaps = [(b[0] - a[1]) * 1e3 for a, b in pairwise(evals)]
    print(f"gap between evaluations, ms (p10 / median / p90): {quantiles(gaps)}")
    submits = sorted(data["submits"])
    ends = sorted(r[1] for r in data["requests"])
    rows = []
    for a, b in pairwise(evals):
        if a[2] != b[2]:
            continue
        i, j = bisect.bisect_left(ends, a[1]), bisect.bisect_left(ends, b[0])
        k, m = bisect.bisect_left(submits, a[1]), bisect.bisect_left(submits, b[0])
        if j == i or m == k:
            continue  # responses or arrivals overlapped the evaluations: no serial gap to dissect
        rows.append([(ends[j - 1] - a[1]) * 1e3, (submits[k] - a[1]) * 1e3, (submits[m - 1] - a[1]) * 1e3,
                     (b[0] - a[1]) * 1e3])
    if rows:
        names = ("last response sent", "first new request queued", "last new request queued", "next evaluation")
        print(f"gap anatomy over {len(rows)} gaps, ms after the evaluation before ended (p10 / median / p90):")
        for n, name in enumerate(names):
            print(f"  {name:26s} {quantiles([r[n] for r in rows])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--steps", default="1", help="steps of every request, or random: 1 or 4, drawn per request")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--env", action="append", default=[], metavar="CM_NAME=VALUE", help="a server setting")
    parser.add_argument("--log", type=Path, help="keep the server's log here")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # internal: the timed server
    args = parser.parse_args()
    if args.serve:
        sys.exit(serve(args.serve))

    bad = [kv for kv in args.env if not kv.startswith("CM_") or "=" not in kv]
    if bad:
        parser.error(f"--env {bad[0]}: expected CM_NAME=VALUE")
    settings = {"CM_MAX_IMAGES_PER_REQUEST": str(max(args.n, 1)), **dict(kv.split("=", 1) for kv in args.env)}
    if settings.get("CM_WORKERS", "1") != "1":
        parser.error(f"--env CM_WORKERS={settings['CM_WORKERS']}: the timeline is of one worker (1)")
    require_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="cmserve-timeline-"))
    out = tmp / "timeline.json"
    argv = [sys.executable, "-m", "bench.timeline", "--serve", str(out)]
    if args.steps != "random" and not args.steps.isdigit():
        parser.error(f"--steps {args.steps}: expected a step count or random")
    bodies = [{"n": args.n, "steps": k} for k in (1, 4)] if args.steps == "random" else None
    body = {"n": args.n, "steps": 1 if bodies else int(args.steps)}
    with service(settings, args.log or tmp / "service.log", argv=argv) as server:
        warm_up(server.url, body, args.concurrency)
        start = time.monotonic()
        run = WrkRun(body, args.concurrency, bodies=bodies)
        drive(server.url, [run], args.duration)
        end = time.monotonic()
    if run.errors:
        raise SystemExit(f"{run.errors} requests failed (server log: {args.log or tmp / 'service.log'})")
    print(f"c={args.concurrency} n={args.n} steps={args.steps}: wrk {run.requests_per_s * args.n:.0f} images/s")
    report(json.loads(out.read_text()), (start + 0.5, end - 0.5))


if __name__ == "__main__":
    main()
