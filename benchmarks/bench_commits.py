"""Two source trees of fastattrec side by side: the same training run, alternately, with
epoch times (medians) and whether the weights agree bit for bit.

    git worktree add /tmp/old <commit>
    python benchmarks/bench_commits.py --old /tmp/old --new . --data DATA_DIR \
        --epochs 4 --repeats 3

Each run is a fresh process that imports fastattrec from its tree only: an overlay folder
holds links to the tree's `fastattrec/` with `kernels/` mounted as `fastattrec/kernels`
(what an install does), ahead of any installed copy. The first epoch (torch.compile's
compilation) is left out of the epoch times; the runs alternate old, new, old, new...
so a drift of the machine's speed touches both. Prints one line per run and a summary:
median seconds per epoch of each tree and their ratio, and the final weights compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, sys
import torch
import fastattrec
from fastattrec.training import TrainConfig, train
data, out, opts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
res = train(data, out, TrainConfig(**opts), force=True, log=lambda s: None)
print(json.dumps({"file": fastattrec.__file__,
                  "fit": [h["fit_time"] for h in res.history],
                  "loss": res.history[-1]["train_loss"]}))
"""


def overlay(tree: Path, root: Path) -> Path:
    """A folder whose `fastattrec` package is `tree`'s, with `tree/kernels` inside it."""
    pkg = root / "fastattrec"
    pkg.mkdir(parents=True)
    for item in (tree / "fastattrec").iterdir():
        if item.name != "__pycache__":
            (pkg / item.name).symlink_to(item.resolve())
    (pkg / "kernels").symlink_to((tree / "kernels").resolve())
    return root


def run(path: Path, data: Path, out: Path, opts: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path)}
    res = subprocess.run([sys.executable, "-c", RUN, str(data), str(out), json.dumps(opts)],
                         env=env, capture_output=True, text=True, cwd=path)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="source tree of the baseline")
    ap.add_argument("--new", type=Path, required=True, help="source tree to compare")
    ap.add_argument("--data", type=Path, required=True, help="a prepared dataset")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--options", default="{}", help="more TrainConfig options, as JSON")
    args = ap.parse_args()
    opts = {"epochs": args.epochs, "eval_every": args.epochs, "threads": args.threads,
            "device": "cpu", **json.loads(args.options)}
    work = Path(tempfile.mkdtemp())
    trees = {"old": overlay(args.old, work / "old"), "new": overlay(args.new, work / "new")}
    epochs: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(args.repeats):
        for name, path in trees.items():
            out = run(path, args.data.resolve(), work / f"run_{name}", opts)
            assert str(path) in out["file"], out["file"]  # imported from its own tree
            epochs[name] += out["fit"][1:]
            print(f"repeat {r + 1} {name}: epoch s {[round(t, 3) for t in out['fit']]}, "
                  f"final loss {out['loss']!r}", flush=True)
    import torch

    a = torch.load(work / "run_old" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(work / "run_new" / "checkpoint.pt", weights_only=True)["model"]
    same = all(torch.equal(a[k], b[k]) for k in a)
    mo, mn = statistics.median(epochs["old"]), statistics.median(epochs["new"])
    print(f"median s/epoch (epochs 2..{args.epochs}, {args.repeats} runs each, "
          f"{args.threads} threads): old {mo:.4f}, new {mn:.4f}, new/old {mn / mo:.3f}")
    print(f"final weights bit-identical: {same}")


if __name__ == "__main__":
    main()
