"""Draw the figures of docs/RESULTS.md from measured numbers (matplotlib, no network).

    python benchmarks/plots.py                                   # docs/results -> docs/figures
    python benchmarks/plots.py --out /tmp/figs
    python benchmarks/plots.py --bench-train results/bench_train.csv \
                               --bench-kernel results/gpu_run/kernel_L5.csv

Inputs. The measurements that docs/RESULTS.md reports are transcribed, with machine, date
and command, into small CSV files under docs/results/ (one per figure); this script reads
those. It also takes fresh output of the benchmark scripts: `--bench-train` a CSV written
by benchmarks/bench_train.py, `--bench-kernel` a CSV written by benchmarks/bench_kernel.py
(either the CSV or the JSON of machine facts written beside it; the other is found by its
name). Fresh files get figures of their own, named after the file; the committed figures
are drawn from docs/results/ only.

Outputs (PNG, about 30-60 KB each):

- cpu_speed_vs_notebook.png   seconds per training epoch on two 2-core CPUs, against the
                              original notebook run side by side on each
- gpu_speed.png               seconds per epoch on an H200 against the in-repo baselines,
                              and the whole 40-epoch ML-1M run on each machine
- kernel_vs_baselines.png     the Triton kernel against eager torch and torch.compile, and
                              its arithmetic floor, across batch sizes
- quality_vs_notebook.png     HR@10, NDCG@10 and MRR per seed, fastattrec against the
                              notebook, modes inner and dist
- long_windows.png            seconds of a CPU training epoch against L, by where the time
                              goes
- quality_ablation.png        full-ranking NDCG@10 of each training configuration on real
                              ML-100K and on synthetic data of its shape
- preset_choice.png           validation NDCG@10 against validation sampled HR@10 of the
                              configurations the quality preset was chosen from
- tune_ml100k.png             validation NDCG@10 of each trial of a `fastattrec tune` search
                              on real ML-100K, by objective, with the best so far
- bench_train_<name>.png, bench_kernel_<name>[_L<L>_d<d>].png   for fresh inputs
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
FIGURES = ROOT / "docs" / "figures"

# One colour per implementation, the same in every figure.
COLOURS = {
    "fastattrec": "#1f77b4",
    "baseline": "#9aa5b1",
    "notebook": "#d62728",
    "triton": "#1f77b4",
    "split": "#17becf",
    "structured": "#2ca02c",
    "eager": "#ff7f0e",
    "compile": "#9467bd",
    "floor": "#000000",
}
DPI = 100


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display, no network)."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("plots.py needs matplotlib: pip install 'fastattrec[plot]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False,
                         "axes.spines.right": False, "legend.frameon": False})
    return plt


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(value: str | None) -> float:
    """A CSV cell as a float; empty or missing is NaN."""
    if value is None or value.strip() == "":
        return math.nan
    return float(value)


def save(fig, path: Path) -> Path:
    """Write `fig` as a PNG with no run-dependent metadata (stable bytes for one version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def footnote(fig, text: str) -> None:
    fig.text(0.01, 0.01, text, fontsize=7, color="#555555", ha="left", va="bottom")


def finish(fig, source: str, path: Path) -> Path:
    """A figure's common ending: the source line at the bottom, the layout above it, the
    file written."""
    footnote(fig, source)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save(fig, path)


def seconds(v: float) -> str:
    """A duration for a bar label, with as many digits as the source gives."""
    if v >= 100:
        return f"{v:,.0f} s"
    return f"{v:#.3g} s" if v >= 0.1 else f"{v * 1e3:#.3g} ms"


def label_bars(ax, bars, fmt=seconds, log: bool = False) -> None:
    for b in bars:
        h = b.get_height()
        if not math.isfinite(h) or h <= 0:
            continue
        text = fmt(h) if callable(fmt) else fmt.format(h)
        ax.annotate(text, (b.get_x() + b.get_width() / 2, h),
                    xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                    fontsize=7)
    if log:
        ax.set_yscale("log")


# --------------------------------------------------------------------------------------
# Figures from the transcribed results (docs/results/*.csv)
# --------------------------------------------------------------------------------------


def cpu_speed_vs_notebook(results: Path, out: Path) -> Path:
    """Real ML-100K, seconds per training epoch against the notebook run side by side, on
    each 2-core machine measured (the ratio depends on the machine)."""
    plt = pyplot()
    rows = [r for r in read_rows(results / "cpu_speed_vs_notebook.csv")
            if r["data"].startswith("real ML-100K")]
    panels = [
        ("2-core CPU, AVX2 (earlier autograd step)", "CPU-AVX2",
         [("notebook", "side by side", "notebook\n(TensorFlow)"),
          ("baseline", "side by side", "baseline\n(torch ref.)"),
          ("fastattrec", "side by side", "fastattrec")]),
        ("2-core CPU, AVX-512 (hand-written step)", "CPU-AVX512",
         [("notebook", "side by side", "notebook\n(TensorFlow)"),
          ("fastattrec", "side by side", "fastattrec\n(compiled step)")]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [3, 2.4]})
    for ax, (title, machine, order) in zip(axes, panels, strict=True):
        labels, epoch_s, colours, spread = [], [], [], []
        for config, series, label in order:
            hit = [r for r in rows if r["config"] == config and r["series"] == series
                   and r["machine"] == machine]
            if not hit:
                continue
            labels.append(label)
            epoch_s.append(num(hit[0]["s_per_epoch"]))
            colours.append(COLOURS[config])
            runs = [num(v) for v in (hit[0].get("epoch_times_s") or "").split(";") if v]
            spread.append(runs if machine == "CPU-AVX512" else [])
        x = list(range(len(labels)))
        label_bars(ax, ax.bar(x, epoch_s, color=colours))
        for i, runs in enumerate(spread):
            if runs:  # beside the bar's centre, clear of its label
                ax.plot([i + 0.28] * len(runs), runs, "k.", ms=4)
        notebook = epoch_s[0] if labels and labels[0].startswith("notebook") else math.nan
        for i, (label, sec) in enumerate(zip(labels, epoch_s, strict=True)):
            if label.startswith("fastattrec") and math.isfinite(notebook):
                text = f"{notebook / sec:.1f}x faster"
                if spread[0] and len(spread[0]) == len(spread[i]):  # ratio run by run
                    r = sorted(n / f for n, f in zip(spread[0], spread[i], strict=True))
                    text = (f"{statistics.median(r):.1f}x faster\n(runs {r[0]:.1f}-"
                            f"{r[-1]:.1f}x)")
                ax.annotate(text, (i, sec), xytext=(0, 14), textcoords="offset points",
                            ha="center", fontsize=7, color=COLOURS["fastattrec"])
        ax.set_xticks(x, labels)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("seconds per training epoch (lower is better)")
    fig.suptitle("Real ML-100K, notebook hyper-parameters: one training epoch")
    return finish(fig, "Source: docs/results/cpu_speed_vs_notebook.csv, 2026-11-28 (the notebook "
                       "side by side on the same CPU; AVX-512 dots: each of 6 repetitions)",
                       out / "cpu_speed_vs_notebook.png")


def gpu_speed(results: Path, out: Path) -> Path:
    """H200: seconds per epoch (ML-1M size); and the whole 40-epoch ML-1M run on each
    machine in gpu_speed.csv (the H200, the 2-core CPU, the notebook's recorded run)."""
    plt = pyplot()
    rows = read_rows(results / "gpu_speed.csv")
    gpu = [r for r in rows if r["machine"] == "H200" and r["data"].startswith("synthetic ML-1M")]
    short = {"fastattrec (Triton kernel; CUDA-graph step; compiled loss)":
             "fastattrec\n(graph step)",
             "Triton kernel; eager step": "Triton kernel\neager step",
             "baseline --kernel torch --no-compile": "baseline\n(torch ref.)"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    labels = [short.get(r["config"], r["config"])
              + (f"\n{num(r['samples_per_s']) / 1e6:.2f}M samples/s"
                 if math.isfinite(num(r["samples_per_s"])) else "") for r in gpu]
    colours = [COLOURS["fastattrec"] if r["config"].startswith("fastattrec")
               else COLOURS["baseline"] for r in gpu]
    x = list(range(len(gpu)))
    label_bars(a, a.bar(x, [num(r["s_per_epoch"]) for r in gpu], color=colours))
    a.set_xticks(x, labels)
    a.set_ylabel("seconds per training epoch")
    a.set_title("H200, synthetic ML-1M size (lower is better)")

    runs = []  # (label, seconds, colour): every whole 40-epoch run, warm where measured
    for r in rows:
        if num(r["epochs"]) != 40 or not any(k in r["data"] for k in ("ML-1M", "MovieLens-1M")):
            continue
        warm, first = num(r["train_call_second_s"]), num(r["train_call_first_s"])
        if r["config"].startswith("fastattrec") and r["machine"] == "H200":
            if math.isfinite(warm):
                runs.append(("fastattrec, H200\n(2nd run, warm caches)", warm,
                             COLOURS["fastattrec"]))
        elif r["config"].startswith("fastattrec") and math.isfinite(first):
            cpu = "AVX-512" if "AVX512" in r["machine"] else r["machine"]
            runs.append((f"fastattrec, 2-core CPU\n({cpu}, one run)", first,
                         COLOURS["fastattrec"]))
        elif "notebook" in r["config"] and math.isfinite(first):
            runs.append(("notebook's recorded\nML-1M run *", first, COLOURS["notebook"]))
    xb = list(range(len(runs)))
    label_bars(b, b.bar(xb, [s for _, s, _ in runs], color=[c for _, _, c in runs]), log=True)
    b.set_xticks(xb, [lbl for lbl, _, _ in runs])
    b.set_ylabel("seconds (log scale)")
    b.set_title("Whole run: 40 epochs with evaluation, ML-1M size")
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    return finish(fig, "Source: docs/results/gpu_speed.csv (benchmarks/bench_train.py, "
                       "2026-11-28). * the notebook on its own machine (2021-11-16), "
                       "preparation included: for scale only.",
                       out / "gpu_speed.png")


def _kernel_panels(plt, rows: list[dict[str, str]], impls: Iterable[str], title: str,
                   note: str):
    """One panel per pass: time (ms) against batch size for each implementation."""
    passes = [p for p in ("fwd", "bwd", "fwd+bwd") if any(r["pass"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(passes), figsize=(4.2 * len(passes), 3.4), squeeze=False)
    names = {"triton": "Triton kernel", "split": "split layout", "structured": "structured",
             "eager": "eager torch", "compile": "torch.compile"}
    for ax, p in zip(axes[0], passes, strict=True):
        mine = sorted((r for r in rows if r["pass"] == p), key=lambda r: num(r["B"]))
        for impl in impls:
            pts = [(num(r["B"]), num(r.get(f"{impl}_ms"))) for r in mine]
            pts = [(b, t) for b, t in pts if math.isfinite(t)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=4, color=COLOURS[impl],
                        label=names[impl])
        floor = [(num(r["B"]), num(r.get("floor_ms"))) for r in mine]
        floor = [(b, t) for b, t in floor if math.isfinite(t)]
        if floor:
            ax.plot(*zip(*floor, strict=True), marker="_", ms=14, mew=2, ls="none",
                    color=COLOURS["floor"], label="floor (datasheet)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (windows)")
        ax.set_ylabel("milliseconds (log scale)")
        ax.set_title(p)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    footnote(fig, note)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def kernel_vs_baselines(results: Path, out: Path) -> Path:
    plt = pyplot()
    rows = read_rows(results / "kernel_vs_baselines.csv")
    fig = _kernel_panels(
        plt, rows, ("triton", "eager", "compile"),
        "Short-term attention (block layout), H200, L=5, d=100, IEEE float32 (lower is better)",
        "Source: docs/results/kernel_vs_baselines.csv (benchmarks/bench_kernel.py, "
        "2026-11-28); floor where RESULTS.md gives it.")
    return save(fig, out / "kernel_vs_baselines.png")


def quality_vs_notebook(results: Path, out: Path, machine: str = "CPU-AVX2") -> Path:
    """Each seed's test metrics, fastattrec against the notebook, per mode, for the runs of
    one machine (the one where both were run with every seed; the CSV holds others too)."""
    plt = pyplot()
    rows = [r for r in read_rows(results / "quality_vs_notebook.csv") if r["machine"] == machine]
    metrics = [("HR@10", "HR@10"), ("NDCG@10_ln", "NDCG@10 (natural log)"), ("MRR", "MRR")]
    groups = [(m, impl) for m in ("inner", "dist") for impl in ("notebook", "fastattrec")]
    fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.4))
    for ax, (col, title) in zip(axes, metrics, strict=True):
        for gx, (mode, impl) in enumerate(groups):
            vals = [num(r[col]) for r in rows if r["mode"] == mode and r["implementation"] == impl]
            if not vals:
                continue
            xs = [gx + (i - (len(vals) - 1) / 2) * 0.08 for i in range(len(vals))]
            ax.scatter(xs, vals, s=16, color=COLOURS[impl], zorder=3)
            mean = sum(vals) / len(vals)
            ax.hlines(mean, gx - 0.3, gx + 0.3, color=COLOURS[impl], lw=1.5)
        ax.set_xticks(range(len(groups)),
                      [f"{mode}\n{impl}\n({sum(1 for r in rows if r['mode'] == mode and r['implementation'] == impl)} seeds)"  # noqa: E501
                       for mode, impl in groups])
        ax.tick_params(axis="x", labelsize=7)
        ax.axvline(1.5, color="#cccccc", lw=0.8)
        ax.set_title(title)
    fig.suptitle("Real ML-100K, 40 epochs, the notebook's sampled test protocol: "
                 "one dot per seed, bar = mean")
    return finish(fig, f"Source: docs/results/quality_vs_notebook.csv, rows of {machine} "
                       "(fastattrec prep --compat notebook; train --ndcg-log e; the notebook in "
                       "TensorFlow 2.21, same CPU), 2026-11-28",
                       out / "quality_vs_notebook.png")


def quality_ablation(results: Path, out: Path) -> Path:
    """Full-ranking NDCG@10 (mean and standard deviation over seeds) of each training
    configuration, one panel per dataset, configurations sorted by validation NDCG."""
    plt = pyplot()
    rows = read_rows(results / "quality_ablation.csv")
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(10, 3.8))
    for ax, data in zip(axes, datasets, strict=True):
        part = sorted((r for r in rows if r["data"] == data), key=lambda r: num(r["val_NDCG@10"]))
        ys = range(len(part))
        colours = [COLOURS["notebook"] if r["configuration"] == "notebook defaults" else
                   COLOURS["fastattrec"] for r in part]
        bars = ax.barh(ys, [num(r["full_NDCG@10"]) for r in part],
                       xerr=[num(r["full_NDCG@10_sd"]) for r in part], color=colours,
                       capsize=2, height=0.6)
        ax.bar_label(bars, labels=[f"{num(r['full_NDCG@10']):.3f}" for r in part],
                     padding=6, fontsize=7)
        ax.set_yticks(list(ys), [f"{r['configuration']} ({r['seeds']})" for r in part],
                      fontsize=7)
        ax.set_xlabel("test NDCG@10, full ranking")
        ax.set_xlim(0, max(num(r["full_NDCG@10"]) for r in part) * 1.3)
        ax.set_title(data.split(" (")[0], fontsize=9)
    fig.suptitle("Training configurations (best validation epoch tested): mean ± sd over "
                 "seeds, sorted by validation NDCG", fontsize=10)
    return finish(fig, "Source: docs/results/quality_ablation.csv (benchmarks/quality.py, "
                       "CPU-EPYC, 2026-12-02 and 2026-12-03)",
                       out / "quality_ablation.png")


def preset_choice(results: Path, out: Path) -> Path:
    """Validation NDCG@10 (full ranking) against validation sampled HR@10 of each
    configuration (mean ± sd over seeds), the earlier and the current quality preset
    marked: the two kinds of metric pull apart as the learning rate rises."""
    plt = pyplot()
    rows = read_rows(results / "preset_choice.csv")
    fig, ax = plt.subplots(figsize=(7, 4.6))
    short = {"sampled softmax": "ss", "negatives": "neg.", "dropout": "do"}
    for i, r in enumerate(sorted(rows, key=lambda r: num(r["val_sampled_HR@10"]))):
        chosen = r["preset"] == "quality"
        colour = (COLOURS["notebook"] if chosen else COLOURS["baseline"]
                  if r["preset"] else COLOURS["fastattrec"])
        x, y = num(r["val_NDCG@10"]), num(r["val_sampled_HR@10"])
        ax.errorbar(x, y, xerr=num(r["val_NDCG@10_sd"]), yerr=num(r["val_sampled_HR@10_sd"]),
                    fmt="o", color=colour, capsize=2, markersize=6 if chosen else 4)
        label = r["configuration"]
        for word, abbrev in short.items():
            label = label.replace(word, abbrev)
        label += f", lr {r['lr']}" + (f" ({r['preset']} preset)" if r["preset"] else "")
        right = i % 2 == 0  # neighbours' labels on alternate sides
        ax.annotate(label, (x, y), xytext=(8 if right else -8, 3), textcoords="offset points",
                    fontsize=6.5, ha="left" if right else "right", color=colour)
    ax.set_xlabel("validation NDCG@10, full ranking (mean ± sd, 3 seeds)")
    ax.set_ylabel("validation HR@10, SASRec's sampled protocol")
    xs = [num(r["val_NDCG@10"]) for r in rows]
    ax.set_xlim(min(xs) - 0.09, max(xs) + 0.09)
    ax.set_title("Choosing the quality preset (real ML-100K): up and to the right is better "
                 "on both", fontsize=9)
    return finish(fig, "ss: sampled softmax; do: dropout. Source: docs/results/preset_choice.csv "
                       "(benchmarks/quality.py, CPU-XEON-AMX, 2026-12-03)",
                       out / "preset_choice.png")


def long_windows(results: Path, out: Path) -> Path:
    """Seconds of one training epoch against the window length L on the CPU, stacked by
    where the time goes, with each L's median epoch and its ratio to L = 5."""
    plt = pyplot()
    rows = read_rows(results / "long_windows.csv")
    parts = [("LxL_products_s", "(L, L) products", "#d62728"),
             ("fused_loops_s", "fused loops", "#ff7f0e"),
             ("scatters_s", "scatters", "#9467bd"),
             ("dxd_products_s", "d x d products", "#2ca02c"),
             ("adam_s", "Adam", "#9aa5b1"), ("other_s", "other", "#c7c7c7")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    for key, label, colour in parts:
        vals = [num(r[key]) for r in rows]
        ax.bar(xs, vals, bottom=bottom, color=colour, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for x, r, top in zip(xs, rows, bottom, strict=True):
        ax.annotate(f"{num(r['epoch_s_median']):.2f} s ({num(r['ratio_to_L5']):.1f}x)",
                    (x, top), xytext=(0, 3), textcoords="offset points", ha="center",
                    fontsize=8)
    goal = 4 * bottom[0]  # the goal for L = 50: 4x the L = 5 epoch
    ax.axhline(goal, color=COLOURS["floor"], linestyle="--", linewidth=0.8)
    ax.annotate("4x the L = 5 epoch", (0.5, goal), xytext=(0, 3), textcoords="offset points",
                fontsize=7)
    ax.set_xticks(list(xs), [f"L = {r['L']}" for r in rows])
    ax.set_ylabel("seconds of one epoch (profiled)")
    ax.set_ylim(0, max(bottom) * 1.15)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("CPU training epoch against the window length (real ML-100K); labels: "
                 "median epoch, ratio to L = 5", fontsize=9)
    return finish(fig, "Source: docs/results/long_windows.csv (benchmarks/bench_window.py, "
                       "CPU-EPYC, 2 threads, 2026-12-03)",
                       out / "long_windows.png")


def tune_trials(results: Path, out: Path) -> Path:
    """Validation NDCG@10 of each trial of a `fastattrec tune` search in the order they
    ran, one colour per objective, with the best found so far: how the search spends its
    budget (random start, then the sampler's guesses)."""
    plt = pyplot()
    rows = [r for r in read_rows(results / "tune_ml100k.csv") if r["state"] == "complete"]
    colours = {"pair": COLOURS["notebook"], "bce": COLOURS["eager"],
               "sampled-softmax": COLOURS["fastattrec"], "gbce": COLOURS["structured"],
               "softmax": COLOURS["compile"]}
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for objective, colour in colours.items():
        mine = [r for r in rows if r["objective"] == objective]
        if mine:
            ax.scatter([int(r["trial"]) for r in mine], [num(r["val_ndcg"]) for r in mine],
                       color=colour, s=18, label=objective, zorder=3)
    best, xs, ys = float("-inf"), [], []
    for r in sorted(rows, key=lambda r: int(r["trial"])):
        best = max(best, num(r["val_ndcg"]))
        xs.append(int(r["trial"]))
        ys.append(best)
    ax.step(xs, ys, where="post", color=COLOURS["floor"], linewidth=0.8, label="best so far")
    ax.set_xlabel("trial (the first 10 drawn at random)")
    ax.set_ylabel("validation NDCG@10, full ranking")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"fastattrec tune on real ML-100K: {len(rows)} trials", fontsize=9)
    r0 = rows[0]
    return finish(fig, f"Source: docs/results/tune_ml100k.csv ({r0['machine']}, one core, "
                       f"{r0['date']})", out / "tune_ml100k.png")


# --------------------------------------------------------------------------------------
# Figures from fresh benchmark output
# --------------------------------------------------------------------------------------


def _csv_and_meta(path: Path) -> tuple[Path, dict]:
    """The CSV of a benchmark result and its machine facts (the JSON written beside it)."""
    path = Path(path)
    csv_path = path.with_suffix(".csv") if path.suffix == ".json" else path
    if not csv_path.exists():
        sys.exit(f"{csv_path} does not exist; give a CSV written by a benchmark script.")
    meta_path = csv_path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return csv_path, meta


def _describe(meta: dict) -> str:
    parts = [meta.get("device"), meta.get("data"),
             f"torch {meta['torch']}" if meta.get("torch") else None,
             f"sha {meta['git_sha']}" if meta.get("git_sha") else None]
    return ", ".join(p for p in parts if p)


def bench_train_figure(path: Path, out: Path) -> Path:
    """bench_train.py output: seconds per epoch and evaluation time per configuration."""
    plt = pyplot()
    csv_path, meta = _csv_and_meta(path)
    rows = read_rows(csv_path)
    if not rows or "epoch_s_median" not in rows[0]:
        sys.exit(f"{csv_path} is not bench_train.py output (no epoch_s_median column).")
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    x = list(range(len(rows)))
    colours = [COLOURS["fastattrec"] if r["config"] == "fastattrec" else COLOURS["baseline"]
               for r in rows]
    labels = [r["config"].replace(" ", "\n", 1) for r in rows]
    label_bars(a, a.bar(x, [num(r["epoch_s_median"]) for r in rows], color=colours))
    a.set_xticks(x, labels)
    a.set_ylabel("seconds per epoch (median)")
    a.set_title("Training (lower is better)")
    w = 0.38
    for off, key, name, c in ((-w / 2, "eval_sampled_s", "sampled", "#1f77b4"),
                              (w / 2, "eval_full_s", "full ranking", "#ff7f0e")):
        bars = b.bar([i + off for i in x], [num(r.get(key)) for r in rows], w, color=c,
                     label=name)
        label_bars(b, bars)
    b.set_xticks(x, labels)
    b.set_ylabel("seconds per test evaluation")
    b.set_title("Evaluation")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(_describe(meta) or csv_path.name, fontsize=9)
    return finish(fig, f"Source: {csv_path} (benchmarks/bench_train.py)",
                       out / f"bench_train_{csv_path.stem}.png")


def bench_kernel_figures(path: Path, out: Path) -> list[Path]:
    """bench_kernel.py output: one figure per (L, d) present in the file."""
    plt = pyplot()
    csv_path, meta = _csv_and_meta(path)
    rows = read_rows(csv_path)
    if not rows or "pass" not in rows[0] or "B" not in rows[0]:
        sys.exit(f"{csv_path} is not bench_kernel.py output (no B and pass columns).")
    impls = [k for k in ("triton", "split", "structured", "eager", "compile")
             if f"{k}_ms" in rows[0]]
    shapes = sorted({(int(num(r["L"])), int(num(r["d"]))) for r in rows})
    written = []
    for length, d in shapes:
        mine = [r for r in rows if int(num(r["L"])) == length and int(num(r["d"])) == d]
        fig = _kernel_panels(
            plt, mine, impls,
            f"{meta.get('device', 'GPU')}, L={length}, d={d}, "
            f"{meta.get('precision', 'ieee')} (lower is better)",
            f"Source: {csv_path} (benchmarks/bench_kernel.py), {_describe(meta)}")
        suffix = "" if len(shapes) == 1 else f"_L{length}_d{d}"
        written.append(save(fig, out / f"bench_kernel_{csv_path.stem}{suffix}.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="folder of the transcribed result CSVs (default: docs/results)")
    ap.add_argument("--out", type=Path, default=FIGURES,
                    help="folder for the PNG files (default: docs/figures)")
    ap.add_argument("--bench-train", type=Path, action="append", default=[],
                    help="a CSV (or its JSON) written by benchmarks/bench_train.py; repeatable")
    ap.add_argument("--bench-kernel", type=Path, action="append", default=[],
                    help="a CSV (or its JSON) written by benchmarks/bench_kernel.py; repeatable")
    args = ap.parse_args(argv)
    written = [
        cpu_speed_vs_notebook(args.results, args.out),
        gpu_speed(args.results, args.out),
        kernel_vs_baselines(args.results, args.out),
        quality_vs_notebook(args.results, args.out),
        quality_ablation(args.results, args.out),
        long_windows(args.results, args.out),
        preset_choice(args.results, args.out),
        tune_trials(args.results, args.out),
    ]
    for p in args.bench_train:
        written.append(bench_train_figure(p, args.out))
    for p in args.bench_kernel:
        written += bench_kernel_figures(p, args.out)
    for p in written:
        print(f"wrote {p} ({p.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
