"""End-to-end benchmark: synth -> prep -> train (and evaluation), fastattrec's default path
against the in-repo baseline (`--kernel torch --no-compile`), on one machine in one run.

    python benchmarks/bench_train.py --device cpu --size ml-100k --epochs 5
    python benchmarks/bench_train.py --device cuda --size ml-1m --epochs 40 --eval-every 5
    python benchmarks/bench_train.py --device cpu --input ml-100k.inter --epochs 5

Reports medians: seconds per epoch (epochs after the first, which carries one-off
compilation and capture), samples/s, test evaluation time per protocol, the wall time
of the whole `train` call, and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastattrec.batches import DeviceData
from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.synth import synthesize
from fastattrec.evaluate import ModelRanker, evaluate
from fastattrec.runs import load_run
from fastattrec.training import TrainConfig, train

from common import machine, print_table, write_csv

SIZES = {
    "ml-100k": (943, 1682, 100_000),
    "ml-1m": (6040, 3706, 1_000_209),
    "ml-20m": (138_493, 26_744, 20_000_263),
}


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_config(data_dir: Path, work: Path, label: str, cfg: TrainConfig, device: str) -> dict:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_dir = work / label.replace(" ", "_")
    t = time.perf_counter()
    res = train(data_dir, run_dir, cfg, log=lambda s: None, force=True)
    if device == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t
    fits = [h["fit_time"] for h in res.history]
    steady = fits[1:] if len(fits) > 1 else fits
    run = load_run(run_dir, "last", device)
    ranker = ModelRanker(run.model)
    ev = {}
    for proto in ("sampled", "full"):
        times = []
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res_eval = evaluate(ranker, run.data, run.cfg.maxlen, proto, (10,), "2")
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        ev[proto] = (statistics.median(times), res_eval[proto])
    last = [h for h in res.history if "test" in h][-1]["test"]
    return {
        "config": label, "kernel": res.backend, "epochs": len(res.history),
        "epoch_s_median": statistics.median(steady), "first_epoch_s": fits[0],
        "samples_per_s": statistics.median(h["samples_per_s"] for h in res.history[1:] or
                                           res.history),
        "eval_sampled_s": ev["sampled"][0], "eval_full_s": ev["full"][0],
        "train_call_s": total, "epochs_s_sum": sum(fits),
        "epoch_eval_s_sum": sum(h["eval_time"] for h in res.history),
        "HR@10_sampled": last["sampled"]["HR@10"], "HR@10_full": last["full"]["HR@10"],
        "peak_mem_MB": peak_memory_mb(device),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", default="ml-100k", choices=list(SIZES))
    ap.add_argument("--input", type=Path, help="a real ratings file instead of synthetic data")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration")
    ap.add_argument("--baseline-epochs", type=int, default=None,
                    help="epochs for the baseline (default: --epochs)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--prep-repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/bench_train.csv"))
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; nothing measured")
        return 0
    meta = machine()
    work = Path(tempfile.mkdtemp(prefix="fastattrec-bench-"))
    if args.input:
        source = args.input
        meta["data"] = str(args.input)
    else:
        users, items, n = SIZES[args.size]
        source = work / "ratings.dat"
        t = time.perf_counter()
        synthesize(source, users, items, n, seed=0)
        meta["synth_s"] = time.perf_counter() - t
        meta["data"] = f"synthetic {args.size}: {users} users, {items} items, {n} ratings"
    preps = []
    for i in range(args.prep_repeats):
        t = time.perf_counter()
        prepare(source, work / "data", PrepOptions(), force=i > 0)
        preps.append(time.perf_counter() - t)
    meta["prep_s_median"] = statistics.median(preps)
    print(f"{meta['data']}: prep {meta['prep_s_median']:.2f} s "
          f"(median of {args.prep_repeats})")
    data_dir = work / "data"
    # Data on the device once, to report its size.
    from fastattrec.data.dataset import load_prepared

    DeviceData.from_prepared(load_prepared(data_dir), args.device)
    configs = [("fastattrec", dict(kernel="auto", compile=True), args.epochs)]
    if args.device == "cuda" and not args.no_baseline:
        configs.append(("triton eager step", dict(kernel="triton", compile=False),
                        args.baseline_epochs or args.epochs))
    if not args.no_baseline:
        configs.append(("baseline torch no-compile", dict(kernel="torch", compile=False),
                        args.baseline_epochs or args.epochs))
    rows = []
    for label, over, epochs in configs:
        for rep in range(args.repeats):
            cfg = TrainConfig(device=args.device, epochs=epochs,
                              eval_every=min(args.eval_every, epochs), **over)
            row = run_config(data_dir, work, f"{label} {rep}", cfg, args.device)
            row["config"] = label
            rows.append(row)
            print_table([row], ["config", "kernel", "epochs", "epoch_s_median",
                                "samples_per_s", "eval_sampled_s", "eval_full_s",
                                "train_call_s"])
    # Medians per configuration.
    summary = []
    for label, _, _ in configs:
        mine = [r for r in rows if r["config"] == label]
        med = {k: statistics.median(r[k] for r in mine) for k in mine[0]
               if isinstance(mine[0][k], float | int) and not isinstance(mine[0][k], bool)}
        summary.append({"config": label, "kernel": mine[0]["kernel"], "runs": len(mine), **med})
    if len(summary) >= 2:
        for row in summary[:-1]:
            row["epoch_speedup_vs_baseline"] = (summary[-1]["epoch_s_median"]
                                                / row["epoch_s_median"])
    meta["args"] = {k: str(v) for k, v in vars(args).items()}
    write_csv(args.out, summary, meta)
    print(f"\n{meta['device']} ({meta['cpu_count']} CPUs, torch {meta['torch']}, "
          f"{meta['torch_threads']} threads), {meta['data']}, prep {meta['prep_s_median']:.2f} s")
    print_table(summary, ["config", "kernel", "runs", "epochs", "epoch_s_median",
                          "first_epoch_s", "samples_per_s", "eval_sampled_s", "eval_full_s",
                          "train_call_s", "HR@10_sampled", "peak_mem_MB",
                          "epoch_speedup_vs_baseline"])
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
