"""Serve a preset through the real `python -m service` on a GPU and drive it closed-loop over HTTP.

    python -m bench.gpu_serve --preset cifar10 --dtype bf16 --concurrency 16,64 --n 8 --duration 10

For machines without wrk (the lent GPU machines have none): the load comes from several client processes,
each with a few threads on httpx connections, so the client is not a single Python process. The server
loads a checkpoint saved with models.checkpoint.save (random weights: the cost per image is the same),
exactly as CM_MODELS would load a user's file; the shell's CM_ settings (e.g. CM_BATCH_BUCKETS) pass through.
Prints images/s, latency percentiles and the mean images per network evaluation from /metrics.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.harness import images_per_evaluation, int_list, random_checkpoint, scrape, service, write_json


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


def drive(url: str, concurrency: int, n: int, steps: int, duration: float) -> dict[str, float]:
    procs_n = min(concurrency, 8)
    per = [concurrency // procs_n + (i < concurrency % procs_n) for i in range(procs_n)]
    before = scrape(url)
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
    per_eval = images_per_evaluation(before, scrape(url))
    q_ = statistics.quantiles(lat, n=100) if len(lat) > 2 else [float("nan")] * 99
    return {"concurrency": concurrency, "n": n, "steps": steps, "images_per_s": images / wall,
            "p50_ms": 1e3 * q_[49], "p99_ms": 1e3 * q_[98], "errors": sum(r[2] for r in results),
            "images_per_evaluation": per_eval}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10", help="a preset served with random weights")
    parser.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead (e.g. a converted public model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-trace", dest="trace", action="store_false", help="serve eager (CM_TRACE=false)")
    parser.add_argument("--concurrency", type=int_list, default=[16, 64], help="e.g. 16,64")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int_list, default=[1, 2], help="e.g. 1,2")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cmserve-gpu-serve-"))
    path = args.checkpoint or random_checkpoint(args.preset, tmp)
    name = path.stem if args.checkpoint else args.preset
    settings = {"CM_MODELS": f"{name}={path}", "CM_DEVICE": args.device, "CM_DTYPE": args.dtype,
                "CM_COMPILE": str(args.compile).lower(), "CM_TRACE": str(args.trace).lower(),
                "CM_CHANNELS_LAST": "true", "CM_LOG_LEVEL": "warning", "CM_MAX_QUEUE": "100000",
                "CM_REQUEST_TIMEOUT_S": "120"}
    t = time.perf_counter()
    # Compiling every batch bucket during warm-up takes minutes: a long wait for /readyz.
    with service(settings, tmp / "service.log", inherit_settings=True, timeout=1800) as server:
        print(f"# {name} served in {args.dtype} on {args.device} (compile {args.compile}, trace {args.trace}); "
              f"ready (loaded + warmed up) after {time.perf_counter() - t:.1f} s (log: {server.log})")
        heads = ("conc", 5), ("n", 3), ("steps", 5), ("images/s", 9), ("p50 ms", 8), ("p99 ms", 8), ("img/eval", 8)
        print(" ".join(f"{h:>{w}}" for h, w in heads), "errors")
        rows = []
        for steps in args.steps:
            for conc in args.concurrency:
                r = drive(server.url, conc, args.n, steps, args.duration)
                rows.append(r)
                print(f"{conc:>5} {args.n:>3} {steps:>5} {r['images_per_s']:>9.0f} {r['p50_ms']:>8.1f} "
                      f"{r['p99_ms']:>8.1f} {r['images_per_evaluation']:>8.1f} {r['errors']:>6}")
    if args.json:
        write_json(args.json, rows)

if __name__ == "__main__":
    main()
