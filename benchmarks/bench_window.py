"""Seconds per training epoch against the window length L, side by side, and where they go.

    python benchmarks/bench_window.py --input ml-100k.inter --maxlens 5 10 20 50
    python benchmarks/bench_window.py --size ml-100k --maxlens 5 50 --rounds 5

For every L the default CPU step (hand-written, compiled) is built on the same prepared
data and trained one warm-up epoch (compilation); then `--rounds` rounds time one epoch
of every L in turn, so slow and fast moments of the machine fall on all of them alike.
Reports the median seconds per epoch and the ratio to the first L. With `--breakdown`
(on by default), one more epoch of each L runs under torch.profiler, with Inductor's
kernels named, and its time is split into:

- `LxL products`: the two batched (L, L) matrix products, S = Q Q^T in the forward and
  M Q in the backward (`bmm`; for L <= 8 they are broadcast sums inside the fused loops);
- `scatters`: the `index_add_`s of the rows' gradients into the tables' gradients;
- `fused loops`: Inductor's generated loops (gathers, softmax, masks, losses, chain rule);
- `d x d products`: the projections through the item table (`mm`, `addmm`);
- `Adam`, and `other` (Python, guards, small ops).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine, print_table, write_csv

PARTS = ("LxL products", "scatters", "fused loops", "d x d products", "Adam", "other")


def part_of(name: str) -> str:
    """The breakdown part a profiler event's name belongs to."""
    if name in ("aten::bmm", "aten::baddbmm"):
        return "LxL products"
    if name in ("aten::scatter_add_", "aten::index_add_"):
        return "scatters"
    if "cpp_fused" in name:
        return "fused loops"
    if name in ("aten::mm", "aten::addmm"):
        return "d x d products"
    if "adam" in name.lower():
        return "Adam"
    return "other"


def built_step(data_dir: Path, maxlen: int, threads: int):
    """The default CPU training step (fastattrec.training.build) for window length L."""
    from fastattrec.batches import DeviceData
    from fastattrec.data.dataset import load_prepared
    from fastattrec.kernels import resolve_backend
    from fastattrec.training import TrainConfig, build

    dev = torch.device("cpu")
    cfg = TrainConfig(device="cpu", maxlen=maxlen, threads=threads)
    data = DeviceData.from_prepared(load_prepared(data_dir), dev)
    return build(cfg, data, dev, resolve_backend(cfg.kernel, dev))


def timed_epoch(b) -> float:
    from fastattrec.training.step import run_epoch

    b.step.samples.shuffle(b.gens["shuffle"])
    t = time.perf_counter()
    run_epoch(b.step)
    return time.perf_counter() - t


def breakdown(b) -> dict[str, float]:
    """Seconds of one epoch per part (PARTS), from torch.profiler's self times."""
    from torch.profiler import ProfilerActivity, profile

    from fastattrec.training.step import run_epoch

    b.step.samples.shuffle(b.gens["shuffle"])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_epoch(b.step)
    parts = dict.fromkeys(PARTS, 0.0)
    for e in prof.key_averages():
        parts[part_of(e.key)] += e.self_cpu_time_total / 1e6
    return parts


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", type=Path, help="a ratings file (default: synthetic --size)")
    ap.add_argument("--size", default="ml-100k", choices=["ml-100k", "ml-1m"])
    ap.add_argument("--maxlens", type=int, nargs="+", default=[5, 10, 20, 50])
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs of every L")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the free cores)")
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("results/bench_window.csv"))
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    import torch._inductor.config as inductor_config

    from fastattrec.data.prepare import PrepOptions, prepare
    from fastattrec.data.synth import synthesize

    inductor_config.cpp.enable_kernel_profile = True  # names the fused loops in profiles
    work = Path(tempfile.mkdtemp(prefix="fastattrec-window-"))
    meta = machine()
    if args.input:
        source, meta["data"] = args.input, str(args.input)
    else:
        sizes = {"ml-100k": (943, 1682, 100_000), "ml-1m": (6040, 3706, 1_000_209)}
        source = work / "ratings.dat"
        synthesize(source, *sizes[args.size], seed=0)
        meta["data"] = f"synthetic {args.size}"
    prepare(source, work / "data", PrepOptions())
    steps, first = {}, {}
    for length in args.maxlens:  # build and warm up (compilation) every L first
        steps[length] = built_step(work / "data", length, args.threads)
        first[length] = timed_epoch(steps[length])
        print(f"L={length}: first epoch (with compilation) {first[length]:.2f} s", flush=True)
    times: dict[int, list[float]] = {length: [] for length in args.maxlens}
    for _ in range(args.rounds):
        for length in args.maxlens:
            times[length].append(timed_epoch(steps[length]))
    base = statistics.median(times[args.maxlens[0]])
    rows = []
    for length in args.maxlens:
        med = statistics.median(times[length])
        row = {"L": length, "epoch_s_median": med, f"ratio_to_L{args.maxlens[0]}": med / base,
               "epochs_s": " ".join(f"{t:.3f}" for t in times[length]),
               "first_epoch_s": first[length]}
        if not args.no_breakdown:
            row.update({f"{p}_s": s for p, s in breakdown(steps[length]).items()})
        rows.append(row)
    meta["args"] = {k: str(v) for k, v in vars(args).items()}
    meta["torch_threads"] = torch.get_num_threads()
    write_csv(args.out, rows, meta)
    print(f"\n{meta['cpu']} ({meta['cpu_count']} CPUs, torch {meta['torch']}, "
          f"{meta['torch_threads']} threads), {meta['data']}, {args.rounds} rounds")
    print_table(rows, ["L", "epoch_s_median", f"ratio_to_L{args.maxlens[0]}", "epochs_s"])
    if not args.no_breakdown:
        print("\nseconds of one profiled epoch, by part (profiling adds a little):")
        print_table(rows, ["L", *[f"{p}_s" for p in PARTS]])
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
