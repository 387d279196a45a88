"""The engine thread's own host work per evaluation: the scheduler without a network.

    python -m bench.scheduler_cost                      # 64 one-image requests, each 1 or 4 steps at random
    python -m bench.scheduler_cost --steps 1 --clients 64 --evaluations 3000

The served path on the CPU is the network plus this work, run serially on the engine thread while the other
slice threads wait; `bench.load` measures both at once, with the machine's noise. Here the engine has the
digits network's shapes and an evaluation that costs only a clamp, and `clients` closed-loop clients submit a
new request when theirs is answered, in-process. Each evaluation takes every queued image, and a client answered
by one evaluation is back for the one after the next, as served (the random mix's batches then hold about 46 of
64 images). Printed: µs of the engine thread per evaluation and per image-evaluation, best of --reps.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from models.sampling import default_sigmas
from service.engine import Evaluation
from service.scheduler import Job, Scheduler

SHAPE = (1, 8, 8)


class NullEngine:
    """The default model's shapes; evaluating costs only the clamp that the real engine applies too."""

    image_shape = SHAPE
    num_classes = 10
    sigma_min = 0.002
    asynchronous = False

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> Evaluation:
        return Evaluation(out=x.clamp(-1, 1), failed=[])

    def stage(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def fence(self) -> object:
        return lambda: None


def measure(clients: int, steps: list[int], evaluations: int, seed: int) -> tuple[float, float]:
    """(µs per evaluation, mean images per evaluation) over `evaluations` turns of a closed loop of `clients`."""
    scheduler = Scheduler(max_batch=256, max_wait_s=0.0, max_queue=10_000)
    scheduler.add_model("digits", NullEngine())
    schedules = {k: default_sigmas(k) for k in set(steps)}
    draw = random.Random(seed)
    answered: list[Job] = []

    def submit() -> None:
        k = draw.choice(steps)
        scheduler.submit(Job(model="digits", sigmas=schedules[k], seed=draw.randrange(2**31), n=1,
                             class_label=None, deadline=float("inf"), on_done=answered.append))

    returning = 0  # clients answered by the evaluation before: back for the one after the next

    def evaluate() -> float:
        """One evaluation of every queued image, timed; then the clients it answered send again, and so do those
        the one before answered (the clients answered by an evaluation miss the next, as served)."""
        nonlocal returning
        start = time.perf_counter()
        scheduler.run_once(block=False)
        seconds = time.perf_counter() - start
        for _ in range(returning):  # submissions are the event loop's work: not timed
            submit()
        returning = len(answered)
        answered.clear()
        return seconds

    for _ in range(clients):
        submit()
    with torch.no_grad():
        for _ in range(evaluations // 10):  # warm-up
            evaluate()
        images, count = scheduler.images_evaluated, scheduler.evaluations
        seconds = sum(evaluate() for _ in range(evaluations))
    count = scheduler.evaluations - count  # a turn with an empty queue evaluates nothing
    return seconds / count * 1e6, (scheduler.images_evaluated - images) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--steps", default="1,4", help="step counts each request draws from at random")
    parser.add_argument("--evaluations", type=int, default=2000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = [int(s) for s in args.steps.split(",")]
    runs = [measure(args.clients, steps, args.evaluations, seed) for seed in range(args.reps)]
    per_eval, per_batch = min(r[0] for r in runs), sum(r[1] for r in runs) / len(runs)
    print(f"{args.clients} clients, steps {args.steps}: {per_eval:.0f} µs of the engine thread per evaluation "
          f"(best of {args.reps}; all: {', '.join(f'{r[0]:.0f}' for r in runs)}), {per_batch:.1f} images per "
          f"evaluation, {per_eval / per_batch:.1f} µs per image-evaluation")


if __name__ == "__main__":
    main()
