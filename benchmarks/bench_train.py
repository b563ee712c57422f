"""End-to-end benchmark: synth -> prep -> train (and evaluation), fastattrec's default path
against the in-repo baseline (`--kernel torch --no-compile`), on one machine in one run.

    python benchmarks/bench_train.py --device cpu --size ml-100k --epochs 5
    python benchmarks/bench_train.py --device cuda --size ml-1m --epochs 40 --eval-every 5
    python benchmarks/bench_train.py --device cpu --input ml-100k.inter --epochs 5
    python benchmarks/bench_train.py --device cpu --size ml-100k --profile
    python benchmarks/bench_train.py --device cpu --size ml-100k --contention 1

Reports medians: seconds per epoch (epochs after the first, which carries one-off
compilation and capture), samples/s, test evaluation time per protocol, the wall time
of the whole `train` call, peak memory, and the ratio to the in-repo baseline
(`--kernel torch --no-compile`) measured in the same run.

--profile: a torch.profiler table of one training epoch of the default configuration
(CPU) or of 30 steps (CUDA, with the number of CUDA kernels per step).
--contention N: also time the default configuration while N single-threaded busy
processes share the machine, and report the slowdown against idle.
"""

from __future__ import annotations

import argparse
import multiprocessing
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


def _busy() -> None:  # pragma: no cover - runs in a child process
    while True:
        pass


def with_contention(n: int, fn):
    """Run fn() while n busy single-threaded processes compete for the cores."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_busy, daemon=True) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)
        return fn()
    finally:
        for p in procs:
            p.kill()
            p.join()


def profile_epoch(data_dir: Path, device: str, threads: int) -> None:
    """torch.profiler over the training steps of the default configuration (the step
    `fastattrec.training.build` makes, driven through the Step protocol)."""
    from torch.profiler import ProfilerActivity, profile

    from fastattrec.data.dataset import load_prepared
    from fastattrec.kernels import resolve_backend
    from fastattrec.training import build
    from fastattrec.training.step import run_epoch

    dev = torch.device(device)
    cfg = TrainConfig(device=device)
    data = DeviceData.from_prepared(load_prepared(data_dir), dev)
    b = build(cfg, data, dev, resolve_backend(cfg.kernel, dev))
    step = b.step
    step.samples.shuffle(b.gens["shuffle"])
    run_epoch(step)  # warm-up epoch
    steps = step.samples.n_steps if dev.type == "cpu" else min(30, step.samples.n_steps)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step.start_epoch()
        for i in range(steps):  # on the CPU one whole epoch, as training runs it
            step(i)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(f"profile of {steps} training steps ({step.describe()} on {device}, "
          f"{threads or torch.get_num_threads()} threads):")
    print(events.table(sort_by=sort, row_limit=25))
    if dev.type == "cuda":
        kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"CUDA kernels per step: {kernels / steps:.1f}")
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"aten operations per step: {ops / steps:.1f}")


def parse_args() -> argparse.Namespace:
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
    ap.add_argument("--graph-steps", type=int, nargs="*", default=[],
                    help="CUDA: also time the default path with these training steps per "
                         "CUDA-graph replay (the default is 1)")
    ap.add_argument("--one-scatter", action="store_true",
                    help="CUDA: also time the step whose table rows come from one gather "
                         "and whose table gradients come from one deterministic scatter, "
                         "the epoch's batches planned at its start (TrainConfig.one_scatter), "
                         "with 1 step a graph and with each --graph-steps")
    ap.add_argument("--only", default="",
                    help="time only the configurations whose label contains this text "
                         "(e.g. 'one scatter, 16')")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: fastattrec's default, the free cores)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table")
    ap.add_argument("--contention", type=int, default=0,
                    help="also time the default configuration beside N busy processes")
    ap.add_argument("--out", type=Path, default=Path("results/bench_train.csv"))
    return ap.parse_args()


def prepared_data(args: argparse.Namespace, work: Path, meta: dict) -> Path:
    """Synthesise (or take --input), prepare it --prep-repeats times; the dataset folder."""
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
    return work / "data"


def configurations(args: argparse.Namespace) -> list[tuple[str, dict, int]]:
    """(label, TrainConfig overrides, epochs) of every configuration to time, in order."""
    base = args.baseline_epochs or args.epochs
    configs = [("fastattrec", dict(kernel="auto", compile=True), args.epochs)]
    if args.device == "cuda":  # the two kernels --kernel auto chooses between, forced
        configs += [(f"fastattrec --kernel {k}", dict(kernel=k, compile=True), args.epochs)
                    for k in ("triton", "torch")]
        configs += [(f"fastattrec {k} steps a graph (experimental)",
                     dict(kernel="auto", compile=True, graph_steps=k), args.epochs)
                    for k in args.graph_steps]
        if args.one_scatter:
            configs += [(f"fastattrec one scatter{f', {k} steps a graph' if k > 1 else ''} "
                         "(experimental)",
                         dict(kernel="auto", compile=True, one_scatter=True, graph_steps=k),
                         args.epochs) for k in [1, *args.graph_steps]]
    if args.contention:
        configs.append((f"fastattrec beside {args.contention} busy",
                        dict(kernel="auto", compile=True), args.epochs))
    if args.device == "cuda" and not args.no_baseline:
        configs.append(("triton eager step", dict(kernel="triton", compile=False), base))
    if not args.no_baseline:
        configs.append(("baseline torch no-compile", dict(kernel="torch", compile=False), base))
    if args.only:
        configs = [c for c in configs if args.only in c[0]]
        if not configs:
            raise SystemExit(f"--only {args.only!r} matches no configuration")
    return configs


def summarise(rows: list[dict], configs: list, args: argparse.Namespace) -> list[dict]:
    """Medians per configuration, the speed-up against the baseline and, with
    --contention, the slowdown against idle."""
    summary = []
    for label, _, _ in configs:
        mine = [r for r in rows if r["config"] == label]
        if not mine:  # not run (yet)
            continue
        med = {k: statistics.median(r[k] for r in mine) for k in mine[0]
               if isinstance(mine[0][k], float | int) and not isinstance(mine[0][k], bool)}
        summary.append({"config": label, "kernel": mine[0]["kernel"], "runs": len(mine), **med,
                        "train_call_s_last": mine[-1]["train_call_s"]})  # warm with repeats
    if len(summary) == len(configs) >= 2 and not args.no_baseline:
        for row in summary[:-1]:
            row["epoch_speedup_vs_baseline"] = (summary[-1]["epoch_s_median"]
                                                / row["epoch_s_median"])
    if args.contention and any("busy" in r["config"] for r in summary):
        busy = next(r for r in summary if "busy" in r["config"])
        busy["slowdown_vs_idle"] = busy["epoch_s_median"] / summary[0]["epoch_s_median"]
    return summary


def main() -> int:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here; nothing measured")
        return 0
    configs = configurations(args)  # (a bad --only stops here, before any work)
    meta = machine()
    work = Path(tempfile.mkdtemp(prefix="fastattrec-bench-"))
    data_dir = prepared_data(args, work, meta)
    from fastattrec.data.dataset import load_prepared

    DeviceData.from_prepared(load_prepared(data_dir), args.device)  # fails early if too big
    if args.profile:
        profile_epoch(data_dir, args.device, args.threads)
    rows = []
    for label, over, epochs in configs:
        for rep in range(args.repeats):
            cfg = TrainConfig(device=args.device, epochs=epochs, threads=args.threads,
                              eval_every=min(args.eval_every, epochs), **over)

            def one(cfg=cfg, label=label, rep=rep) -> dict:
                return run_config(data_dir, work, f"{label} {rep}", cfg, args.device)

            row = with_contention(args.contention, one) if "busy" in label else one()
            row["config"] = label
            rows.append(row)
            print_table([row], ["config", "kernel", "epochs", "epoch_s_median",
                                "samples_per_s", "eval_sampled_s", "eval_full_s",
                                "train_call_s"])
        # written after every configuration, so a run cut short keeps what it measured
        summary = summarise(rows, configs, args)
        meta["args"] = {k: str(v) for k, v in vars(args).items()}
        meta["torch_threads"] = torch.get_num_threads()
        write_csv(args.out, summary, meta)
    print(f"\n{meta['device']} ({meta['cpu_count']} CPUs, torch {meta['torch']}, "
          f"{meta['torch_threads']} threads), {meta['data']}, prep {meta['prep_s_median']:.2f} s")
    print_table(summary, ["config", "kernel", "runs", "epochs", "epoch_s_median",
                          "first_epoch_s", "samples_per_s", "eval_sampled_s", "eval_full_s",
                          "train_call_s", "HR@10_sampled", "peak_mem_MB",
                          "epoch_speedup_vs_baseline", "slowdown_vs_idle"])
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
