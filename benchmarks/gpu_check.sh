#!/usr/bin/env bash
# The GPU check, for a lent CUDA machine (the `device` tool) or any CUDA box:
#   bash benchmarks/gpu_check.sh [quick|full]
# Installs what the machine lacks from wheels carried in .whl/ (Polars; fastattrec itself),
# runs the kernel and CUDA training tests on the GPU (no interpreter), then the kernel
# microbenchmarks and the end-to-end training benchmark. Everything lands in $OUT
# (default results/gpu): log.txt plus results.tgz with every CSV/JSON.
# Prepare the wheels on a machine with pip access first:  make gpu-wheels
set -u
MODE=${1:-full}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT" results/gpu_run
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, triton, polars, fastattrec; print('torch', torch.__version__, 'triton', triton.__version__, 'polars', polars.__version__, 'fastattrec', fastattrec.__file__, torch.cuda.get_device_name())" || exit 1

step "tests on CUDA"
timeout 240 python3 -P -m pytest -q -x -p no:cacheprovider tests/test_kernel_attention.py tests/test_train_cuda.py 2>&1 | tail -25

if [ "$MODE" = quick ]; then
  step "kernel benchmark (bar points)"
  timeout 150 python3 benchmarks/bench_kernel.py --length 5 --dim 100 --batch 16384 1048576 \
    --out results/gpu_run/kernel_bar.csv 2>&1 | tail -12
  step "train benchmark ml-1m (40 epochs)"
  timeout 150 python3 benchmarks/bench_train.py --device cuda --size ml-1m --epochs 40 \
    --eval-every 5 --baseline-epochs 2 --prep-repeats 1 --out results/gpu_run/train_ml1m.csv 2>&1 | tail -8
else
  step "kernel benchmark L=5"
  timeout 240 python3 benchmarks/bench_kernel.py --length 5 --dim 64 100 128 --compile-dims 100 \
    --out results/gpu_run/kernel_L5.csv 2>&1 | tail -40
  step "kernel benchmark L=50, 200"
  timeout 120 python3 benchmarks/bench_kernel.py --length 50 200 --dim 100 --batch 16384 262144 \
    --compile-dims --out results/gpu_run/kernel_Llong.csv 2>&1 | tail -14
  step "kernel benchmark tf32"
  timeout 90 python3 benchmarks/bench_kernel.py --length 5 --dim 100 --batch 16384 1048576 \
    --precision tf32 --compile-dims --out results/gpu_run/kernel_tf32.csv 2>&1 | tail -8
  step "train benchmark ml-1m"
  timeout 200 python3 benchmarks/bench_train.py --device cuda --size ml-1m --epochs 40 \
    --eval-every 5 --baseline-epochs 3 --repeats 2 --prep-repeats 3 \
    --out results/gpu_run/train_ml1m.csv 2>&1 | tail -8
  step "train benchmark 20M"
  timeout 200 python3 benchmarks/bench_train.py --device cuda --size ml-20m --epochs 2 \
    --eval-every 2 --no-baseline --prep-repeats 1 --out results/gpu_run/train_20m.csv 2>&1 | tail -6
fi
step "done"
tar czf "$OUT/results.tgz" results/gpu_run
