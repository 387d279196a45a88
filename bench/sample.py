"""Sampling throughput and model-FLOP utilization (MFU) against the measured fp32 matmul peak.

    python -m bench.sample                                   # digits on CPU, batch 1/16/64/256, 1 and 2 steps
    python -m bench.sample --preset cifar10 --device cuda --dtype bf16 --compile --batches 64,256

MFU = images/s × steps × FLOPs per network evaluation / peak, where the peak is the best fp32 matmul
rate this machine reaches (MKL's sgemm and oneDNN's GEMM on the CPU, cuBLAS on a GPU; TF32 off).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness import int_list, random_model, sync, write_json
from models.__main__ import flops_per_image
from models.sampling import default_sigmas, sample

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def best_rate(fn: Callable[[], object], work: float, device: torch.device, seconds: float = 0.5) -> float:
    """Best of 5 timed rounds of `fn` (each about `seconds` long), in work units per second."""
    fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    reps = max(1, int(seconds / max(time.perf_counter() - t, 1e-6)))
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        best = max(best, work * reps / (time.perf_counter() - t))
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """The best dense matmul FLOP/s reached here, over sizes and (on CPU) both BLAS back ends."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    best = 0.0
    for n in (1024, 2048, 4096) + ((8192,) if device.type == "cuda" else ()):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, best_rate(lambda a=a, b=b: a @ b, 2 * n**3, device))
        if device.type == "cpu":  # oneDNN's GEMM: a 1x1 convolution over channels-last activations
            x = torch.randn(16, n, 16, 16).to(memory_format=torch.channels_last)
            w = torch.randn(n, n, 1, 1)
            best = max(best, best_rate(lambda x=x, w=w: F.conv2d(x, w), 2 * 16 * 256 * n * n, device))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batches", type=int_list, default=[1, 16, 64, 256], help="e.g. 64,256")
    parser.add_argument("--steps", type=int_list, default=[1, 2], help="e.g. 1,2")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--tf32", action="store_true", help="let cuDNN/cuBLAS use TF32 for fp32 (their default)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = args.tf32  # off: fp32 really is fp32, comparable with the fp32 peak

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model = random_model(args.preset).eval().requires_grad_(False)
    cfg = model.cfg
    flops = flops_per_image(model)
    model = model.to(device=device, dtype=dtype)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model.backbone = torch.compile(model.backbone, dynamic=False)
    peak = matmul_peak(device, torch.float32)
    peak_dtype = matmul_peak(device, dtype) if dtype != torch.float32 else peak
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {args.preset}: {model.num_parameters() / 1e6:.2f} M parameters, {flops / 1e9:.4f} GFLOPs per evaluation")
    print(f"# device {name}, threads {torch.get_num_threads()}, dtype {args.dtype}, compile {args.compile}, "
          f"tf32 {args.tf32}, torch {torch.__version__}")
    print(f"# measured matmul peak: fp32 {peak / 1e12:.3f} TFLOP/s, {args.dtype} {peak_dtype / 1e12:.3f} TFLOP/s")
    print(f"{'steps':>5} {'batch':>6} {'images/s':>10} {'ms/batch':>9} {'MFU fp32':>9} {'MFU dtype':>9}")
    results = []
    for steps in args.steps:
        sigmas = default_sigmas(steps, cfg.sigma_min, cfg.sigma_max)
        for batch in args.batches:
            seeds = list(range(batch))
            rate = best_rate(lambda s=seeds, g=sigmas: sample(model, s, g, device=device, dtype=dtype), batch, device)
            mfu = rate * steps * flops / peak
            mfu_dtype = rate * steps * flops / peak_dtype
            results.append({"steps": steps, "batch": batch, "images_per_s": rate, "mfu_fp32_peak": mfu,
                            "mfu_dtype_peak": mfu_dtype})
            print(f"{steps:>5} {batch:>6} {rate:>10.1f} {1e3 * batch / rate:>9.2f} {mfu:>9.1%} {mfu_dtype:>9.1%}")
    if args.json:
        write_json(args.json, {"preset": args.preset, "device": name, "dtype": args.dtype, "compile": args.compile,
                               "gflops_per_eval": flops / 1e9, "peak_fp32": peak, "peak_dtype": peak_dtype,
                               "results": results})


if __name__ == "__main__":
    main()
