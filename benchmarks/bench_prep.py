"""Benchmark `fastattrec prep` end to end (the CLI in a fresh process, as a user runs it):
median wall time of several runs and the peak resident memory of the process.

    python benchmarks/bench_prep.py                      # 1M and 20M interactions
    python benchmarks/bench_prep.py --sizes 100m --runs 1 --streaming

Inputs are synthetic MovieLens-1M-format logs from `fastattrec synth` (generated once per
size into --work, default a temporary folder, and reused).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, print_table, write_csv

SIZES = {  # users, items, interactions
    "1m": (6040, 3706, 1_000_209),
    "20m": (138_493, 26_744, 20_000_263),
    "100m": (600_000, 100_000, 100_000_000),
}


def fastattrec_exe() -> str:
    exe = Path(sys.executable).with_name("fastattrec")
    return str(exe) if exe.exists() else "fastattrec"


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one child process."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "r = subprocess.run(sys.argv[1:]); dt = time.perf_counter() - t; "
            "m = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
            "print(f'@@ {dt} {m} {r.returncode}')")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("@@ ")]
    if not line:
        raise RuntimeError(out.stdout + out.stderr)
    _, dt, rss, rc = line[-1].split()
    if rc != "0":
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return float(dt), float(rss) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1m", "20m"], choices=list(SIZES))
    ap.add_argument("--runs", type=int, default=None,
                    help="runs per size (default: 5 for 1m, 3 otherwise)")
    ap.add_argument("--streaming", action="store_true", help="pass --streaming to prep")
    ap.add_argument("--work", type=Path, default=None, help="folder for inputs and outputs")
    ap.add_argument("--keep", action="store_true", help="keep the generated logs")
    ap.add_argument("--out", type=Path, default=Path("results/bench_prep.csv"))
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fastattrec-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    exe = fastattrec_exe()
    meta = machine()
    rows = []
    for size in args.sizes:
        users, items, n = SIZES[size]
        src = work / f"synth-{size}.dat"
        if not src.exists():
            t = time.perf_counter()
            subprocess.run([exe, "synth", "-o", str(src), "--users", str(users), "--items",
                            str(items), "--interactions", str(n), "--seed", "0"], check=True)
            print(f"synth {size}: {time.perf_counter() - t:.1f} s, "
                  f"{src.stat().st_size / 2**20:.0f} MiB")
        runs = args.runs or (5 if size == "1m" else 3)
        times, peaks = [], []
        for _ in range(runs):
            out = work / f"prep-{size}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [exe, "prep", str(src), "-o", str(out)]
            if args.streaming:
                cmd.append("--streaming")
            dt, peak = run_measured(cmd)
            times.append(dt)
            peaks.append(peak)
            print(f"  {size}: {dt:.2f} s, peak RSS {peak:.0f} MiB")
        rows.append({"size": size, "users": users, "items": items, "interactions": n,
                     "streaming": args.streaming, "runs": runs,
                     "median_s": statistics.median(times), "min_s": min(times),
                     "peak_rss_MiB": max(peaks)})
        shutil.rmtree(work / f"prep-{size}", ignore_errors=True)
        if not args.keep and args.work is None:
            os.remove(src)
    write_csv(args.out, rows, meta)
    print(f"\n{meta['cpu_count']} CPUs, polars {meta.get('polars')}, end to end (process "
          f"start included)")
    print_table(rows, ["size", "interactions", "streaming", "runs", "median_s", "min_s",
                       "peak_rss_MiB"])
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
