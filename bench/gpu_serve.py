"""Serve a preset through the real `python -m service` on a GPU and drive it closed-loop over HTTP, beside the
engine alone and the load generator alone, measured in the same run.

    python -m bench.gpu_serve --preset cifar10 --dtype bf16 --concurrency 1,16,64,256 --n 1,8 --steps 1,2
    python -m bench.gpu_serve --preset cifar10 --dtype bf16 --concurrency 64,256 --frontends 4   # CM_FRONTENDS=4
    CM_BATCH_BUCKETS=1,2,4,8,16 CM_MAX_BATCH=16 python -m bench.gpu_serve --compile-mode reduce-overhead ...

For machines without wrk (the lent GPU machines have none): the load comes from several client processes,
each with a few threads on httpx connections, so the client is not a single Python process. The server
loads a checkpoint saved with models.checkpoint.save (random weights: the cost per image is the same),
exactly as CM_MODELS would load a user's file; the shell's CM_ settings (e.g. CM_BATCH_BUCKETS) pass through.

Three measurements, one after the other, so that none shares the machine with another:
  engine alone    service.engine.Engine built by the service's own loader (same checkpoint, dtype, channels_last,
                  compile and its mode, trace, buckets), in a process of its own so that this one never touches
                  the device; at each batch a scenario reaches, b = min(concurrency × n, CM_MAX_BATCH) (padded up
                  to its bucket when compiled): one evaluation's median time and b images per evaluation, divided
                  by the step count for a scenario's images/s
  load generator  the same client processes against a bare endpoint (bench.harness.bare_app, a fixed PNG) at
                  each concurrency: the requests/s the client itself can send and read, beside the served ones
  served          each scenario against `python -m service`: images/s, requests/s, p50/p99, images/evaluation
Rates count each request for the share of its time inside the measured window, which leaves out the first
--warmup seconds of each scenario; latencies are those of the requests that finished inside it.
Targets: served images/s ≥ 0.8 × the engine alone at concurrency 64 (each n and steps); p50 at concurrency 1 ≤
the request's own evaluations (steps × one evaluation at batch n) + 3 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    free_port,
    images_per_evaluation,
    int_list,
    process,
    random_checkpoint,
    scrape,
    service,
    write_json,
)
from service.engine import COMPILE_MODES, Engine

SERVED_SHARE = 0.8  # target: served images/s ÷ the engine alone at concurrency 64
LATENCY_SLACK_MS = 3.0  # target: p50 at concurrency 1 ≤ the request's evaluations + this
CLIENT_HEADROOM = 2.0  # the client counts as not the bottleneck when the bare endpoint took this × the served req/s


# ---------------------------------------------------------------------- the load generator


def client_process(url: str, threads: int, body: dict[str, int], begin: float, stop: float, out: mp.Queue) -> None:
    """`threads` closed-loop clients from `begin` until `stop` (time.monotonic, one clock for every process); puts
    (start, end, answered 200) of each request on `out`, the ones still in flight at `stop` included."""
    records: list[tuple[float, float, bool]] = []
    lock = threading.Lock()

    def loop(worker: int) -> None:
        with httpx.Client(timeout=120) as client:
            seed = worker * 10**9
            time.sleep(max(0.0, begin - time.monotonic()))
            while (start := time.monotonic()) < stop:
                try:
                    ok = client.post(f"{url}/v1/generate", json={**body, "seed": seed}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                seed += body["n"]
                with lock:
                    records.append((start, time.monotonic(), ok))

    pool = [threading.Thread(target=loop, args=(os.getpid() * 1000 + i,)) for i in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    out.put(records)


def in_window(start: float, end: float, lo: float, hi: float) -> float:
    """The share of a request's time [start, end] inside [lo, hi]: its share of the window's work."""
    return max(0.0, min(end, hi) - max(start, lo)) / (end - start) if end > start else float(lo <= end <= hi)


def drive(url: str, concurrency: int, n: int, steps: int, duration: float, warmup: float, clients: int,
          metrics: bool = True) -> dict[str, Any]:
    """`concurrency` closed-loop clients over `clients` processes for warmup + duration seconds; the figures of
    the last `duration` seconds (and, with `metrics`, the mean images per evaluation from the server's /metrics).

    Each request counts for the share of its time inside the window, not as a whole where it ends: with requests
    of a second or more (n = 8 at concurrency 256) whole ones would make the rate jump by the round."""
    procs_n = min(concurrency, clients)
    per = [concurrency // procs_n + (i < concurrency % procs_n) for i in range(procs_n)]
    before = scrape(url) if metrics else {}
    q: mp.Queue = mp.Queue()
    begin = time.monotonic() + 0.3  # every process started before the first request
    lo, hi = begin + warmup, begin + warmup + duration
    procs = [mp.Process(target=client_process, args=(url, k, {"n": n, "steps": steps}, begin, hi, q)) for k in per]
    for p in procs:
        p.start()
    records = [rec for _ in procs for rec in q.get()]
    for p in procs:
        p.join()
    answered = sum(in_window(a, b, lo, hi) for a, b, ok in records if ok)
    lat = sorted(b - a for a, b, ok in records if ok and lo <= b <= hi)
    cut = statistics.quantiles(lat, n=100) if len(lat) > 2 else [float("nan")] * 99
    return {"concurrency": concurrency, "n": n, "steps": steps, "requests": len(lat),
            "requests_per_s": answered / duration, "images_per_s": answered * n / duration,
            "p50_ms": 1e3 * cut[49], "p99_ms": 1e3 * cut[98],
            "errors": sum(1 for a, b, ok in records if not ok and lo <= b <= hi),
            "images_per_evaluation": images_per_evaluation(before, scrape(url)) if metrics else None}


def load_generator_ceiling(concurrency: list[int], duration: float, warmup: float, clients: int, workers: int,
                           log: Path) -> dict[int, float]:
    """Requests/s of the same client processes against the bare endpoint (`workers` uvicorn processes)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "bench.load", "--serve-bare", str(port), "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    with process(argv, env, url + "/docs", log):
        return {c: drive(url, c, 1, 1, duration, warmup, clients, metrics=False)["requests_per_s"]
                for c in concurrency}


# ---------------------------------------------------------------------- the engine alone


class Unwarmed(Engine):
    """The service's engine without its warm-up of every bucket: only the measured batches run (and compile)."""

    def warmup(self) -> None:
        pass


def engine_alone(settings: dict[str, str], reach: list[tuple[int, int]], seconds: float, out: Any) -> None:
    """In a spawned process: the engine exactly as the service's loader builds it from `settings`, timed at
    min(c × n, CM_MAX_BATCH) for each (c, n) of `reach`; puts its description and figures by batch on `out`."""
    import torch

    from bench.harness import machine
    from service.registry import load_model, model_specs
    from service.settings import Settings

    os.environ.update(settings)
    config = Settings()
    torch.set_num_threads(config.cpu_threads)
    engine = load_model(model_specs(config)[0], config, Unwarmed).engine
    batches = sorted({min(c * n, config.max_batch) for c, n in reach})
    figures: dict[int, dict[str, float]] = {}
    for b in batches:
        x = torch.randn(b, *engine.image_shape)
        sigma = torch.full((b,), engine.sigma_max)
        labels = torch.zeros(b, dtype=torch.long) if engine.num_classes else None
        for _ in range(5):  # compiles the bucket; in a graph mode also records and replays its CUDA graph
            engine.evaluate(x, sigma, labels)
        engine.synchronize()
        times = []
        start = time.perf_counter()
        while time.perf_counter() < start + seconds or len(times) < 5:
            t = time.perf_counter()
            engine.evaluate(x, sigma, labels)
            engine.synchronize()  # the output stays on the device: wait for it
            times.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        figures[b] = {"bucket": engine.bucket(b), "evaluation_ms": 1e3 * statistics.median(times),
                      "images_per_s": b * len(times) / elapsed, "evaluations": len(times)}
    way = (f"compiled ({engine.compile_mode})" if engine.compiled else "traced" if engine.traced else "eager")
    out.put({"machine": machine(engine.device), "device": str(engine.device), "way": way,
             "max_batch": config.max_batch, "buckets": engine.buckets, "batches": figures})


def measure_engine(settings: dict[str, str], reach: list[tuple[int, int]], seconds: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # this process stays off the device, so the server gets it whole
    q = ctx.Queue()
    proc = ctx.Process(target=engine_alone, args=(settings, reach, seconds, q))
    proc.start()
    while True:
        try:
            result = q.get(timeout=1.0)
            break
        except queue.Empty:  # still loading, compiling or measuring
            if proc.exitcode is not None:
                raise SystemExit(f"the engine-alone process failed (exit code {proc.exitcode})") from None
    proc.join()
    return result


# ---------------------------------------------------------------------- targets


def engine_figures(engine: dict[str, Any], row: dict[str, Any]) -> dict[str, float]:
    """The engine alone at a scenario's batch: images/s for its step count, one evaluation's ms, batch, bucket."""
    batch = min(row["concurrency"] * row["n"], engine["max_batch"])
    m = engine["batches"][batch]
    return {"batch": batch, "bucket": m["bucket"], "evaluation_ms": m["evaluation_ms"],
            "images_per_s": m["images_per_s"] / row["steps"]}


def targets(rows: list[dict[str, Any]], clients: dict[int, float]) -> list[str]:
    """PASS/MISS of the two targets, and where the load generator may have been the limit."""
    lines = []
    for r in rows:
        c, n, steps = r["concurrency"], r["n"], r["steps"]
        if c == 64:
            ok = r["served_share"] >= SERVED_SHARE
            lines.append(f"c=64 n={n} {steps}-step: {r['images_per_s']:.0f} images/s = {r['served_share']:.2f} × the "
                         f"engine alone ({r['engine_images_per_s']:.0f} at batch {r['batch']}; target ≥ "
                         f"{SERVED_SHARE:.2f}): {'PASS' if ok else 'MISS'}")
        if c == 1:
            limit = steps * r["evaluation_ms"] + LATENCY_SLACK_MS
            ok = r["p50_ms"] <= limit
            lines.append(f"c=1 n={n} {steps}-step: p50 {r['p50_ms']:.2f} ms vs {steps} × one evaluation at batch "
                         f"{r['bucket']} ({r['evaluation_ms']:.2f} ms) + {LATENCY_SLACK_MS:g} ms = {limit:.2f} ms: "
                         f"{'PASS' if ok else 'MISS'}")
    for c, ceiling in clients.items():
        served = max((r["requests_per_s"] for r in rows if r["concurrency"] == c), default=0.0)
        bound = served > 0 and ceiling < CLIENT_HEADROOM * served
        lines.append(f"load generator at c={c}: {ceiling:.0f} requests/s against the bare endpoint = "
                     f"{ceiling / served if served else float('inf'):.1f} × the most served ({served:.0f}): "
                     f"{'the client may be the limit' if bound else 'not the bottleneck'}")
    return lines


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cifar10", help="a preset served with random weights")
    parser.add_argument("--checkpoint", type=Path, help="serve this checkpoint instead (e.g. a converted public model)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--compile-mode", choices=COMPILE_MODES,
                        help="CM_COMPILE_MODE of the server (implies --compile), e.g. reduce-overhead: CUDA graphs")
    parser.add_argument("--no-trace", dest="trace", action="store_false", help="serve eager (CM_TRACE=false)")
    parser.add_argument("--frontends", type=int, help="CM_FRONTENDS of the server (HTTP processes)")
    parser.add_argument("--concurrency", type=int_list, default=[1, 16, 64, 256], help="e.g. 1,16,64,256")
    parser.add_argument("--n", type=int_list, default=[1, 8], help="images per request, e.g. 1,8")
    parser.add_argument("--steps", type=int_list, default=[1, 2], help="e.g. 1,2")
    parser.add_argument("--duration", type=float, default=4.0, help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=0.5, help="uncounted seconds at the start of each scenario")
    parser.add_argument("--clients", type=int, default=8, help="client processes (at most one per connection)")
    parser.add_argument("--bare-workers", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                        help="uvicorn processes of the bare endpoint")
    parser.add_argument("--engine-seconds", type=float, default=1.0, help="seconds timing the engine alone per batch")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.compile_mode:
        args.compile = True
    return args


def server_settings(args: argparse.Namespace, path: Path, name: str) -> dict[str, str]:
    """The CM_ settings of the server (and of the engine alone); a pass-through setting the service does not
    know is an error here, since the service would ignore it."""
    from service.settings import Settings

    settings = {"CM_MODELS": f"{name}={path}", "CM_DEVICE": args.device, "CM_DTYPE": args.dtype,
                "CM_COMPILE": str(args.compile).lower(), "CM_TRACE": str(args.trace).lower(),
                "CM_CHANNELS_LAST": "true", "CM_LOG_LEVEL": "warning", "CM_MAX_QUEUE": "100000",
                "CM_REQUEST_TIMEOUT_S": "120", "CM_MAX_IMAGES_PER_REQUEST": str(max(args.n))}
    for field, value in (("frontends", args.frontends), ("compile_mode", args.compile_mode)):
        if value is None:
            continue
        if field not in Settings.model_fields:
            raise SystemExit(f"this checkout's service has no CM_{field.upper()} setting (service/settings.py)")
        settings[f"CM_{field.upper()}"] = str(value)
    return settings


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="cmserve-gpu-serve-"))
    path = args.checkpoint or random_checkpoint(args.preset, tmp)
    name = path.stem if args.checkpoint else args.preset
    settings = server_settings(args, path, name)
    reach = [(c, n) for c in args.concurrency for n in args.n]

    t = time.perf_counter()
    engine = measure_engine(settings, reach, args.engine_seconds)
    print(f"# {name} in {args.dtype} on {engine['machine']}; engine {engine['way']}, buckets {engine['buckets']}, "
          f"CM_MAX_BATCH {engine['max_batch']}")
    print(f"engine alone (its own process, {time.perf_counter() - t:.1f} s with loading and compiling):")
    for b, m in engine["batches"].items():
        print(f"  batch {b:4d} (bucket {m['bucket']:4d}): {m['evaluation_ms']:8.2f} ms per evaluation, "
              f"{m['images_per_s']:8.0f} images/s at 1 step")

    clients = load_generator_ceiling(args.concurrency, min(args.duration, 2.0), args.warmup, args.clients,
                                     args.bare_workers, tmp / "bare.log")
    print(f"load generator ({args.clients} client processes of httpx threads) against a bare endpoint "
          f"({args.bare_workers} uvicorn process{'es' if args.bare_workers > 1 else ''}, a fixed PNG):")
    for c, rps in clients.items():
        print(f"  concurrency {c:4d}: {rps:8.0f} requests/s")

    extra = {k: v for k, v in settings.items() if k in ("CM_FRONTENDS", "CM_COMPILE_MODE")}
    t = time.perf_counter()
    rows = []
    # Compiling every batch bucket during warm-up takes minutes: a long wait for /readyz.
    with service(settings, tmp / "service.log", inherit_settings=True, timeout=1800) as server:
        ready_s = time.perf_counter() - t
        print(f"served: {' '.join([*(f'{k}={v}' for k, v in extra.items()), 'python -m service'])}, ready (loaded "
              f"and warmed up) after {ready_s:.1f} s (log: {server.log})")
        heads = (("conc", 5), ("n", 3), ("steps", 5), ("images/s", 9), ("engine", 8), ("ratio", 6), ("req/s", 8),
                 ("client", 8), ("p50 ms", 8), ("p99 ms", 8), ("eval ms", 8), ("img/eval", 8))
        print(" ".join(f"{h:>{w}}" for h, w in heads), "errors")
        for steps in args.steps:
            for n in args.n:
                for c in args.concurrency:
                    r = drive(server.url, c, n, steps, args.duration, args.warmup, args.clients)
                    alone = engine_figures(engine, r)
                    r.update(batch=alone["batch"], bucket=alone["bucket"], evaluation_ms=alone["evaluation_ms"],
                             engine_images_per_s=alone["images_per_s"],
                             served_share=r["images_per_s"] / alone["images_per_s"],
                             client_requests_per_s=clients[c])
                    rows.append(r)
                    print(f"{c:>5} {n:>3} {steps:>5} {r['images_per_s']:>9.0f} {alone['images_per_s']:>8.0f} "
                          f"{r['served_share']:>6.2f} {r['requests_per_s']:>8.0f} {clients[c]:>8.0f} "
                          f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {alone['evaluation_ms']:>8.2f} "
                          f"{r['images_per_evaluation']:>8.1f} {r['errors']:>6}")
    report = targets(rows, clients)
    print("targets:")
    for line in report:
        print("  " + line)
    if args.json:
        write_json(args.json, {
            "model": name, "dtype": args.dtype, "settings": settings, "ready_s": ready_s,
            "duration_s": args.duration, "warmup_s": args.warmup, "client_processes": args.clients,
            "engine_alone": {**engine, "batches": {str(b): m for b, m in engine["batches"].items()}},
            "load_generator_requests_per_s": {str(c): v for c, v in clients.items()},
            "scenarios": rows, "targets": report,
        })


if __name__ == "__main__":
    main()
