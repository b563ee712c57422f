#!/usr/bin/env bash
# The GPU check for the training step (issue 10) and the attention kernel (issue 9),
# sized for about 6 minutes on an H200:
#   bash benchmarks/gpu_check.sh            # on a CUDA machine (the `device` tool's, say)
#   bash benchmarks/gpu_check.sh dry-run    # CPU rehearsal: every step at tiny sizes
# Order, most important first, each step under a timeout that never passes BUDGET
# seconds: GPU name and copy bandwidth; the training step's tests on CUDA (the default
# graph step, `--kernel auto`'s timing, the experimental fused one-scatter step against
# the default step, its kernels against their references); torch.profiler kernel tables
# of 30 training steps (the default graph step with the Triton kernel and with the
# reference, the experimental fused step); `--kernel auto`'s on-device choice at ML-1M
# size; the whole training at ML-1M size (3 epochs:
# 1 and 16 steps a CUDA graph, with and without one scatter; then 40 epochs, evaluation
# every 5, the fused step 16 steps a graph, twice: the second call warm); 20M
# interactions (2 epochs, the fused step); then, while time is left, the attention
# kernel's tests on CUDA (every configuration the tuner can pick, each precision), each
# precision mode's error against float64, the kernel timings (CUDA-graph and autograd
# timers, B = 1,024 .. 1,048,576, against eager and torch.compile and the floors), and
# Nsight Compute over the attention kernels. A summary table is printed last.
#
# Output, all in $OUT (default results/gpu): log.txt (everything), summary.txt (the
# table), results.tgz (every CSV/JSON/profile), ncu.txt when Nsight Compute ran: four
# files, within what the device tool brings back.
#
# The GPU image has no internet: Polars (for the training steps) and fastattrec come as
# wheels in .whl/ (`make gpu-wheels` builds them here; carry .whl with the call).
# Python runs with -P where the working directory would otherwise shadow the installed
# package (fastattrec.kernels is the mapped kernels/ folder, which only an install has).
set -u
MODE=${1:-full}
BUDGET=${BUDGET:-360}
OUT=${OUT:-results/gpu}
mkdir -p "$OUT" results
WORK=$(mktemp -d results/gpu_run.XXXXXX)  # a fresh folder: no earlier run's files count
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "$MODE" = dry-run ]; then
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  export TRITON_INTERPRET=1
fi
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
step() { echo; echo "=== [$(elapsed)s] $*"; }
note() { echo "$*" >> "$SUMMARY"; }
finish() {
  tar czf "$OUT/results.tgz" "$WORK" 2>/dev/null
  echo
  echo "==================== SUMMARY ($MODE, $(elapsed)s) ===================="
  cat "$SUMMARY"
}
trap finish EXIT
# run LIMIT CMD...: run with a timeout, never past the budget; returns the command's status
run() {
  local limit=$1; shift
  local left=$(( BUDGET - $(elapsed) - 10 ))
  if [ "$left" -lt 20 ]; then echo "(skipped: budget spent)"; return 124; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@"
}
# bench_summary TITLE CSV: a line per configuration of a bench_train.py CSV in the summary
bench_summary() {
  if [ ! -s "$2" ]; then note "$1: no result"; return; fi
  note "$1: config, s/epoch (median), train call s (last repeat), HR@10 sampled, HR@10 full"
  $PY -P -c "
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    print(f\"  {r['config']:<44} {float(r['epoch_s_median']):8.3f} {float(r['train_call_s_last']):8.2f} {float(r['HR@10_sampled']):.4f} {float(r['HR@10_full']):.4f}\")
" "$2" >> "$SUMMARY"
}

step "machine"
if [ "$MODE" != dry-run ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || true
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
$PY -P - <<'EOF' || { note "fastattrec does not import: nothing checked"; exit 1; }
import torch, triton, fastattrec.kernels as k
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)"
print("torch", torch.__version__, "triton", triton.__version__, "kernels", k.__file__, dev)
EOF
note "$($PY -P -c "
import torch, triton
name = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (dry run)'
print(f'device: {name}; torch {torch.__version__}; triton {triton.__version__}')")"
if [ "$MODE" != dry-run ]; then
  note "$($PY -P -c "
import torch
from triton.testing import do_bench
n = 1 << 28
a = torch.empty(n, device='cuda').normal_(); b = torch.empty_like(a)
ms = do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode='median')
print(f'copy bandwidth: {2 * n * 4 / ms / 1e9:.2f} TB/s (1 GiB device-to-device, read + write)')")"
fi

step "training-step tests on CUDA (issue 10: the fused one-scatter step and its kernels)"
if [ "$MODE" = dry-run ]; then
  STEP_TESTS=(tests/test_step_tail.py tests/test_step_prologue.py tests/test_epoch_batches.py)
else
  STEP_TESTS=(tests/test_train_cuda.py tests/test_kernel_choice.py
              tests/test_experimental_steps.py tests/test_embedding_gather.py
              tests/test_embedding_scatter.py tests/test_pair_loss.py
              tests/test_position_terms.py tests/test_step_prologue.py
              tests/test_step_tail.py tests/test_optim.py tests/test_epoch_batches.py)
fi
run 150 $PY -P -m pytest -q -p no:cacheprovider --maxfail=10 "${STEP_TESTS[@]}" 2>&1 \
  | tee "$WORK/step_tests.txt" | grep -v DEBUG | tail -25
note "training-step tests: $(grep -E '(passed|failed|error)' "$WORK/step_tests.txt" | tail -1)"

step "torch.profiler: 30 training steps (the graph step with each kernel; the experimental fused step)"
run 90 $PY -P - "$MODE" "$WORK/profile.txt" <<'EOF' 2>&1 | tail -30
import sys, tempfile
from pathlib import Path
import torch
from torch.profiler import ProfilerActivity, profile
from fastattrec.batches import DeviceData
from fastattrec.data.dataset import load_prepared
from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.synth import synthesize
from fastattrec.training import TrainConfig, build

dry = sys.argv[1] == "dry-run"
device = "cpu" if dry else "cuda"
root = Path(tempfile.mkdtemp())
synthesize(root / "r.dat", 300 if dry else 6040, 800 if dry else 3706,
           20_000 if dry else 1_000_209, seed=0)
prepare(root / "r.dat", root / "data", PrepOptions(test_negatives=50))
data = DeviceData.from_prepared(load_prepared(root / "data"), device)
tables = []
# the default step with each kernel --kernel auto chooses between, then the experimental
# one-scatter step (the dry run's CPU default is the hand-written step; kernel torch
# takes the rows path there)
runs = [("triton", False), ("torch", False), ("triton", True)]
if dry:
    runs = [("structured", False), ("torch", True)]
for kernel, one_scatter in runs:
    cfg = TrainConfig(device=device, kernel=kernel, batch_size=1024, one_scatter=one_scatter)
    b = build(cfg, data, torch.device(device), kernel)
    step = b.step
    step.samples.shuffle(b.gens["shuffle"])
    step.start_epoch()
    steps = 3 if dry else 30  # the dry run rehearses the code, it measures nothing
    warm = 2 if dry else 5
    for i in range(warm):
        step(i)
    acts = [ProfilerActivity.CPU] + ([] if dry else [ProfilerActivity.CUDA])
    with profile(activities=acts) as prof:
        for i in range(warm, warm + steps):
            step(i % step.samples.n_steps)
        if not dry:
            torch.cuda.synchronize()
    key = "self_cpu_time_total" if dry else "self_device_time_total"
    events = prof.key_averages()
    table = events.table(sort_by=key, row_limit=25)
    name = f"--kernel {kernel}{' one_scatter' if one_scatter else ''}: {step.describe()}"
    if dry:
        count = sum(e.count for e in events if e.key.startswith("aten::")) / steps
        table = f"{name}: aten operations per step: {count:.1f}\n" + table
    else:
        cuda = torch.autograd.DeviceType.CUDA
        count = sum(e.count for e in events if e.device_type == cuda) / steps
        table = f"{name}: CUDA kernels per training step: {count:.1f}\n" + table
    tables.append(table)
table = "\n".join(tables)
Path(sys.argv[2]).write_text(table)
print(table)
EOF
if [ -s "$WORK/profile.txt" ]; then
  note "profiler, 30 training steps (top kernels by self time; full table in results.tgz):"
  head -n 16 "$WORK/profile.txt" | sed 's/^/  /' >> "$SUMMARY"
  grep "per step" "$WORK/profile.txt" | sed 's/^/  /' >> "$SUMMARY"
else
  note "profiler: no result"
fi

step "--kernel auto: the on-device choice (ML-1M size, 1 epoch)"
run 90 $PY -P - "$MODE" "$WORK/kernel_choice.json" <<'EOF' 2>&1 | tail -8
import json, sys, tempfile
from pathlib import Path
from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.synth import synthesize
from fastattrec.training import TrainConfig, train

dry = sys.argv[1] == "dry-run"
root = Path(tempfile.mkdtemp())
synthesize(root / "r.dat", 300 if dry else 6040, 800 if dry else 3706,
           20_000 if dry else 1_000_209, seed=0)
prepare(root / "r.dat", root / "data", PrepOptions(test_negatives=50))
res = train(root / "data", root / "run", TrainConfig(epochs=1, device="cpu" if dry else "cuda"))
saved = json.loads((root / "run" / "config.json").read_text())
out = {"backend": res.backend, "kernel_choice": saved.get("kernel_choice"),
       "epoch_s": res.history[-1]["fit_time"]}
Path(sys.argv[2]).write_text(json.dumps(out))
print(out)
EOF
if [ -s "$WORK/kernel_choice.json" ]; then
  note "--kernel auto: $(cat "$WORK/kernel_choice.json")"
else
  note "--kernel auto: no result"
fi

step "whole training: ML-1M size, 3 epochs, 1 and 16 steps a CUDA graph, with and without one scatter"
if [ "$MODE" = dry-run ]; then
  TRAIN_ARGS=(--device cpu --size ml-100k --epochs 1 --eval-every 1)
else
  TRAIN_ARGS=(--device cuda --size ml-1m --epochs 3 --eval-every 3 --graph-steps 16
              --one-scatter)
fi
run 130 $PY benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --repeats 1 --no-baseline \
  --prep-repeats 1 --out "$WORK/bench_train.csv" 2>&1 | tail -8
bench_summary "whole training (bench_train.py ${TRAIN_ARGS[*]}; quality must agree across configs)" \
  "$WORK/bench_train.csv"

step "whole training: ML-1M size, 40 epochs, evaluation every 5, the fused step (the 8 s bar)"
if [ "$MODE" = dry-run ]; then
  FULL_ARGS=(--device cpu --size ml-100k --epochs 2 --eval-every 1 --only fastattrec --repeats 2)
else
  FULL_ARGS=(--device cuda --size ml-1m --epochs 40 --eval-every 5 --graph-steps 16
             --one-scatter --only "one scatter, 16" --repeats 2)
fi
run 90 $PY benchmarks/bench_train.py "${FULL_ARGS[@]}" --no-baseline --prep-repeats 1 \
  --out "$WORK/bench_train_40.csv" 2>&1 | tail -6
bench_summary "40 epochs (bench_train.py ${FULL_ARGS[*]}; the second call is warm)" \
  "$WORK/bench_train_40.csv"

step "whole training: 20M interactions, 2 epochs, the fused step (the 4 s per epoch bar)"
if [ "$MODE" = dry-run ]; then
  BIG_ARGS=(--device cpu --size ml-100k --epochs 1 --eval-every 1 --only fastattrec)
else
  BIG_ARGS=(--device cuda --size ml-20m --epochs 2 --eval-every 2 --graph-steps 16
            --one-scatter --only "one scatter, 16")
fi
run 120 $PY benchmarks/bench_train.py "${BIG_ARGS[@]}" --no-baseline --prep-repeats 1 \
  --repeats 1 --out "$WORK/bench_train_20m.csv" 2>&1 | tail -6
bench_summary "20M (bench_train.py ${BIG_ARGS[*]}; s/epoch is the second epoch's)" \
  "$WORK/bench_train_20m.csv"

step "attention kernel tests on CUDA (issue 9; configurations the tuner can pick, every precision)"
if [ "$MODE" = dry-run ]; then
  SELECT=(-k "hand_worked or layout_for or mm_formula or fully_masked")
else
  SELECT=()
fi
run 150 $PY -P -m pytest -q -p no:cacheprovider --maxfail=10 "${SELECT[@]}" \
  tests/test_kernel_attention.py tests/test_kernel_precision.py 2>&1 \
  | tee "$WORK/tests.txt" | grep -v DEBUG | tail -25
note "kernel tests: $(grep -E '(passed|failed|error)' "$WORK/tests.txt" | tail -1)"

step "precision of each mode against float64"
if [ "$MODE" = dry-run ]; then
  PREC_ARGS=(--batch 64 --emulate-only)
else
  PREC_ARGS=(--batch 4096 16384)
fi
run 60 $PY benchmarks/precision_check.py "${PREC_ARGS[@]}" --out "$WORK/precision.json" \
  2>&1 | tail -40
$PY -P - "$WORK/precision.json" >> "$SUMMARY" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("precision: no result"); sys.exit()
print("precision vs float64 (max of out/dx/dW relative error; float32-level <= 1e-5):")
for r in rows:
    if r["source"] != "emulated" or r["B"] == rows[0]["B"]:
        m = max(r["out"], r["dx"], r["dw"])
        print(f"  B={r['B']:<6} scale {r['scale']:<4g} {r['source']:>11} {r['mode']:>7}: "
              f"{m:.1e} {'float32-level' if r['float32_level'] else ''}")
EOF

step "kernel timings (graph and autograd timers; vs eager, torch.compile and the floor)"
if [ "$MODE" = dry-run ]; then
  BENCH_ARGS=(--dry-run --impls triton blocks split eager)
else
  BENCH_ARGS=(--precision ieee tf32x3 bf16x3 tf32)
fi
run 170 $PY benchmarks/bench_kernel.py "${BENCH_ARGS[@]}" --out "$WORK/bench_kernel.csv" \
  2>&1 | tail -80
$PY -P - "$WORK" >> "$SUMMARY" <<'EOF'
import csv, glob, json, sys
files = sorted(glob.glob(f"{sys.argv[1]}/bench_kernel*.csv"))
if not files:
    print("kernel timings: no result"); sys.exit()
print("kernel timings, ms (graph timer; x floor = time / floor of the precision):")
print(f"  {'precision':>9} {'B':>8} {'pass':>7} {'floor':>8} {'triton':>8} {'x floor':>7} "
      f"{'eager':>8} {'compile':>8} {'vs eager':>8} {'vs compile':>10}")
def f(v, fmt):
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return "-"
for path in files:
    for r in csv.DictReader(open(path)):
        if r["pass"] != "fwd+bwd" and not (r["pass"] == "fwd" and r["B"] == "16384"):
            continue
        print(f"  {r['precision']:>9} {r['B']:>8} {r['pass']:>7} {f(r.get('floor_ms'), '8.3f')} "
              f"{f(r.get('triton_graph_ms'), '8.3f')} {f(r.get('triton_graph_x_floor'), '7.1f')} "
              f"{f(r.get('eager_graph_ms'), '8.3f')} {f(r.get('compile_graph_ms'), '8.3f')} "
              f"{f(r.get('triton_vs_eager_graph'), '8.2f')} "
              f"{f(r.get('triton_vs_compile_graph'), '10.2f')}")
meta = json.load(open(files[0].replace(".csv", ".json")))
print("  chosen configs: " + "; ".join(f"{k} -> {v}" for k, v in meta["chosen_configs"].items()))
EOF

step "Nsight Compute over the attention kernels (if time is left)"
if [ "$MODE" != dry-run ] && command -v ncu >/dev/null 2>&1 && [ $(( BUDGET - $(elapsed) )) -gt 70 ]; then
  run 60 ncu --clock-control none --section SpeedOfLight --section Occupancy \
    --section MemoryWorkloadAnalysis -k "regex:_tile_|_attn_" -c 4 \
    $PY benchmarks/bench_kernel.py --batch 16384 --precision tf32x3 --impls triton \
    --timers autograd --out "$WORK/ncu_bench.csv" > "$OUT/ncu.txt" 2>&1
  note "ncu: $(grep -c 'Section: GPU Speed Of Light' "$OUT/ncu.txt" 2>/dev/null || echo 0) kernels profiled (ncu.txt)"
  grep -E "^  _|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" \
    "$OUT/ncu.txt" | head -30 | sed 's/^/  /' >> "$SUMMARY"
else
  note "ncu: not run (dry run, no ncu, or under 70 s left)"
fi
step "done"
