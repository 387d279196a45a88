"""Event-loop CPU per POST /v1/generate, in process: the app driven over ASGI, no sockets, no client process.

    python -m bench.loop_cost                      # digits, {"n": 1}, access log on, 6 repetitions
    python -m bench.loop_cost --log-level warning  # without the access log
    python -m bench.loop_cost --body '{"n": 8, "steps": 2}'

What HTTP handling costs the service per request is what limits it at high request rates on the CPU, and
wrk runs against a real server on a shared VM move from one run to the next by more than one change to the
request path gains (BENCHMARKS.md, "Reading the serving figures"). This measures that cost alone: the
app (create_app, lifespan running, the real engine and model) gets `--concurrency` concurrent requests
straight through its ASGI interface, the event loop on one CPU and the engine thread on another when there
are two, and the loop thread's CPU time (time.thread_time) is divided by the requests answered. Log lines
go to stderr as in the server; send them to a file (2>FILE). Without uvicorn's protocol work and the
sockets the figure is lower than in a server, and the smallest of the repetitions is the steadiest figure
to compare two revisions with.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

import torch
import uvloop

from service.app import create_app
from service.logs import configure_logging
from service.settings import Settings


def request_scope(body: bytes) -> dict[str, Any]:
    headers = [(b"host", b"cmserve"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode()), (b"user-agent", b"loop_cost"), (b"accept", b"*/*")]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/generate", "raw_path": b"/v1/generate", "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": {}}


async def one_request(app: Any, body: bytes) -> None:
    """A client that sends `body` and stays connected until the response is complete."""
    delivered = False
    stay = asyncio.get_running_loop().create_future()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await stay  # the client never disconnects; cancelled with the request
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(request_scope(body), receive, send)
    stay.cancel()
    if status != 200:
        raise SystemExit(f"the service answered {status}")


async def measure(args: argparse.Namespace, cpus: list[int]) -> list[float]:
    app = create_app(Settings())
    state = app.state.service
    body = args.body.encode()
    async with app.router.lifespan_context(app):  # the engine thread starts here, on the CPUs set so far
        await state.wait_settled()
        if not state.ready:
            raise SystemExit(f"the service did not start: {state.failure}")
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[0]})  # this thread (the event loop) apart from the engine

        async def client(count: int) -> None:
            for _ in range(count):
                await one_request(app, body)

        per_client = max(1, args.requests // args.concurrency)
        await asyncio.gather(*(client(max(1, per_client // 10)) for _ in range(args.concurrency)))  # warm-up
        results = []
        for rep in range(args.reps):
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.gather(*(client(per_client) for _ in range(args.concurrency)))
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            answered = per_client * args.concurrency
            results.append(cpu / answered * 1e6)
            print(f"repetition {rep}: {answered / wall:7.0f} requests/s, event loop {results[-1]:6.1f} µs CPU "
                  "per request", flush=True)
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--body", default='{"n": 1}', help="the JSON body of every request")
    parser.add_argument("--concurrency", type=int, default=30, help="requests in flight at once")
    parser.add_argument("--requests", type=int, default=3000, help="requests per repetition")
    parser.add_argument("--reps", type=int, default=6, help="repetitions")
    parser.add_argument("--log-level", default="info", help="CM_LOG_LEVEL of the app (info: one line a request)")
    args = parser.parse_args()
    if args.concurrency < 1 or args.requests < 1 or args.reps < 1:
        parser.error("--concurrency, --requests and --reps must be at least 1")
    cpus = sorted(os.sched_getaffinity(0))
    torch.set_num_threads(1)
    if len(cpus) > 1:
        os.sched_setaffinity(0, {cpus[1]})  # the engine thread inherits this; the loop moves to cpus[0]
    configure_logging(args.log_level)
    results = uvloop.run(measure(args, cpus))
    print(f"event loop CPU per request: min {min(results):.1f} µs, median {statistics.median(results):.1f} µs "
          f"over {args.reps} repetitions of {args.requests} requests ({args.body}, log level {args.log_level}, "
          f"{len(cpus)} CPUs)")


if __name__ == "__main__":
    main()
