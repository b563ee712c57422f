"""`fastattrec train`: the training loop (docs/spec.md §3), readable top to bottom.

`train` opens the run (new, or resumed from its checkpoint), claims its folder, loads the
data, builds the model, its optimiser and its training step, then for every epoch: fit
(the step over the epoch's batches), check (a non-finite loss or weight stops the run
unsaved), evaluate (validation loss and NDCG, test metrics every --eval-every epochs),
commit (checkpoint, then the logs from it).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastattrec.batches import DeviceData
from fastattrec.config import TrainConfig
from fastattrec.data.dataset import load_prepared, read_meta
from fastattrec.errors import UserError
from fastattrec.evaluate import DEFAULT_KS, ModelRanker, evaluate, phase_metrics
from fastattrec.model import AttRec
from fastattrec.outputs import absolute
from fastattrec.training import checkpoint as ck
from fastattrec.training.build import Built, build_choosing, experimental_bytes, resolve_kernel
from fastattrec.training.step import Step, run_epoch
from fastattrec.training.system import check_memory, keep_freed_memory, pick_device, set_threads


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    backend: str
    device: str
    stopped_early: bool


class Diverged(UserError):
    """Training produced a non-finite loss or weight: the run stops, unsaved."""


def train(data_dir: Path | None, run_dir: Path, cfg: TrainConfig | None = None,
          resume: bool = False, log: Callable[[str], None] = print, progress: bool = False,
          force: bool = False, distributed: Any = None) -> TrainResult:
    """Train AttRec on a prepared dataset into `run_dir` (or continue it with `resume`).

    Phases: open the run (options, checkpoint), claim the folder (lock, tidy, --force
    rules), load the data, build or restore the model, then per epoch: fit, check for
    divergence, evaluate, commit (checkpoint, then logs)."""
    run_dir = absolute(run_dir)
    main_proc = distributed is None or distributed.rank == 0
    if not main_proc:
        log = lambda s: None  # noqa: E731 - only rank 0 speaks
    if not resume:
        if data_dir is None:
            raise UserError("give DATA_DIR (a folder written by `fastattrec prep`).")
        (cfg or TrainConfig()).check()
    claim = (ck.claim_run(run_dir, None if resume else Path(data_dir), resume, force, log)
             if main_proc else contextlib.nullcontext())
    with claim:
        cfg, ckpt, saved = ck.open_run(data_dir, run_dir, cfg, resume, log)
        cfg.check()
        cfg.threads = set_threads(cfg.threads, log)  # in config.json: --resume reuses it
        return _train_in(run_dir, Path(cfg.data_dir), cfg, ckpt, saved, log, progress,
                         distributed, replace=main_proc and force and not resume)


def _train_in(run_dir: Path, data_dir: Path, cfg: TrainConfig, ckpt: dict | None,
              saved: dict, log: Callable[[str], None], progress: bool,
              distributed: Any, replace: bool) -> TrainResult:
    """The run itself, with the folder claimed (see `train`). `replace`: remove the old
    run's files (--force), once the data and options have been checked."""
    main_proc = distributed is None or distributed.rank == 0
    meta = read_meta(data_dir)
    fp = ck.check_same_data(run_dir, data_dir, meta, saved, ckpt)
    device = distributed.device if distributed else pick_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    resolve_kernel(cfg.kernel, device)
    check_memory(cfg, meta, device, experimental_bytes(cfg, meta, distributed))
    data = DeviceData.from_prepared(load_prepared(data_dir), device)
    if data.train_rows.shape[0] == 0:
        raise UserError(f"{data_dir} has no train samples (every user has fewer than 4 "
                        f"items, or too few before the split's cuts); use a larger log.")
    n_items = int(data.item_valid.sum())
    if cfg.n_negatives >= n_items:
        raise UserError(f"--n-negatives {cfg.n_negatives} is not less than the {n_items:,} "
                        f"items of {data_dir}; give --n-negatives {n_items - 1} or fewer.")
    b, kernel, choice = build_choosing(cfg, data, device, saved, distributed, log)
    state = ck.restore(ckpt, b.model, b.opt, b.gens, log)
    if replace:
        removed = ck.clear_run(run_dir)
        if removed:
            log(f"replacing the run in {run_dir} (removed its {len(removed)} files)")
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        ck.write_config(run_dir, cfg, b.mcfg, meta, fp, choice)
        ck.write_logs(run_dir, state.history)  # drop log lines of an epoch never committed
    if ckpt is not None:
        log(f"resuming {run_dir} after epoch {state.epoch} of {cfg.epochs}")
    log(_start_line(device, kernel, cfg, b.step, data))
    stopped_early = cfg.early_stop > 0 and state.stale >= cfg.early_stop
    if stopped_early:  # the run had already stopped early: resuming changes nothing
        log(f"{run_dir} stopped early after epoch {state.epoch} (no better validation "
            f"{state.history[-1]['val_name']} for {state.stale} epochs); nothing to resume")
    elif state.epoch < cfg.epochs and _out_of_time(cfg, state, distributed):
        stopped_early = True
        log(f"{run_dir} has spent its --time-budget of {cfg.time_budget:g} s "
            f"({_spent(state):.1f} s, {state.epoch} of {cfg.epochs} epochs); nothing to "
            f"resume (give --resume with a larger --time-budget, or 0 for none)")
    writer = ck.CheckpointWriter(run_dir)
    try:
        first = state.epoch + 1  # the epoch whose first step compiles or captures the step
        for epoch in range(first, 0 if stopped_early else cfg.epochs + 1):
            row, improved = _run_epoch(b, data, cfg, epoch, state, kernel,
                                       progress and main_proc, distributed, epoch == first)
            if main_proc:
                ck.commit(writer, run_dir, state, improved, b.model, b.opt, b.gens, cfg,
                          b.mcfg, fp)
            log(_epoch_line(row, cfg))
            if cfg.early_stop > 0 and state.stale >= cfg.early_stop:
                log(f"early stop: validation {row['val_name']} has not improved for "
                    f"{state.stale} epochs; best epoch {state.best['epoch']} is kept in best.pt")
                stopped_early = True
                break
            if epoch < cfg.epochs and _out_of_time(cfg, state, distributed):
                log(f"time budget: after {_spent(state):.1f} s of training another epoch "
                    f"would end past --time-budget {cfg.time_budget:g} s; stopped after "
                    f"epoch {epoch}, best epoch {state.best['epoch']} is kept in best.pt")
                stopped_early = True
                break
    finally:
        writer.wait()
    if main_proc and state.history and not ck.plot_curves(run_dir, state.history):
        log("curves.png not drawn: it needs matplotlib (pip install 'fastattrec[plot]' "
            "or pip install matplotlib)")
    return TrainResult(run_dir, state.history, kernel, str(device), stopped_early)


def _spent(state: ck.RunState) -> float:
    """Seconds the run has trained: fit and evaluation of every epoch done."""
    return sum(h["fit_time"] + h["eval_time"] for h in state.history)


def _out_of_time(cfg: TrainConfig, state: ck.RunState, distributed: Any = None) -> bool:
    """Whether --time-budget stops the run before another epoch: one more, as long as the
    last one took, would end after the budget. With several processes, when any of them
    says so (each times itself; all must stop together)."""
    if cfg.time_budget <= 0 or not state.history:
        return False
    last = state.history[-1]["fit_time"] + state.history[-1]["eval_time"]
    over = _spent(state) + last > cfg.time_budget
    if distributed is not None:
        return float(distributed.all_sum(torch.tensor(float(over), device=distributed.device))) > 0
    return over


def _run_epoch(b: Built, data: DeviceData, cfg: TrainConfig, epoch: int,
               state: ck.RunState, kernel: str, show: bool, distributed: Any,
               first: bool = False) -> tuple[dict[str, Any], bool]:
    """Fit one epoch, stop if it diverged, evaluate, and record it in `state`: the log row
    and whether the validation metric improved."""
    train_loss, fit_time = _fit_epoch(b, cfg, data, epoch, show, distributed, first)
    _check_finite(b.model, cfg, epoch, train_loss=train_loss)
    t2 = time.perf_counter()
    evals, reg = _evaluate_epoch(b.model, data, cfg, epoch, distributed)
    _check_finite(b.model, cfg, epoch, validation_loss=evals["val_loss"])
    n_train = b.step.samples.n_train
    row: dict[str, Any] = {
        "epoch": epoch, "train_loss": train_loss, "reg_loss": reg,
        "train_loss_total": train_loss + reg, "fit_time": fit_time,
        "samples_per_s": n_train / fit_time, "k": cfg.k, "kernel": kernel,
        **evals, "eval_time": time.perf_counter() - t2,
    }
    state.history.append(row)
    improved = row["val_metric"] > state.best["metric"]
    if improved:
        state.best, state.stale = {"metric": row["val_metric"], "epoch": epoch}, 0
    else:
        state.stale += 1
    state.epoch = epoch
    return row, improved


def _fit_epoch(b: Built, cfg: TrainConfig, data: DeviceData, epoch: int, show: bool,
               distributed: Any, first: bool = False) -> tuple[float, float]:
    """One epoch of training steps: (mean train loss, seconds)."""
    t1 = time.perf_counter()
    samples = b.step.samples
    if cfg.negatives == "resample" and cfg.n_negatives == 1:  # (the draws of every row,
        samples.set_negatives(data.sample_negatives(b.gens["negatives"]))  # as before)
    elif cfg.negatives == "resample":  # N per train sample only
        samples.set_train_negatives(data.sample_negatives(
            b.gens["negatives"], cfg.n_negatives, rows=data.train_rows))
    elif cfg.negatives == "shared":
        samples.set_shared(data.shared_negatives(b.gens["negatives"], samples.n_steps,
                                                 cfg.n_negatives))
    samples.shuffle(b.gens["shuffle"])
    bar, tick = _progress_bar(b.step, cfg, epoch, first) if show else (None, None)
    loss_sum = run_epoch(b.step, tick)
    if distributed:
        loss_sum = distributed.all_sum(loss_sum)
    train_loss = float(loss_sum) / samples.n_train  # the one sync of the epoch
    if data.device.type == "cuda":
        torch.cuda.synchronize()
    if bar is not None:
        bar.close()
    return train_loss, time.perf_counter() - t1


def _progress_bar(step: Step, cfg: TrainConfig, epoch: int, first: bool):
    """A tqdm bar over the epoch's steps and its tick function (loss read once a second).
    In the process's first epoch a compiled or graph-captured step says that its first step
    compiles, and samples/s counts from the end of that step, without the compile time."""
    from tqdm import tqdm

    n_train = step.samples.n_train
    bar = tqdm(total=step.samples.n_steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
               leave=False, dynamic_ncols=True)
    how = step.describe()
    if first and ("compiled" in how or "CUDA graph" in how):
        bar.set_postfix_str("compiling the training step (once per process, 10-30 s)")
    last = [time.perf_counter()]
    since = [time.perf_counter(), 0]  # (when the first step ended, samples done by then)

    def tick(i: int) -> None:
        bar.update(1)
        now = time.perf_counter()
        done = min((i + 1) * cfg.batch_size, n_train)
        if i == 0:
            since[:] = [now, done]
            bar.set_postfix_str("")
        elif now - last[0] > 1.0:  # reading the loss syncs: at most once a second
            rate = (done - since[1]) / max(now - since[0], 1e-9)
            bar.set_postfix(loss=f"{step.loss_sum.item() / max(done, 1):.4f}",
                            samples_s=f"{rate:,.0f}")
            last[0] = now

    return bar, tick


def _check_finite(model: AttRec, cfg: TrainConfig, epoch: int, **values: float) -> None:
    """Stop a diverged run before anything of its epoch is saved or scored."""
    bad = [f"{k.replace('_', ' ')} is {v}" for k, v in values.items() if not math.isfinite(v)]
    bad += [f"{n} has non-finite entries" for n, p in model.named_parameters()
            if not bool(torch.isfinite(p).all())]
    if bad:
        kept = (f"keeps epoch {epoch - 1} in checkpoint.pt" if epoch > 1 else
                "saved no epoch")
        raise Diverged(f"training diverged in epoch {epoch} ({'; '.join(bad[:2])}); the run "
                       f"stops and {kept} — lower --lr (now {cfg.lr:g}) or check "
                       f"--embed-reg (now {cfg.embed_reg:g}).")


@torch.no_grad()
def validation_loss(model: AttRec, data: DeviceData, maxlen: int, chunk: int = 65536,
                    dist: Any = None) -> float:
    """Mean per-sample loss (the run's objective, no dropout) of the validation targets
    with their fixed negatives (prep's one per sample; none for the full softmax). Every
    validation target of a user is scored from the same window, the one before the
    user's first validation item (docs/spec.md §1.11)."""
    val = data.val
    rows_all, owner_all = val.rows, val.owner
    if dist is not None:
        rows_all, owner_all = dist.shard(rows_all), dist.shard(owner_all)
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    for lo in range(0, rows_all.shape[0], chunk):
        rows, q = rows_all[lo:lo + chunk], owner_all[lo:lo + chunk]
        windows = data.windows_ending(val.ends[q], val.avail[q], maxlen)
        losses = model.sample_losses(data.row_user[rows], windows, data.items[rows],
                                     data.negs[rows])
        total += losses.double().sum()
    if dist is not None:
        total = dist.all_sum(total)
    return float(total) / max(1, data.val_rows.shape[0])


def _evaluate_epoch(model: AttRec, data: DeviceData, cfg: TrainConfig, epoch: int,
                    distributed: Any) -> tuple[dict[str, Any], float]:
    """Validation loss and full-ranking NDCG every epoch; test metrics every eval_every
    epochs and after the last. Returns the log row's evaluation part and the reg. term."""
    with torch.no_grad():
        reg = float(model.reg_loss())
    ranker = ModelRanker(model)
    val_loss = validation_loss(model, data, cfg.maxlen, dist=distributed) + reg
    val_metrics = phase_metrics(ranker, data, data.val, cfg.maxlen, (cfg.k,), "2",
                                distributed)
    row: dict[str, Any] = {
        "val_loss": val_loss,
        "val_metric": val_metrics[f"NDCG@{cfg.k}"],
        "val_name": f"NDCG@{cfg.k}(full)",
    }
    if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
        ks = sorted(set(DEFAULT_KS) | {cfg.k})
        row["test"] = evaluate(ranker, data, cfg.maxlen, "both", ks, cfg.ndcg_log,
                               dist=distributed)
    return row, reg


def _epoch_line(row: dict[str, Any], cfg: TrainConfig) -> str:
    """The epoch's line (under 100 columns), and a second one with the test metrics of
    both protocols, each named, when the epoch evaluated them. Throughput is on the
    progress bar."""
    line = (f"epoch {row['epoch']:3d}/{cfg.epochs}  loss {row['train_loss']:.4f} (+reg "
            f"{row['reg_loss']:.4f})  val loss {row['val_loss']:.4f}  val {row['val_name']} "
            f"{row['val_metric']:.4f}  fit {row['fit_time']:.2f}s")
    if "test" in row:  # both protocols (full alone for the time and ratio splits), named
        k = cfg.k
        line += "\n  test"
        for proto in row["test"]:
            s = row["test"][proto]
            line += (f"  {proto} HR@{k} {s[f'HR@{k}']:.4f} NDCG@{k} {s[f'NDCG@{k}']:.4f} "
                     f"MRR {s['MRR']:.4f}")
    return line


def _threads_note() -> str:
    """', 1 CPU thread' or ', 2 CPU threads': the count torch trains with."""
    n = torch.get_num_threads()
    return f", {n} CPU thread{'' if n == 1 else 's'}"


def _start_line(device: torch.device, kernel: str, cfg: TrainConfig, step: Step,
                data: DeviceData) -> str:
    """The run-start note: device, attention, step, sizes, experimental options."""
    note = {"triton": "triton fused kernel", "structured": "structured (torch ops, "
            "hand-written backward)", "torch": "torch reference"}[kernel]
    world = step.samples.world
    line = (f"device {device}; short-term attention: {note}\n  step: {step.describe()}; "
            f"{data.train_rows.shape[0]:,} train samples, batch {cfg.batch_size}"
            + (f", {world} processes" if world > 1 else "")
            + (_threads_note() if device.type == "cpu" else ""))
    if cfg.experimental():
        line += f"; experimental: {', '.join(cfg.experimental())}"
    return line
