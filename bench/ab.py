"""Alternate server configurations on the same minutes: which is faster, where one run's noise is too large.

    python bench/ab.py --concurrency 4 --n 1 --steps 1 --rounds 3 '' 'CM_MAX_WAIT_MS=0'
    git worktree add /tmp/before HEAD~1
    python bench/ab.py --concurrency 64 --rounds 4 '' '/tmp/before::'      # this checkout against HEAD~1

Each CONFIG is `K=V,K=V` (CM_ settings for `python -m service`; '' for the defaults), optionally prefixed with
`DIR::` to run the service from another checkout. Every round runs each configuration once, in turn, each on a
fresh server of the embedded default model: 1 s of warm-up, then wrk (bench/wrk/post.lua) for --duration
seconds with --concurrency connections, or for `--steps mix` half of them 1-step and half 4-step. Printed per
run: images/s, mean images per network evaluation (from /metrics) and p50 / p99 per step count. The VM this
project is measured on drifts by more than most changes gain (BENCHMARKS.md), so compare configurations
within a round, over several rounds, and alternate their order (--reverse) between invocations.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load  # bench/load.py: wrk runs, the server process, metrics


def parse_config(text: str) -> tuple[Path, dict[str, str]]:
    where, _, settings = text.rpartition("::")
    env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
    bad = [k for k in env if not k.startswith("CM_")]
    if bad:
        raise SystemExit(f"CONFIG {text!r}: settings must be CM_ variables, got {bad}")
    return (Path(where).resolve() if where else load.REPO), env


def run(where: Path, settings: dict[str, str], args: argparse.Namespace) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="cmserve-ab-"))
    port = load.free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CM_")}
    env.update({"CM_MODELS": f"digits={load.EMBEDDED_DEFAULT}", "CM_PORT": str(port),
                "CM_MAX_IMAGES_PER_REQUEST": str(max(args.n, 1)), **settings})
    scenario = load.Scenario(args.concurrency, args.n, load.MIX if args.steps == load.MIX else int(args.steps))
    with load.process([sys.executable, "-m", "service"], env, url + "/readyz", tmp / "service.log", cwd=where):
        load.wait_workers(tmp / "service.log", int(settings.get("CM_WORKERS", 1)), "info")
        load.drive(url, [load.WrkRun({"n": 1, "steps": 1}, 4)], 1.0)
        load.run_scenario(url, scenario, args.duration)
    runs = scenario.runs
    errors = sum(r.errors for r in runs)
    latency = "  ".join(f"{r.body['steps']}-step {r.stats['p50_us'] / 1e3:.1f} / {r.stats['p99_us'] / 1e3:.1f} ms"
                        for r in runs)
    note = f"  ({errors} errors)" if errors else ""
    return f"{scenario.images_per_s:8.0f} images/s  {scenario.images_per_forward:6.1f} img/eval  {latency}{note}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", metavar="CONFIG")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--steps", default="1", help="1, 2, 4 or mix")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--reverse", action="store_true", help="run the configurations in reverse order each round")
    args = parser.parse_args()
    if args.steps != "mix" and not args.steps.isdigit():
        parser.error("--steps must be a number of steps or mix")
    if args.steps == "mix" and args.concurrency < 2:
        parser.error("--steps mix needs --concurrency of at least 2")
    configs = [(text, *parse_config(text)) for text in args.configs]
    order = list(reversed(configs)) if args.reverse else configs
    print(f"c={args.concurrency} n={args.n} steps={args.steps}, {args.duration:g} s per run")
    for r in range(args.rounds):
        for text, where, settings in order:
            print(f"round {r}  {text or '(defaults)':<36} {run(where, settings, args)}", flush=True)


if __name__ == "__main__":
    main()
