#!/usr/bin/env bash
# The GPU check, for a lent CUDA machine (the `device` tool) or any CUDA box:
#   bash benchmarks/gpu_check.sh [quick|full|kernel]
# Installs what the machine lacks from wheels carried in .whl/ (Polars; fastattrec itself:
# `make gpu-wheels` builds them), runs the kernel and CUDA training tests on the GPU (no
# interpreter), then the benchmarks, most important first, skipping what would overrun
# BUDGET seconds. Everything lands in $OUT (default results/gpu): log.txt and
# results.tgz with every CSV/JSON.
set -u
MODE=${1:-full}
BUDGET=${BUDGET:-540}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT" results/gpu_run
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)
finish() { tar czf "$OUT/results.tgz" results/gpu_run 2>/dev/null; }
trap finish EXIT
elapsed() { echo $(( $(date +%s) - start )); }
step() { echo; echo "=== [$(elapsed)s] $*"; }
# run LIMIT CMD...: run with a timeout, never past the budget
run() {
  local limit=$1; shift
  local left=$(( BUDGET - $(elapsed) - 10 ))
  if [ "$left" -lt 30 ]; then echo "(skipped: budget spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@"
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, triton, polars, fastattrec; print('torch', torch.__version__, 'triton', triton.__version__, 'polars', polars.__version__, 'fastattrec', fastattrec.__file__, torch.cuda.get_device_name())" || exit 1

if [ "$MODE" = kernel ]; then  # the training-step tests and the kernel's bar points only
  step "CUDA training tests"
  run 75 python3 -P -m pytest -q -p no:cacheprovider tests/test_train_cuda.py tests/test_optim.py 2>&1 \
    | grep -v DEBUG | tail -15
  step "kernel benchmark L=5, d=100"
  run 120 python3 benchmarks/bench_kernel.py --length 5 --dim 100 \
    --out results/gpu_run/kernel_L5_d100.csv 2>&1 | tail -16
  exit 0
fi

step "tests on CUDA"
run 220 python3 -P -m pytest -q -p no:cacheprovider --maxfail=5 tests/test_kernel_attention.py \
  tests/test_train_cuda.py tests/test_optim.py 2>&1 | grep -v DEBUG | tail -25

if [ "$MODE" = quick ]; then
  step "kernel benchmark (bar points; ieee, then tf32: in ieee the FMA units cap B=1M at ~31% of H100 bandwidth)"
  run 150 python3 benchmarks/bench_kernel.py --length 5 --dim 100 --batch 16384 1048576 \
    --impls triton split structured eager compile \
    --out results/gpu_run/kernel_bar.csv 2>&1 | tail -12
  run 90 python3 benchmarks/bench_kernel.py --length 5 --dim 100 --batch 16384 1048576 \
    --precision tf32 --out results/gpu_run/kernel_bar_tf32.csv 2>&1 | tail -12
  exit 0
fi

step "train benchmark ml-1m: 40 epochs, evaluation every 5 (run 1: cold caches, run 2: warm)"
run 170 python3 benchmarks/bench_train.py --device cuda --size ml-1m --epochs 40 \
  --eval-every 5 --baseline-epochs 3 --repeats 2 --prep-repeats 3 \
  --out results/gpu_run/train_ml1m.csv 2>&1 | grep -v "^  " | tail -12

step "kernel benchmark L=5 (ieee)"
run 170 python3 benchmarks/bench_kernel.py --length 5 --dim 64 100 128 --compile-dims 100 \
  --out results/gpu_run/kernel_L5.csv 2>&1 | tail -40

step "precision"
run 40 python3 benchmarks/precision_check.py --batch 16384 --length 5 --dim 100 2>&1 | tail -6

step "kernel benchmark tf32"
run 60 python3 benchmarks/bench_kernel.py --length 5 --dim 100 --batch 16384 1048576 \
  --precision tf32 --compile-dims --out results/gpu_run/kernel_tf32.csv 2>&1 | tail -6

step "kernel benchmark L=50, 200"
run 70 python3 benchmarks/bench_kernel.py --length 50 200 --dim 100 --batch 16384 \
  --compile-dims --out results/gpu_run/kernel_Llong.csv 2>&1 | tail -6

step "train benchmark 20M interactions (2 epochs)"
run 150 python3 benchmarks/bench_train.py --device cuda --size ml-20m --epochs 2 \
  --eval-every 2 --no-baseline --prep-repeats 1 --out results/gpu_run/train_20m.csv 2>&1 | tail -6
step "done"
