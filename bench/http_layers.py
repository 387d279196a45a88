"""What each HTTP layer costs per request: the same fixed PNG answered at three depths, under wrk.

    python -m bench.http_layers                    # c=64, 4 s each, 2 rounds
    python -m bench.http_layers --concurrency 16 --rounds 3

The layers, from the top:
  fastapi   a FastAPI route returning the PNG (bench.load's HTTP ceiling, bench.harness.bare_app), under uvicorn
  asgi      a bare ASGI callable returning it, under uvicorn: uvicorn's request cycle, no framework
  protocol  an asyncio protocol on uvloop parsing with httptools and writing the answer: what uvicorn's HTTP
            protocol does below ASGI, and what service/api/protocol.py builds on for POST /v1/generate
Each runs in its own process on a free port, one at a time, driven by wrk (bench/wrk/post.lua, one thread,
--concurrency connections). Printed: requests/s and wall µs per request, per round. On 2 cores the server's
event loop shares them with wrk, so at the deepest layer wrk itself may be the limit. BENCHMARKS.md
("What each HTTP layer costs") has what it showed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import WrkRun, drive, fixed_png, free_port, process, require_wrk, serve_bare, warm_up

LAYERS = ("fastapi", "asgi", "protocol")


def asgi_app() -> Any:
    """The fixed PNG from a bare ASGI callable (lifespan answered, so uvicorn runs it as the service's app)."""
    body = fixed_png()
    head = {"type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body"):
            pass
        await send(head)
        await send({"type": "http.response.body", "body": body})

    return app


def serve_protocol(port: int) -> None:
    import httptools
    import uvloop

    body = fixed_png()
    answer = b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    class Protocol(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(answer)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Protocol, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def serve(layer: str, port: int) -> None:
    if layer == "protocol":
        serve_protocol(port)
    elif layer == "fastapi":
        serve_bare(port, workers=1)
    else:
        import uvicorn

        uvicorn.run(asgi_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                    interface="asgi3", lifespan="on")


def measure(layer: str, concurrency: int, duration: float) -> float:
    """Requests/s of one layer in a fresh process, after a 1 s warm-up."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="cmserve-layers-")) / f"{layer}.log"
    argv = [sys.executable, "-m", "bench.http_layers", "--serve", layer, str(port)]
    ready = url + ("/docs" if layer == "fastapi" else "/")  # the two bare servers answer any GET
    with process(argv, os.environ, ready, log):
        warm_up(url, {"n": 1}, concurrency)
        run = WrkRun({"n": 1}, concurrency)
        drive(url, [run], duration)
    return run.requests_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of wrk per layer and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", nargs=2, metavar=("LAYER", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    require_wrk()
    print(f"wrk c={args.concurrency}, {args.duration:g} s per layer and round; requests/s (µs per request)")
    for round_ in range(args.rounds):
        cells = []
        for layer in LAYERS:
            rate = measure(layer, args.concurrency, args.duration)
            cells.append(f"{layer} {rate:8.0f} ({1e6 / rate:5.1f} µs)")
        print(f"round {round_}:  " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
