"""Recommendation quality of training configurations, chosen on validation only.

    python benchmarks/quality.py --data DATA_DIR --seeds 0 1 2 --out results/quality.csv
    python benchmarks/quality.py --data DATA_DIR --configs "sampled softmax, 16 negatives" \
        --maxlens 5 20 50 --seeds 0 1 --epochs 40
    python benchmarks/quality.py --data DATA_DIR --configs "sampled softmax, 16 negatives" \
        --lrs 0.001 0.003 0.01 --seeds 0 --epochs 200

Each configuration trains with early stopping on the validation NDCG@10 (full ranking);
its best epoch (best.pt, chosen on validation) is scored on validation once more with
the SASRec paper's sampled protocol (`val_sampled_HR@10`: each validation target against
100 items its user never rated), so that configurations can be compared on both kinds
of metric without the test set; then tested once: sampled HR@10 / NDCG@10 / MRR (prep's
negatives), the SASRec paper's sampled protocol, and full-ranking HR@10 / NDCG@10 / MRR.
Prints a table of mean and standard deviation over the seeds, with the time to train;
the CSV holds every run.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import torch

CONFIGS: dict[str, dict] = {
    "notebook defaults": {},
    "resample": dict(negatives="resample"),
    "w 0.3": dict(w=0.3),
    "bce, 4 negatives": dict(objective="bce", n_negatives=4, negatives="resample"),
    "gbce, 16 negatives": dict(objective="gbce", n_negatives=16, negatives="resample"),
    "sampled softmax, 16 negatives": dict(objective="sampled-softmax", n_negatives=16,
                                          negatives="resample"),
    "sampled softmax, 16 negatives, dropout 0.2": dict(
        objective="sampled-softmax", n_negatives=16, negatives="resample", dropout=0.2),
    "bce, 16 negatives, dropout 0.2": dict(objective="bce", n_negatives=16,
                                           negatives="resample", dropout=0.2),
    "sampled softmax, 64 negatives, dropout 0.2, w 0.4": dict(
        objective="sampled-softmax", n_negatives=64, negatives="resample", dropout=0.2, w=0.4),
    "sampled softmax, 39 negatives, w 0.6": dict(
        objective="sampled-softmax", n_negatives=39, negatives="resample", w=0.6,
        embed_reg=3.46e-7),
    "sampled softmax, 23 negatives, w 0.9": dict(
        objective="sampled-softmax", n_negatives=23, negatives="resample", w=0.9,
        embed_reg=1.18e-6),
    "sampled softmax, 64 shared": dict(objective="sampled-softmax", n_negatives=64,
                                       negatives="shared"),
    "bce, 16 negatives": dict(objective="bce", n_negatives=16, negatives="resample"),
    "bce, 64 shared": dict(objective="bce", n_negatives=64, negatives="shared"),
    "bce, 4 negatives, w 0.3": dict(objective="bce", n_negatives=4, negatives="resample",
                                    w=0.3),
    "bce, 4 negatives, dropout 0.2": dict(objective="bce", n_negatives=4,
                                          negatives="resample", dropout=0.2),
    "softmax": dict(objective="softmax"),
    "softmax, dropout 0.2": dict(objective="softmax", dropout=0.2),
}
METRICS = ("val_NDCG@10", "val_sampled_HR@10", "sampled_HR@10", "sampled_NDCG@10",
           "sampled_MRR", "sasrec_HR@10", "sasrec_NDCG@10", "sasrec_MRR", "full_HR@10",
           "full_NDCG@10", "full_MRR", "train_s", "best_epoch")


def val_sampled_hr(run_dir: Path, k: int = 10) -> float:
    """HR@k of the best checkpoint on the validation targets, each ranked against 100
    items its user never rated, drawn uniformly with replacement (the SASRec paper's
    protocol, on validation): a validation-only view of the sampled metrics."""
    from fastattrec.evaluate import ModelRanker, sampled_ranks
    from fastattrec.runs import load_run

    loaded = load_run(run_dir, "best", "cpu", None)
    data = loaded.data
    gen = torch.Generator().manual_seed(0)
    negs = data.sample_negatives(gen, 100, rows=data.val_rows)
    with torch.no_grad():
        ranks = sampled_ranks(ModelRanker(loaded.model), data, loaded.model.cfg.maxlen,
                              negs=negs, targets=data.val_rows)
    return float((ranks < k).double().mean())


def run_one(data: Path, out: Path, opts: dict, seed: int, epochs: int, patience: int) -> dict:
    import fastattrec as fa

    t = time.perf_counter()
    run = fa.train(data, out, force=True, epochs=epochs, eval_every=epochs,
                   early_stop=patience, seed=seed, device="cpu", **opts)
    train_s = time.perf_counter() - t
    hist = run.history()
    best = hist.row(int(hist["val_metric"].arg_max()), named=True)
    row = {"val_NDCG@10": best["val_metric"], "best_epoch": best["epoch"], "train_s": train_s}
    row["val_sampled_HR@10"] = val_sampled_hr(out)
    for protocol in ("both", "sasrec"):
        frame = run.evaluate(protocol=protocol, ks=[10], checkpoint="best", baseline=False,
                             save=False)
        for r in frame.iter_rows(named=True):
            p = r["protocol"]
            row[f"{p}_HR@10"], row[f"{p}_NDCG@10"] = r["HR@10"], r["NDCG@10"]
            row[f"{p}_MRR"] = r["MRR"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a prepared dataset")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=60, help="at most this many epochs")
    ap.add_argument("--patience", type=int, default=5, help="early stopping patience")
    ap.add_argument("--maxlens", type=int, nargs="*", default=[],
                    help="run every configuration at each of these window lengths L "
                         "(default: the configuration's own, the notebook's L = 5)")
    ap.add_argument("--lrs", type=float, nargs="*", default=[],
                    help="run every configuration (and window length) at each of these "
                         "learning rates (default: the configuration's own, 0.001)")
    ap.add_argument("--out", type=Path, default=Path("results/quality.csv"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp())
    runs = [(name, CONFIGS[name]) for name in args.configs]
    for key, values in (("maxlen", args.maxlens), ("lr", args.lrs)):
        label = {"maxlen": "L", "lr": "lr"}[key]
        if values:
            runs = [(f"{name}, {label} {v:g}", {**opts, key: v})
                    for name, opts in runs for v in values]
    rows = []
    for name, opts in runs:
        for seed in args.seeds:
            r = run_one(args.data, work / "run", opts, seed, args.epochs, args.patience)
            rows.append({"config": name, "seed": seed, **r})
            print(f"{name:<30} seed {seed}: " + ", ".join(
                f"{k} {r[k]:.4f}" for k in METRICS if k in r), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["config", "seed", *METRICS])
        w.writeheader()
        w.writerows(rows)
    shown = ("val_NDCG@10", "val_sampled_HR@10", "full_NDCG@10", "full_HR@10",
             "sasrec_HR@10", "sampled_HR@10", "train_s")
    print(f"\n| config | {' | '.join(shown)} |\n|---|{'---|' * len(shown)}")
    for name, _ in runs:
        mine = [r for r in rows if r["config"] == name]
        cells = []
        for k in shown:
            vals = [r[k] for r in mine]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.4f} ± {sd:.4f}" if k != "train_s"
                         else f"{statistics.mean(vals):.0f}")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
