"""Closed-loop load against a real `python -m service` process, with the ceilings measured in the same run.

    python -m bench.load                          # digits: concurrency 1,4,16,64 × n 1,8 × 1-step, 2-step, mix
    python -m bench.load --duration 3 --concurrency 1,64 --n 1
    python -m bench.load --workers 2              # CM_WORKERS=2: two server processes on one socket
    python -m bench.load --tasks generate,inpaint --concurrency 64 --n 1 --steps 2   # editing vs generation
    python -m bench.load --concurrency 64 --n 1 --steps 1,random  # each request 1- or 4-step at random
    python -m bench.load --sleep-engine 2 --concurrency 64 --n 1,8 --steps 1   # a device that sleeps 2 ms a batch

The load comes from wrk (Debian's `apt-get install -y wrk`) with bench/wrk/post.lua: one C process drives
thousands of requests per second, so the client is not the bottleneck (the HTTP ceiling below shows how far
it goes). A "mix" runs two wrk processes at once, half the connections sending 1-step requests and half
4-step ones, so each step count gets its own latency percentiles. "random" instead has every connection draw
each request's step count, 1 or 4 (bench/wrk/random.lua), so the short requests cannot crowd out the long ones
the way a connection that only sends 1-step requests does; its latencies by step count come from the server's
access log (duration_ms of each request's line: from its arrival to its answer), and so does the 1-step
figure alone it is compared with.

Printed for each scenario: images/s, p50/p95/p99 latency per step count, mean images per network
evaluation (from the server's /metrics), and the ceilings:
  model     the engine alone (no HTTP): images/s at the batch size b the scenario can reach, the best of one
            process (1 or all-CPU torch threads, or all-CPU slices of the batch as the server's default
            CM_CPU_PARALLEL=slices evaluates) and, with --workers N > 1, N processes evaluating at once
            (max(1, CPUs // N) threads each, b split evenly among them, images/s summed)
  HTTP      a bare FastAPI endpoint returning a fixed PNG, same uvicorn with as many worker processes on one
            socket as the service (--workers), same wrk concurrency (requests/s)
  combined  1 / (1/model + 1/(HTTP × n)) images/s: the two share the same cores
--workers N starts the service with CM_WORKERS=N (N processes sharing the port, each with its own model,
engine thread and event loop; torch threads per worker: --torch-threads, or the server's default
max(1, CPUs // N)). Both ceilings above take the same N, so more workers never flatter the ratios.
Targets (CPU, digits): concurrency 64 images/s ≥ 0.8 × combined (n = 1 and 8); concurrency 1 p50 ≤ one
forward pass (the one-process best time, whatever --workers: one request is served by one worker) + 3 ms;
1-step p99 under the 1/4 mix ≤ 1.5 × 1-step p99 alone; the random mix at concurrency 64 ≥ 0.8 × combined (the
model's images/s divided by the mean evaluations per request answered), its 1-step p99 ≤ 1.5 × alone.
--sleep-engine MS serves through the real `python -m service` with every evaluation a sleep of MS per batch
(bench/sleep_engine.py: a device on the CPU); the model ceiling is then batch ÷ MS, which costs no CPU, and
served images/s ÷ that ceiling is the share of the device's time the serving path keeps busy.
--tasks adds edit scenarios (POST /v1/edit inpainting the
lower half of a fixed image; "both": half the clients generate, half inpaint): inpainting's images/s at
concurrency 64 ≥ 0.9 × generation's with the same n and steps.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.harness import (
    MIX,
    RANDOM,
    TASKS,
    Scenario,
    WrkRun,
    default_checkpoint,
    drive,
    evaluation_inputs,
    free_port,
    int_list,
    machine,
    percentile,
    process,
    require_wrk,
    run_scenario,
    serve_bare,
    service,
    warm_up,
    write_json,
)
from bench.sleep_engine import DEFAULT_SLEEP_MS
from bench.sleep_engine import serve as serve_sleeping
from models import checkpoint
from service.engine import Engine
from service.settings import Settings, usable_cpus, worker_cpus

# ---------------------------------------------------------------------- ceilings


def worker_threads(workers: int, torch_threads: int = 0) -> int:
    """Torch threads per server worker: CM_TORCH_THREADS, or the server's default max(1, CPUs // workers)."""
    return Settings(workers=workers, torch_threads=torch_threads).cpu_threads


def single_process_ceiling(path: Path, batches: list[int], seconds: float) -> dict[int, dict[str, float]]:
    """Per batch size: the best median evaluation time in this process over the ways the server can evaluate:
    1 torch thread, all CPUs as torch threads (CM_CPU_PARALLEL=operators), and all CPUs as slices of the
    batch with one torch thread each (slices, the default). `threads` is the CPUs used, `slices` 1 or that."""
    loaded = checkpoint.load(path)
    cpus = usable_cpus()
    saved = torch.get_num_threads()
    ways = sorted({(1, 1), (cpus, 1), (cpus, cpus)})  # (threads, slices)
    results: dict[int, dict[str, float]] = {}
    for threads, slices in ways:
        torch.set_num_threads(threads if slices == 1 else 1)
        engine = Engine(loaded.model, trace=True, cpu_slices=slices)  # traced, as the server runs it
        for b in batches:
            args = evaluation_inputs(loaded, b)
            for _ in range(3):
                engine.evaluate(*args)
            times = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end or len(times) < 5:
                t = time.perf_counter()
                engine.evaluate(*args)
                times.append(time.perf_counter() - t)
            median = statistics.median(times)
            best = results.get(b)
            if best is None or median < best["forward_s"]:
                results[b] = {"forward_s": median, "images_per_s": b / median, "threads": threads, "slices": slices}
    torch.set_num_threads(saved)
    return results


def share(b: int, workers: int, index: int) -> int:
    """Worker `index`'s part of b images split as evenly as possible: the parts add up to b (some 0 when b < N)."""
    return b // workers + (index < b % workers)


def _throughput_worker(index: int, workers: int, path: str, batches: list[int], seconds: float, barrier: Any,
                       results: Any) -> None:
    """One of N concurrent processes: its images/s for its share of each batch size, windows started together.

    Threads and CPUs as the server's worker `index` gets them (CM_CPU_AFFINITY defaults on)."""
    torch.set_num_threads(worker_threads(workers))
    cpus = worker_cpus(index, workers)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    loaded = checkpoint.load(Path(path))
    engine = Engine(loaded.model, trace=True)  # as the server runs it (CM_TRACE defaults on)
    rates: dict[int, float] = {}
    for b in batches:
        mine = share(b, workers, index)
        args = evaluation_inputs(loaded, max(mine, 1))
        for _ in range(3 if mine else 0):
            engine.evaluate(*args)
        barrier.wait()
        start = time.perf_counter()
        count = 0
        while mine and (count < 1 or time.perf_counter() < start + seconds):
            engine.evaluate(*args)
            count += 1
        rates[b] = mine * count / (time.perf_counter() - start)
    results.put(rates)


def multi_process_ceiling(path: Path, batches: list[int], workers: int, seconds: float) -> dict[int, float]:
    """Per batch size b: images/s summed over `workers` spawned processes evaluating their shares of b images
    (about b / workers each) at the same time, with the server's default torch threads per worker."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    procs = [ctx.Process(target=_throughput_worker, args=(i, workers, str(path), batches, seconds, barrier, results),
                         daemon=True) for i in range(workers)]
    rates: list[dict[int, float]] = []
    try:
        for proc in procs:
            proc.start()
        while len(rates) < workers:
            try:
                rates.append(results.get(timeout=1.0))
            except queue.Empty:
                if any(proc.exitcode not in (None, 0) for proc in procs):
                    raise SystemExit("a model-ceiling process failed") from None
    finally:
        for proc in procs:
            if proc.is_alive() and len(rates) < workers:
                proc.terminate()
            proc.join()
    return {b: sum(r[b] for r in rates) for b in batches}


def model_ceiling(path: Path, batches: list[int], seconds: float = 1.0,
                  workers: int = 1) -> dict[int, dict[str, float]]:
    """Per batch size: the engine alone (no HTTP), the best of one process and `workers` processes at once.

    forward_s stays the one-process best time (one request is served by one worker); images_per_s is the
    higher of one process and the workers' sum, and threads / processes say which one it is."""
    results = single_process_ceiling(path, batches, seconds)
    for m in results.values():
        m["single_images_per_s"], m["single_way"], m["processes"] = m["images_per_s"], way(m), 1
    if workers == 1:
        return results
    summed = multi_process_ceiling(path, batches, workers, seconds)
    for b, m in results.items():
        m["workers_images_per_s"] = summed[b]
        if summed[b] > m["images_per_s"]:
            m.update(images_per_s=summed[b], threads=worker_threads(workers), slices=1, processes=workers)
    return results


def sleep_reach(args: argparse.Namespace) -> int:
    """Images the sleeping devices take per sleep: CM_MAX_BATCH on each of --devices."""
    return args.max_batch * max(1, len([d for d in args.devices.split(",") if d.strip()]))


def sleep_ceiling(batches: list[int], ms: float) -> dict[int, dict[str, float]]:
    """The sleeping engine's ceiling: b images per sleep of `ms`, whatever b."""
    return {b: {"forward_s": ms / 1e3, "images_per_s": b / (ms / 1e3), "threads": 0, "slices": 1,
                "single_images_per_s": b / (ms / 1e3), "single_way": f"a sleep of {ms:g} ms", "processes": 1}
            for b in batches}


def print_model_ceiling(model: dict[int, dict[str, float]], workers: int) -> None:
    if workers == 1:
        print("model ceiling (engine alone, no HTTP), one evaluation:")
        for b, m in model.items():
            print(f"  batch {b:4d}: {m['forward_s'] * 1e3:8.2f} ms  {m['images_per_s']:8.0f} images/s  "
                  f"({way(m)})")
        return
    threads = worker_threads(workers)
    print(f"model ceiling (engine alone, no HTTP): one process, best of 1 / {usable_cpus()} threads / slices | "
          f"{workers} processes at once, {threads} thread{'s' if threads > 1 else ''} each, b split evenly among them "
          "(summed); the ceiling is the higher:")
    for b, m in model.items():
        won = "1 process" if m["processes"] == 1 else f"{workers} processes"
        print(f"  batch {b:4d}: {m['forward_s'] * 1e3:8.2f} ms  {m['single_images_per_s']:8.0f} images/s "
              f"({m['single_way']}) | {m['workers_images_per_s']:8.0f} images/s  → {won}")


def way(m: dict[str, float]) -> str:
    """How an evaluation of the ceiling ran: '2 threads' (one batch, intra-op) or '2 slices'."""
    if m["slices"] > 1:
        return f"{m['slices']:.0f} slices"
    return f"{m['threads']:.0f} thread{'s' if m['threads'] > 1 else ''}"


# ---------------------------------------------------------------------- HTTP alone


def http_ceiling(concurrency: list[int], duration: float, workers: int, log: Path) -> dict[int, float]:
    """Requests/s of the bare endpoint (bench.harness.bare_app) at each wrk concurrency."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "bench.load", "--serve-bare", str(port), "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    http: dict[int, float] = {}
    with process(argv, env, url + "/docs", log):
        for c in concurrency:
            run = WrkRun({"n": 1}, c)
            drive(url, [run], duration)
            http[c] = run.requests_per_s
    return http


# ---------------------------------------------------------------------- ceilings of a scenario


def model_images_per_s(model: dict[int, dict[str, float]], batch: int, steps: float) -> float:
    """Engine-alone images/s for `steps`-step images at the largest measured batch ≤ `batch`."""
    usable = max(b for b in model if b <= batch)
    return model[usable]["images_per_s"] / steps


def combined(model_img_s: float, http_req_s: float, n: int) -> float:
    """1 / (1/model + 1/HTTP) per image: the model and the HTTP work share the cores."""
    return 1 / (1 / model_img_s + 1 / (http_req_s * n))


# ---------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="model to serve (default: the embedded digits model)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    parser.add_argument("--concurrency", type=int_list, default=[1, 4, 16, 64], help="e.g. 1,4,16,64")
    parser.add_argument("--n", type=int_list, default=[1, 8], help="images per request, e.g. 1,8")
    parser.add_argument("--steps", default="1,2,mix",
                        help=f"step counts, {MIX} (half 1-step, half 4-step clients) and/or {RANDOM} (each request "
                        "1- or 4-step at random)")
    parser.add_argument("--tasks", default="generate",
                        help=f"scenario kinds, comma-separated, of {', '.join(TASKS)} (edits: step counts, not {MIX})")
    parser.add_argument("--max-batch", type=int, default=256, help="CM_MAX_BATCH of the server")
    parser.add_argument("--frontends", type=int, default=1,
                        help="CM_FRONTENDS of the server: N HTTP processes feeding one engine process (the HTTP "
                        "ceiling then takes N processes too)")
    parser.add_argument("--workers", type=int, default=1,
                        help="CM_WORKERS of the server; the bare HTTP endpoint and the model ceiling use as many")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="CM_TORCH_THREADS of the server (0: its default, max(1, CPUs // workers))")
    parser.add_argument("--devices", default="",
                        help="CM_DEVICES of the server (e.g. cpu,cpu: two engines; with --sleep-engine, two devices)")
    parser.add_argument("--log-level", default="info", help="CM_LOG_LEVEL of the server (one JSON line per request)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--sleep-engine", type=float, nargs="?", const=DEFAULT_SLEEP_MS, metavar="MS",
                        help="serve with every evaluation a sleep of MS per batch (default when given without a "
                        f"value: {DEFAULT_SLEEP_MS:g}; bench/sleep_engine.py) instead of the network")
    parser.add_argument("--sleep-sync", action="store_true",
                        help="with --sleep-engine: a synchronous device (evaluate sleeps; no pipelining), the A/B of "
                        "the default asynchronous one")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-sleep", type=float, metavar="MS", help=argparse.SUPPRESS)  # the sleeping server
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    if args.sleep_engine is not None and not args.sleep_engine > 0:
        parser.error(f"--sleep-engine {args.sleep_engine}: must be more than 0 ms")
    if args.sleep_sync and args.sleep_engine is None and args.serve_sleep is None:
        parser.error("--sleep-sync needs --sleep-engine")
    kinds = args.steps.split(",")
    bad = [k for k in kinds if k not in (MIX, RANDOM) and not k.isdigit()]
    if bad:
        parser.error(f"--steps {args.steps}: {bad} not allowed; give step counts, {MIX} and/or {RANDOM}")
    args.steps = [k if k in (MIX, RANDOM) else int(k) for k in kinds]
    args.tasks = args.tasks.split(",")
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        parser.error(f"--tasks {unknown}: allowed are {', '.join(TASKS)}")
    return args


def serve_scenarios(args: argparse.Namespace, ckpt: Path, log: Path, model: dict[int, dict[str, float]],
                    http: dict[int, float]) -> list[Scenario]:
    """Every scenario against one `python -m service`, each row printed as it finishes."""
    settings = {"CM_MODELS": f"digits={ckpt}", "CM_LOG_LEVEL": args.log_level, "CM_MAX_BATCH": str(args.max_batch),
                "CM_MAX_IMAGES_PER_REQUEST": str(max(args.n)), "CM_TORCH_THREADS": str(args.torch_threads),
                "CM_WORKERS": str(args.workers), "CM_FRONTENDS": str(args.frontends)}
    if args.devices:
        settings["CM_DEVICES"] = args.devices
    threads = worker_threads(args.workers, args.torch_threads)
    sleeping = args.sleep_engine is not None
    engine = (f"every evaluation a sleep of {args.sleep_engine:g} ms "
              f"({'synchronous' if args.sleep_sync else 'asynchronous'})" if sleeping
              else f"torch threads {threads} per worker")
    devices = f", CM_DEVICES={args.devices}" if args.devices else ""
    print(f"\nservice: python -m service, CM_WORKERS={args.workers}, CM_FRONTENDS={args.frontends}{devices}, "
          f"CM_MAX_BATCH={args.max_batch}, "
          f"{engine}, log level {args.log_level} (log: {log})")
    # A mix needs two connections (one per step count), so it starts at concurrency 2; edits take step counts.
    shape = checkpoint.load(ckpt).meta.config.image_shape
    scenarios = [Scenario(c, n, s, task=t, image_shape=shape) for t in args.tasks for n in args.n for s in args.steps
                 for c in args.concurrency
                 if (s != MIX or c >= 2) and (t == "generate" or s not in (MIX, RANDOM))]
    argv = ([sys.executable, "-m", "bench.load", "--serve-sleep", str(args.sleep_engine),
             *(["--sleep-sync"] if args.sleep_sync else [])] if sleeping else None)
    logged = args.log_level in ("debug", "info")  # latencies by step count come from the access log
    with service(settings, log, argv=argv) as server:
        warm_up(server.url)
        print(f"{'scenario':<24} {'images/s':>9} {'ceiling':>8} {'ratio':>6} {'img/eval':>8}  "
              "latency ms p50 / p95 / p99 by steps")
        for scenario in scenarios:
            run_scenario(server.url, scenario, args.duration, log if logged else None)
            print(format_row(scenario, model, http, sleep_reach(args) if sleeping else args.max_batch, sleeping))
    return scenarios


def main() -> None:
    args = parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare, args.workers)
        return
    if args.serve_sleep:
        sys.exit(serve_sleeping(args.serve_sleep, args.sleep_sync))
    require_wrk()
    tmp = Path(tempfile.mkdtemp(prefix="cmserve-load-"))
    ckpt, ckpt_note = default_checkpoint(tmp) if args.checkpoint is None else (args.checkpoint, str(args.checkpoint))
    print(f"machine: {machine(torch.device('cpu'))}, {usable_cpus()} usable CPUs")
    print(f"model: {ckpt_note}")
    print("note: server, wrk and this script share the same cores (and, on a shared machine, other jobs)\n")

    # Ceiling 1: the engine alone.
    batches = sorted({1, *(min(c * n, args.max_batch) for c in args.concurrency for n in args.n), args.max_batch})
    sleeping = args.sleep_engine is not None
    if sleeping:  # each device sleeps once for up to CM_MAX_BATCH images
        reach = sleep_reach(args)
        model = sleep_ceiling(sorted({*batches, *(min(c * n, reach) for c in args.concurrency for n in args.n)}),
                              args.sleep_engine)
        print(f"model ceiling: a sleep of {args.sleep_engine:g} ms per evaluation of up to {args.max_batch} images "
              f"on each of {reach // args.max_batch} device(s)")
    else:
        model = model_ceiling(ckpt, batches, workers=args.workers)
        print_model_ceiling(model, args.workers)

    # Ceiling 2: a bare FastAPI endpoint, same uvicorn, same number of worker processes, same wrk.
    processes = max(args.workers, args.frontends)
    http = http_ceiling(args.concurrency, min(args.duration, 3.0), processes, tmp / "bare.log")
    print(f"\nHTTP ceiling (bare FastAPI endpoint returning a fixed PNG, {processes} uvicorn worker process"
          f"{'es' if processes > 1 else ''}, wrk):")
    for c, rps in http.items():
        print(f"  concurrency {c:3d}: {rps:8.0f} requests/s")

    scenarios = serve_scenarios(args, ckpt, tmp / "service.log", model, http)
    reach = sleep_reach(args) if sleeping else args.max_batch

    # The machine's speed drifts over a run's minutes: measure the concurrency-64 model ceiling again now, and
    # give those ratios against both measurements.
    again = sorted({min(64 * n, args.max_batch) for n in args.n} & set(batches)) if 64 in args.concurrency else []
    again = [] if sleeping else again
    model_after = model_ceiling(ckpt, again, workers=args.workers) if again else {}
    for b, m in model_after.items():
        print(f"\nmodel ceiling measured again after the scenarios: batch {b}: {m['images_per_s']:.0f} images/s "
              f"(at the start: {model[b]['images_per_s']:.0f})")
    report = targets(scenarios, model, http, reach, model_after, reach // args.max_batch if sleeping else 0)
    print("\ntargets:")
    for line in report:
        print("  " + line)
    if args.json:
        write_json(args.json, {
            "workers": args.workers,
            "torch_threads_per_worker": worker_threads(args.workers, args.torch_threads),
            "sleep_engine_ms": args.sleep_engine,
            "devices": args.devices,
            "model": {str(b): m for b, m in model.items()},
            "model_after": {str(b): m for b, m in model_after.items()},
            "http_requests_per_s": http,
            "scenarios": [{"concurrency": s.concurrency, "n": s.n, "steps": s.steps, "task": s.task,
                           "images_per_s": s.images_per_s,
                           "images_per_forward": s.images_per_forward,
                           "server_ms_by_steps": {str(k): {"count": len(v), **{f"p{p}": percentile(v, p)
                                                                              for p in (50, 95, 99)}}
                                                  for k, v in s.by_steps.items()},
                           "runs": [{"body": r.body, "connections": r.connections, **r.stats} for r in s.runs]}
                          for s in scenarios],
            "targets": report,
        })


def ceiling_of(scenario: Scenario, model: dict[int, dict[str, float]], http: dict[int, float], max_batch: int,
               sleeping: bool = False) -> float:
    """The combined ceiling; with the sleeping engine the device's alone (batch ÷ sleep: a sleep takes no CPU)."""
    batch = min(scenario.concurrency * scenario.n, max_batch)
    device = model_images_per_s(model, batch, scenario.mean_steps)
    return device if sleeping else combined(device, http[scenario.concurrency], scenario.n)


def format_row(s: Scenario, model: dict[int, dict[str, float]], http: dict[int, float], max_batch: int,
               sleeping: bool = False) -> str:
    ceiling = ceiling_of(s, model, http, max_batch, sleeping)
    latencies = "  ".join(r.latency(50, 95, 99) for r in s.runs)
    if s.steps == RANDOM:  # wrk's figures mix the step counts: the server's, by step count
        latencies = "  ".join(f"{k}-step {server_latency(s, k)} (server)" for k in sorted(s.by_steps)) or latencies
    return (f"{s.name:<24} {s.images_per_s:9.0f} {ceiling:8.0f} {s.images_per_s / ceiling:6.2f} "
            f"{s.images_per_forward:8.1f}  {latencies}")


def server_latency(s: Scenario, steps: int) -> str:
    """'p50 / p95 / p99' ms of the scenario's `steps`-step requests by the server's access log."""
    values = s.by_steps.get(steps, [])
    return " / ".join(f"{percentile(values, p):.1f}" for p in (50, 95, 99))


def sleep_report(scenarios: list[Scenario], model: dict[int, dict[str, float]], http: dict[int, float],
                 max_batch: int, devices: int) -> list[str]:
    """With the sleeping engine: at concurrency 64, the share of the device's time the serving path keeps busy."""
    lines = []
    for s in scenarios:
        if s.concurrency != 64 or s.task != "generate" or not isinstance(s.steps, int):
            continue
        batch = min(s.concurrency * s.n, max_batch)  # max_batch: what all the devices take per sleep
        device = ceiling_of(s, model, http, max_batch, sleeping=True)
        sleep_s = model[batch]["forward_s"]
        busy = s.images_per_s * s.steps / s.images_per_forward * sleep_s / devices if s.images_per_forward else 0.0
        lines.append(f"c=64 n={s.n} {s.steps}-step: {s.images_per_s:.0f} images/s ÷ ({batch} ÷ {sleep_s * 1e3:g} ms "
                     f"= {device:.0f}) = {s.images_per_s / device:.2f} of the device's time hidden; {devices} "
                     f"device(s) busy {busy:.0%} at {s.images_per_forward:.1f} images per evaluation; HTTP alone "
                     f"{http[64] * s.n:.0f} images/s")
    return lines


def targets(scenarios: list[Scenario], model: dict[int, dict[str, float]], http: dict[int, float],
            max_batch: int, model_after: dict[int, dict[str, float]] | None = None,
            sleep_devices: int = 0) -> list[str]:
    """The targets' verdicts; with the sleeping engine (on `sleep_devices` devices) its report instead."""
    if sleep_devices:
        return sleep_report(scenarios, model, http, max_batch, sleep_devices)
    lines = []
    by_key = {(s.concurrency, s.n, s.steps, s.task): s for s in scenarios}
    for (c, n, steps, task), s in by_key.items():
        if task != "generate":
            if task == "inpaint" and c == 64 and (c, n, steps, "generate") in by_key:
                ratio = s.images_per_s / by_key[(c, n, steps, "generate")].images_per_s
                lines.append(f"c=64 n={n} {steps}-step: inpainting {s.images_per_s:.0f} images/s = {ratio:.2f} × "
                             f"generation (target ≥ 0.90): {'PASS' if ratio >= 0.9 else 'MISS'}")
            continue
        if c == 64 and steps == 1:
            ratio = s.images_per_s / ceiling_of(s, model, http, max_batch)
            after = ""
            if model_after and min(c * n, max_batch) in model_after:
                later = s.images_per_s / ceiling_of(s, {**model, **model_after}, http, max_batch)
                after = f"; {later:.2f} × the ceiling measured again at the end"
            lines.append(f"c=64 n={n} 1-step: {s.images_per_s:.0f} images/s = {ratio:.2f} × combined ceiling "
                         f"(target ≥ 0.80): {'PASS' if ratio >= 0.8 else 'MISS'}{after}")
        if c == 1 and steps == 1:
            forward_ms = model[min(n, max_batch)]["forward_s"] * 1e3
            p50 = s.runs[0].stats["p50_us"] / 1e3
            ok = p50 <= forward_ms + 3
            lines.append(f"c=1 n={n} 1-step: p50 {p50:.2f} ms vs one forward pass {forward_ms:.2f} ms + 3 ms: "
                         f"{'PASS' if ok else 'MISS'}")
        if steps == RANDOM:
            lines += random_mix_targets(s, by_key.get((c, n, 1, "generate")), model, http, max_batch, model_after)
        if steps == MIX and (c, n, 1, "generate") in by_key:
            alone = by_key[(c, n, 1, "generate")].runs[0].stats["p99_us"] / 1e3
            mixed = s.runs[0].stats["p99_us"] / 1e3
            ok = mixed <= 1.5 * alone
            lines.append(f"c={c} n={n}: 1-step p99 in the 1/4 mix {mixed:.1f} ms vs alone {alone:.1f} ms "
                         f"(≤ 1.5×): {'PASS' if ok else 'MISS'}")
    return lines


def random_mix_targets(s: Scenario, alone: Scenario | None, model: dict[int, dict[str, float]],
                       http: dict[int, float], max_batch: int,
                       model_after: dict[int, dict[str, float]] | None = None) -> list[str]:
    """The random 1/4-step mix against its ceiling (at concurrency 64) and its 1-step p99 against 1-step alone,
    both p99s from the server's access log."""
    lines = []
    c, n = s.concurrency, s.n
    if c == 64:
        ratio = s.images_per_s / ceiling_of(s, model, http, max_batch)
        verdict = "PASS" if ratio >= 0.8 else "MISS"
        after = ""
        if model_after and min(c * n, max_batch) in model_after:
            later = s.images_per_s / ceiling_of(s, {**model, **model_after}, http, max_batch)
            after = f"; {later:.2f} × the ceiling measured again at the end"
        lines.append(f"c=64 n={n} random 1/4-step: {s.images_per_s:.0f} images/s = {ratio:.2f} × combined ceiling "
                     f"({s.mean_steps:.2f} evaluations per request; target ≥ 0.80): {verdict}{after}")
    if alone is not None and s.by_steps.get(1) and alone.by_steps.get(1):
        mixed, single = percentile(s.by_steps[1], 99), percentile(alone.by_steps[1], 99)
        ok = mixed <= 1.5 * single
        lines.append(f"c={c} n={n}: 1-step p99 in the random mix {mixed:.1f} ms vs alone {single:.1f} ms (server log, "
                     f"≤ 1.5×): {'PASS' if ok else 'MISS'}")
    return lines


if __name__ == "__main__":
    main()
