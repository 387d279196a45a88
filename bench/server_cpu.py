"""Where a real server's CPU goes per request under wrk load: event loops against engine (and other) threads.

    python -m bench.server_cpu                            # 2 workers, c=64, {"n": 1}, 10 s, 3 runs
    python -m bench.server_cpu --workers 1 --body '{"n": 8}' --runs 1

Starts `python -m service` (CM_WORKERS=--workers), drives it with wrk (bench/wrk/post.lua) and, over the
middle half of each run, reads every server thread's CPU time from /proc/PID/task/TID/stat and the requests
answered from /metrics. A worker's main thread is its event loop; its other threads are the engine (nearly
all of the rest), the encoder pool and the metrics refresher. Printed per run: requests/s (wrk) and the CPU
per request of the event loops and of the other threads, in µs. To compare two revisions, alternate them
on the same minutes (a shared VM drifts by more than most changes gain), e.g. from a `git worktree` of the
other revision with --checkout. Linux only (/proc); the server's own log goes to a temporary file. The
server takes the shell's CM_ settings.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.harness import REPO, WrkRun, finish_wrk, require_wrk, scrape, service, start_wrk

TICKS = os.sysconf("SC_CLK_TCK")


def server_pids(parent: int, workers: int) -> list[int]:
    """The processes that serve: the server itself, or with several workers the supervisor's children."""
    if workers == 1:
        return [parent]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            worker = ppid == parent and b"spawn_main" in (entry / "cmdline").read_bytes()  # not the resource tracker
        except OSError:  # gone meanwhile
            continue
        if worker:
            pids.append(int(entry.name))
    return pids


def thread_cpu(pids: list[int]) -> dict[tuple[int, int], float]:
    """(pid, tid) -> user + system CPU seconds so far."""
    cpu = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu[(pid, int(task.name))] = (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return cpu


def one_run(args: argparse.Namespace, url: str, pids: list[int]) -> str:
    run = WrkRun(json.loads(args.body), args.concurrency)
    wrk = start_wrk(url, run, args.duration)
    time.sleep(args.duration / 4)
    cpu0, served0 = thread_cpu(pids), scrape(url).get("cmserve_requests_total", 0.0)
    time.sleep(args.duration / 2)
    cpu1, served1 = thread_cpu(pids), scrape(url).get("cmserve_requests_total", 0.0)
    finish_wrk(wrk, run)
    served = max(1.0, served1 - served0)
    loop = sum(v - cpu0.get(k, 0.0) for k, v in cpu1.items() if k[0] == k[1])
    other = sum(v - cpu0.get(k, 0.0) for k, v in cpu1.items() if k[0] != k[1])
    return (f"{run.requests_per_s:8.0f} requests/s | event loops {loop / served * 1e6:6.1f} µs CPU per request | "
            f"other threads {other / served * 1e6:6.1f} µs | {served:.0f} requests measured")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="CM_WORKERS of the server")
    parser.add_argument("--concurrency", type=int, default=64, help="wrk connections")
    parser.add_argument("--body", default='{"n": 1}', help="the JSON body of every request")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--runs", type=int, default=3, help="runs against the same server")
    parser.add_argument("--log-level", default="info", help="CM_LOG_LEVEL (info: one line a request)")
    parser.add_argument("--checkout", type=Path, default=REPO, help="run the service from this checkout")
    args = parser.parse_args()
    if args.workers < 1 or args.concurrency < 1 or args.runs < 1 or args.duration < 2:
        parser.error("--workers, --concurrency and --runs must be at least 1, --duration at least 2")
    require_wrk()
    settings = {"CM_WORKERS": str(args.workers), "CM_LOG_LEVEL": args.log_level}
    with tempfile.TemporaryDirectory() as tmp, \
            service(settings, Path(tmp) / "service.log", cwd=args.checkout, inherit_settings=True) as server:
        pids = server_pids(server.proc.pid, args.workers)
        print(f"service: {args.workers} worker(s) (pids {pids}), wrk c={args.concurrency}, body {args.body}, "
              f"{args.duration:g} s per run")
        for _ in range(args.runs):
            print(one_run(args, server.url, pids), flush=True)


if __name__ == "__main__":
    main()
