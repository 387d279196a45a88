"""The network alone on the CPU, by batch size: one torch thread, all CPUs as torch threads, all CPUs as slices.

    python -m bench.cpu_parallel                 # the embedded default model, batches 1 … 256
    python -m bench.cpu_parallel --batches 16,64 --reps 9
    python -m bench.cpu_parallel --oneDNN        # without the batch-invariant kernels (CM_BATCH_INVARIANT=false)

The three ways the service can evaluate a CPU batch (CM_CPU_PARALLEL, service/engine.py): one torch thread;
`operators`, torch's intra-op parallelism over all usable CPUs; `slices`, the batch cut into slices of at
most SLICE_IMAGES (24) images that as many threads as CPUs take in turn, each with one torch thread. The
network is traced, as the server runs it. Printed per batch size: the best over --reps runs of the mean time
of one evaluation (each run evaluates for at least --seconds), and µs per image. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.harness import EMBEDDED_DEFAULT, evaluation_inputs, int_list
from models import checkpoint
from service.engine import Engine
from service.settings import usable_cpus


def best_time(engine: Engine, inputs: tuple, reps: int, seconds: float) -> float:
    """The smallest mean time of one evaluation over `reps` runs of at least `seconds` each."""
    for _ in range(2):
        engine.evaluate(*inputs)
    best = float("inf")
    for _ in range(reps):
        count, start = 0, time.perf_counter()
        while count < 2 or time.perf_counter() - start < seconds:
            engine.evaluate(*inputs)
            count += 1
        best = min(best, (time.perf_counter() - start) / count)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=EMBEDDED_DEFAULT)
    parser.add_argument("--batches", type=int_list, default=[1, 2, 4, 8, 16, 32, 64, 128, 256], help="e.g. 16,64")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--oneDNN", action="store_true",
                        help="oneDNN's kernels, as with CM_BATCH_INVARIANT=false (default: the per-image ones)")
    args = parser.parse_args()
    batches = args.batches
    loaded = checkpoint.load(args.checkpoint)
    cpus = usable_cpus()
    ways = [("1 thread", 1, 1), (f"{cpus} threads", cpus, 1), (f"{cpus} slices", 1, cpus)]
    if cpus == 1:
        ways = ways[:1]
    print(f"{args.checkpoint.name}, torch {torch.__version__}, {cpus} usable CPUs, "
          f"{'oneDNN' if args.oneDNN else 'batch-invariant'} kernels; ms per evaluation "
          f"(µs per image), best of {args.reps}")
    print(f"{'batch':>6}" + "".join(f"{name:>22}" for name, _, _ in ways))
    results: dict[int, list[float]] = {b: [] for b in batches}
    for _, threads, slices in ways:  # every batch size with one engine, then the next way
        torch.set_num_threads(threads)
        engine = Engine(loaded.model, trace=True, cpu_slices=slices, batch_invariant=not args.oneDNN)
        for b in batches:
            results[b].append(best_time(engine, evaluation_inputs(loaded, b), args.reps, args.seconds))
    for b in batches:
        print(f"{b:>6}" + "".join(f"{t * 1e3:>12.2f} ms ({t / b * 1e6:4.0f})" for t in results[b]))


if __name__ == "__main__":
    main()
