#!/usr/bin/env bash
# Every GPU check of the project in one short script, for a machine with one NVIDIA GPU.
# Writes its results under $OUT (default ./artifacts/gpu) and prints a summary; about 6-8 minutes on an H100.
#   OUT=/tmp/gpu bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log() { echo "=== $* ($(date +%T))"; }
SECTIONS=${SECTIONS:-tests sample train serve public}  # a subset reruns part of the check; "compile" is extra (~2 min)
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
} 2>&1 | tee "$OUT/gpu_check.log"
