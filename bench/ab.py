"""Alternate server configurations on the same minutes: which is faster, where one run's noise is too large.

    python -m bench.ab --concurrency 4 --n 1 --steps 1 --rounds 3 '' 'CM_MAX_WAIT_MS=0'
    git worktree add /tmp/before HEAD~1
    python -m bench.ab --concurrency 64 --rounds 4 '' '/tmp/before::'      # this checkout against HEAD~1

Each CONFIG is `K=V,K=V` (CM_ settings for `python -m service`; '' for the defaults), optionally prefixed
with `DIR::` to run the service from another checkout (its code; this checkout's model file and load). Every
round runs each configuration once, in turn, each on a fresh server of the embedded default model: 1 s of
warm-up, then wrk (bench/wrk/post.lua) for --duration seconds with --concurrency connections, or for
`--steps mix` half of them 1-step and half 4-step, or for `--steps random` each request 1- or 4-step at
random (random.lua). Printed per run: images/s, mean images per network evaluation (from /metrics) and
p50 / p99 per step count (in a step mix, the server's own, from its access log). A shared VM drifts by more
than most changes gain (BENCHMARKS.md, "Reading the serving figures"), so compare configurations within a
round, over several rounds, and alternate their order (--reverse) between invocations.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.harness import MIX, RANDOM, REPO, Scenario, percentile, require_wrk, run_scenario, service, warm_up


def parse_config(text: str) -> tuple[Path, dict[str, str]]:
    """`DIR::K=V,K=V` -> (the checkout to run, its CM_ settings); no DIR is this checkout."""
    where, _, settings = text.rpartition("::")
    env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
    bad = [k for k in env if not k.startswith("CM_")]
    if bad:
        raise SystemExit(f"CONFIG {text!r}: settings must be CM_ variables, got {bad}")
    checkout = Path(where).resolve() if where else REPO
    if not (checkout / "service" / "__main__.py").is_file():
        raise SystemExit(f"CONFIG {text!r}: {checkout} is not a cmserve checkout (no service/__main__.py)")
    return checkout, env


def run(where: Path, settings: dict[str, str], args: argparse.Namespace) -> str:
    """One fresh server of `where` with `settings`: warm-up, the scenario, one line of figures."""
    log = Path(tempfile.mkdtemp(prefix="cmserve-ab-")) / "service.log"
    scenario = Scenario(args.concurrency, args.n, args.steps if args.steps in (MIX, RANDOM) else int(args.steps))
    with service({"CM_MAX_IMAGES_PER_REQUEST": str(max(args.n, 1)), **settings}, log, cwd=where) as server:
        warm_up(server.url)
        run_scenario(server.url, scenario, args.duration, log if scenario.steps in (MIX, RANDOM) else None)
    if scenario.by_steps:  # a step mix: the server's own latencies per step count (wrk's mix them)
        latency = "  ".join(f"{k}-step {percentile(v, 50):.1f} / {percentile(v, 99):.1f} ms (server)"
                            for k, v in sorted(scenario.by_steps.items()))
    else:
        latency = "  ".join(r.latency(50, 99) + " ms" for r in scenario.runs)
    return f"{scenario.images_per_s:8.0f} images/s  {scenario.images_per_forward:6.1f} img/eval  {latency}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", metavar="CONFIG")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--steps", default="1", help="1, 2, 4, mix or random")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--reverse", action="store_true", help="run the configurations in reverse order each round")
    args = parser.parse_args()
    if args.steps not in (MIX, RANDOM) and not args.steps.isdigit():
        parser.error("--steps must be a number of steps, mix or random")
    if args.steps == MIX and args.concurrency < 2:
        parser.error("--steps mix needs --concurrency of at least 2")
    require_wrk()
    configs = [(text, *parse_config(text)) for text in args.configs]
    order = list(reversed(configs)) if args.reverse else configs
    print(f"c={args.concurrency} n={args.n} steps={args.steps}, {args.duration:g} s per run")
    for r in range(args.rounds):
        for text, where, settings in order:
            print(f"round {r}  {text or '(defaults)':<36} {run(where, settings, args)}", flush=True)


if __name__ == "__main__":
    main()
