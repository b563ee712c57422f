"""Seconds to draw an epoch's fresh negatives: the table of unseen items against the search.

    python benchmarks/bench_negatives.py --size ml-1m --per-row 16 --rounds 5
    python benchmarks/bench_negatives.py --data DATA_DIR --per-row 16

`DeviceData.sample_negatives` draws, for every train sample, `--per-row` items uniform
over its user's unseen items: a uniform rank r, then the user's r-th unseen item, looked
up either in a table of every user's unseen items (one gather; used up to
`batches.UNSEEN_TABLE_MAX` users x items) or by a binary search over the user's seen
items (larger catalogues). Both are built on the same data; then `--rounds` rounds draw
once with each in turn, so slow and fast moments of the machine fall on both. Reports the
build time (once per dataset), the median draw and the ratio, and checks that the two
give the same negatives.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import machine, print_table, write_csv


def main() -> int:
    from fastattrec import batches
    from fastattrec.batches import DeviceData
    from fastattrec.data.dataset import load_prepared

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a prepared dataset (default: synthetic --size)")
    ap.add_argument("--size", default="ml-1m", choices=["ml-100k", "ml-1m"])
    ap.add_argument("--per-row", type=int, default=16, help="negatives per train sample")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/negatives.csv"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    meta = {**machine(), "per_row": args.per_row, "rounds": args.rounds}
    if args.data is None:
        from fastattrec.data.prepare import PrepOptions, prepare
        from fastattrec.data.synth import synthesize

        work = Path(tempfile.mkdtemp())
        sizes = {"ml-100k": (943, 1682, 100_000), "ml-1m": (6040, 3706, 1_000_209)}
        synthesize(work / "ratings.dat", *sizes[args.size], seed=0)
        prepare(work / "ratings.dat", work / "data", PrepOptions())
        args.data, meta["data"] = work / "data", f"synthetic {args.size}"
    else:
        meta["data"] = str(args.data)
    prepared = load_prepared(args.data)
    built, build_s = {}, {}
    for name, cap in (("table", batches.UNSEEN_TABLE_MAX), ("search", 0)):
        old, batches.UNSEEN_TABLE_MAX = batches.UNSEEN_TABLE_MAX, cap
        try:
            data = DeviceData.from_prepared(prepared, "cpu")
            t = time.perf_counter()
            index = data.unseen_index
            build_s[name] = time.perf_counter() - t
        finally:
            batches.UNSEEN_TABLE_MAX = old
        if (index.table is not None) != (name == "table"):
            raise SystemExit(f"{meta['data']} is too large for the table "
                             f"(users x items > {batches.UNSEEN_TABLE_MAX:,})")
        built[name] = data
    times: dict[str, list[float]] = {name: [] for name in built}
    same = True
    for r in range(args.rounds + 1):  # round 0 warms up
        drawn = {}
        for name, data in built.items():
            gen = torch.Generator().manual_seed(r)
            t = time.perf_counter()
            drawn[name] = data.sample_negatives(gen, args.per_row, rows=data.train_rows)
            if r:
                times[name].append(time.perf_counter() - t)
        same &= torch.equal(drawn["table"], drawn["search"])
    n = int(built["table"].train_rows.shape[0]) * args.per_row
    rows = [{"lookup": name, "build_s": build_s[name], "draw_s": statistics.median(ts),
             "ratio": statistics.median(ts) / statistics.median(times["table"]),
             "negatives": n} for name, ts in times.items()]
    print(f"{meta['data']}: {n:,} negatives a draw, medians of {args.rounds} rounds; the "
          f"two lookups gave {'the same' if same else 'DIFFERENT'} negatives")
    print_table(rows, ["lookup", "build_s", "draw_s", "ratio", "negatives"])
    write_csv(args.out, rows, {**meta, "same": same})
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
