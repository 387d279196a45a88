"""Serve a preset through the real `python -m service` on a GPU and drive it closed-loop over HTTP.

    python bench/gpu_serve.py --preset cifar10 --dtype bf16 --concurrency 16,64 --n 8 --duration 10

For machines without wrk (the lent GPU machines have none): the load comes from several client processes,
each with a few threads on httpx connections, so the client is not a single Python process. The server
loads a checkpoint saved with models.checkpoint.save (random weights: the cost per image is the same),
exactly as CM_MODELS would load a user's file. Prints images/s, latency percentiles and the mean images per
network evaluation from /metrics, next to the engine's own throughput without HTTP.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

from models.checkpoint import save
from models.config import preset
from models.consistency import ConsistencyModel

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def client_process(url: str, threads: int, n: int, steps: int, duration: float, out: mp.Queue) -> None:
    """`threads` closed-loop clients; puts (latencies, images, errors) on `out`."""
    latencies: list[float] = []
    errors = [0]
    stop = time.perf_counter() + duration
    lock = threading.Lock()

    def loop(worker: int) -> None:
        with httpx.Client(timeout=120) as client:
            seed = worker * 10**9
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = client.post(f"{url}/v1/generate", json={"n": n, "steps": steps, "seed": seed})
                seed += n
                with lock:
                    if r.status_code == 200:
                        latencies.append(time.perf_counter() - t)
                    else:
                        errors[0] += 1

    pool = [threading.Thread(target=loop, args=(os.getpid() * 100 + i,)) for i in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    out.put((latencies, len(latencies) * n, errors[0]))


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def drive(url: str, concurrency: int, n: int, steps: int, duration: float) -> dict[str, float]:
    procs_n = min(concurrency, 8)
    per = [concurrency // procs_n + (i < concurrency % procs_n) for i in range(procs_n)]
    evals0, imgs0 = metric(url, "cmserve_batch_size_count"), metric(url, "cmserve_batch_size_sum")
    q: mp.Queue = mp.Queue()
    t = time.perf_counter()
    procs = [mp.Process(target=client_process, args=(url, k, n, steps, duration, q)) for k in per]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    wall = time.perf_counter() - t
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r[0])
    images = sum(r[1] for r in results)
    evals = metric(url, "cmserve_batch_size_count") - evals0
    per_eval = (metric(url, "cmserve_batch_size_sum") - imgs0) / max(evals, 1)
    q_ = statistics.quantiles(lat, n=100) if len(lat) > 2 else [float("nan")] * 99
    return {"concurrency": concurrency, "n": n, "steps": steps, "images_per_s": images / wall,
            "p50_ms": 1e3 * q_[49], "p99_ms": 1e3 * q_[98], "errors": sum(r[2] for r in results),
            "images_per_evaluation": per_eval}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-trace", dest="trace", action="store_false", help="serve eager (CM_TRACE=false)")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", default="1,2")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    model = ConsistencyModel.from_config(preset(args.preset))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    path = save(tmp / f"{args.preset}.safetensors", model, preset=args.preset)
    port = free_port()
    env = {**os.environ, "CM_MODELS": f"{args.preset}={path}", "CM_PORT": str(port), "CM_DEVICE": args.device,
           "CM_DTYPE": args.dtype, "CM_COMPILE": str(args.compile).lower(),
           "CM_TRACE": str(args.trace).lower(), "CM_CHANNELS_LAST": "true",
           "CM_LOG_LEVEL": "warning", "CM_MAX_QUEUE": "100000", "CM_REQUEST_TIMEOUT_S": "120"}
    url = f"http://127.0.0.1:{port}"
    t = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=REPO)
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit("the server exited before it was ready")
            time.sleep(0.5)
        print(f"# {args.preset} served in {args.dtype} on {args.device} (compile {args.compile}, trace {args.trace}); "
              f"ready (loaded + warmed up) after {time.perf_counter() - t:.1f} s")
        heads = ("conc", 5), ("n", 3), ("steps", 5), ("images/s", 9), ("p50 ms", 8), ("p99 ms", 8), ("img/eval", 8)
        print(" ".join(f"{h:>{w}}" for h, w in heads), "errors")
        rows = []
        for steps in (int(s) for s in args.steps.split(",")):
            for conc in (int(c) for c in args.concurrency.split(",")):
                r = drive(url, conc, args.n, steps, args.duration)
                rows.append(r)
                print(f"{conc:>5} {args.n:>3} {steps:>5} {r['images_per_s']:>9.0f} {r['p50_ms']:>8.1f} "
                      f"{r['p99_ms']:>8.1f} {r['images_per_evaluation']:>8.1f} {r['errors']:>6}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
