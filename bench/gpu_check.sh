#!/usr/bin/env bash
# Every GPU check of the project in one short script, for a machine with one NVIDIA GPU.
# Writes its results under $OUT (default ./artifacts/gpu) and prints a summary. The default sections are those
# with no GPU figures yet (about 8-10 minutes on an H100, to fit a 15-minute device budget with the machine's
# start); sample, train and serve were measured before (BENCHMARKS.md) and rerun with SECTIONS="sample train serve".
#   OUT=/tmp/gpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "=== $* ($(date +%T))"; }
SECTIONS=${SECTIONS:-tests frontends public}  # any subset of: tests sample train serve compile public frontends
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
# The web stack and diffusers are not in the GPU image: wheels for them travel in .whl/ (see the device tool's README).
if [ -d .whl ] && ! $PY -c 'import fastapi' 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

if want tests; then
log "tests marked gpu"
$PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests/unit 2>&1 | tail -15
fi

if want sample; then
log "sampling: cifar10 preset, bf16 and fp32, eager and torch.compile (issue 2)"
for dtype in bf16 fp32; do
  $PY -m bench.sample --preset cifar10 --device cuda --dtype $dtype --batches 1,64,256 --steps 1,2 \
    --json "$OUT/sample_cifar10_${dtype}_eager.json"
  $PY -m bench.sample --preset cifar10 --device cuda --dtype $dtype --batches 256 --steps 1,2 --compile \
    --channels-last --json "$OUT/sample_cifar10_${dtype}_compile.json"
done
fi

if want train; then
  log "training throughput: cifar10 preset, bf16 (issue 3)"
  $PY -m bench.train_speed --preset cifar10 --device cuda --precision bf16 --json "$OUT/train_cifar10_bf16.json"
fi

if want serve; then
  log "serving: cifar10 preset through the real HTTP service on the GPU, bf16, traced (the default) and eager (issue 4)"
  $PY -m bench.gpu_serve --preset cifar10 --dtype bf16 --concurrency 16,64 --n 8 --steps 1,2 --duration 8 \
    --json "$OUT/serve_cifar10_bf16.json"
  $PY -m bench.gpu_serve --preset cifar10 --dtype bf16 --concurrency 16,64 --n 8 --steps 1,2 --duration 8 --no-trace \
    --json "$OUT/serve_cifar10_bf16_eager.json"
fi
if want compile; then
  log "serving with CM_COMPILE=true, buckets 64/128/256 (the GPU setting README recommends under load)"
  CM_BATCH_BUCKETS=64,128,256 $PY -m bench.gpu_serve --preset cifar10 --dtype bf16 --compile --concurrency 16,64 \
    --n 8 --steps 1,2 --duration 6 --json "$OUT/serve_cifar10_bf16_compile.json"
fi
if want public; then
  log "public consistency models (issue 16): equality with diffusers on CUDA, memory of 256x256 batches"
  $PY -m pytest -q -s -m gpu -p no:cacheprovider tests/unit/models/test_convert.py tests/integration/test_public_models.py \
    2>&1 | tail -8
  log "full-size ImageNet-64, bf16: our sampler against diffusers' pipeline at its best batch, same card"
  $PY -m bench.diffusers_compare --model imagenet64 --device cuda --dtype bf16 --steps 1,2 --batches 1,16,64,128,256 \
    --check --save-checkpoint "$OUT/imagenet64_random.safetensors" --json "$OUT/diffusers_compare_imagenet64_bf16.json"
  log "full-size ImageNet-64 served in bf16 at concurrency 64"
  $PY -m bench.gpu_serve --checkpoint "$OUT/imagenet64_random.safetensors" --dtype bf16 --concurrency 64 --n 1 \
    --steps 1,2 --duration 8 --json "$OUT/serve_imagenet64_bf16.json"
fi
if want frontends; then
  # About 5.5 minutes on an H100: the traced matrix (16 scenarios of 0.8 + 3 s, the engine alone, the load generator
  # against the bare endpoint, a server start) ~2 min; CM_PIPELINE=false (2 scenarios) ~0.5 min; CM_FRONTENDS=4 (4 scenarios) ~1 min; reduce-overhead ~2 min,
  # most of it compiling buckets 1 and 16 in the engine-alone process and 1-16 in the server (a shape compiled once
  # comes from inductor's cache the second time). Cut CM_BATCH_BUCKETS to 1,4,16 if compiling runs long.
  log "serving at the network's speed (issue 18): served against the engine alone and the load generator alone"
  $PY -m bench.gpu_serve --preset cifar10 --dtype bf16 --concurrency 1,16,64,256 --n 1,8 --steps 1,2 --duration 3 \
    --engine-seconds 0.5 --json "$OUT/serve_frontends_cifar10_bf16.json"
  log "the A/B of pipelining: CM_PIPELINE=false, concurrency 64"
  CM_PIPELINE=false $PY -m bench.gpu_serve --preset cifar10 --dtype bf16 --concurrency 64 --n 1,8 --steps 1 \
    --duration 3 --engine-seconds 0.5 --json "$OUT/serve_no_pipeline_cifar10_bf16.json"
  log "the same with CM_FRONTENDS=4, concurrency 64 and 256"
  $PY -m bench.gpu_serve --preset cifar10 --dtype bf16 --concurrency 64,256 --n 1,8 --steps 1 --duration 3 \
    --engine-seconds 0.5 --frontends 4 --json "$OUT/serve_frontends4_cifar10_bf16.json"
  log "CUDA graphs for the small buckets (CM_COMPILE_MODE=reduce-overhead), concurrency 1 and 16"
  CM_BATCH_BUCKETS=1,2,4,8,16 CM_MAX_BATCH=16 $PY -m bench.gpu_serve --preset cifar10 --dtype bf16 \
    --compile-mode reduce-overhead --concurrency 1,16 --n 1 --steps 1,2 --duration 3 --engine-seconds 0.5 \
    --json "$OUT/serve_reduce_overhead_cifar10_bf16.json"
fi
} 2>&1 | tee "$OUT/gpu_check.log"
