#!/usr/bin/env bash
# Every GPU check in one pass, most valuable first, each under its own time limit so that one hang
# cannot eat the rest: the CUDA tests (tests/test_gpu.py, slow ones included), the GPU benchmark at
# the paper's CelebA-HQ 256 architecture (invertible memory, then plain autograd), and `make run`'s
# preset trained on the GPU for the step count it makes on a CPU (a step-matched bits/dim).
#
#   benchmarks/gpu_check.sh                      # on a CUDA machine; writes into $OUT (default runs/gpu-check)
#   benchmarks/gpu_check.sh --tiny               # a smoke test of this script anywhere (CPU, seconds)
#
# PY (default python3) runs everything with src/ on the path; FMNIST is the Fashion-MNIST folder; RUN
# the training run's directory.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PY:-python3}
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
RUN=${RUN:-$OUT/fm}                   # the training run's directory
TRAIN_STEPS=${TRAIN_STEPS:-4657}      # the steps `make run` made on the Xeon (docs/results.md)
TRAIN_MINUTES=${TRAIN_MINUTES:-2}     # a cap: the run stops at whichever comes first
TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
}

if [ $TINY = 1 ]; then
  step bench-tiny 120 $PY benchmarks/gpu.py --tiny --allow-cpu --iters 2 --warmup 1 --batch 2 --out "$OUT/gpu_tiny.json"
  step train-tiny 300 $PY -m glowflow train --data "$FMNIST" --out "$RUN" --overwrite --max-steps 20 \
    --set test_limit=500 --set init_batch_size=64 --no-progress --json
  exit 0
fi

step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs
step bench-invertible 120 $PY benchmarks/gpu.py --out "$OUT/gpu_celeba_invertible.json"
step train-fm 180 $PY -m glowflow train --data "$FMNIST" --out "$RUN" --overwrite --device cuda \
  --max-steps "$TRAIN_STEPS" --max-minutes "$TRAIN_MINUTES" --no-progress --json
cp "$RUN/samples.png" "$OUT/fm_samples.png" 2>/dev/null
step bench-none 90 $PY benchmarks/gpu.py --memory none --precisions fp32,bf16 --out "$OUT/gpu_celeba_none.json"
