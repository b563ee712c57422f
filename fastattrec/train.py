"""`fastattrec train`: the training loop (SPEC section 3), readable top to bottom.

Data goes to the device once; each step gathers its windows on the device from the flat
sequences (no DataLoader, no per-sample Python, no host<->device copy per step). One
training step is a fixed-shape function of device tensors only (a step counter, the
epoch's permutation, the negatives), so on CUDA it is captured once as a CUDA graph and
replayed; the last, partial batch is padded and masked, which keeps its loss exact.

The whole-table L2 term is applied through Adam's (L2, not decoupled) weight decay on
the three tables: weight_decay = 2*lambda adds exactly the gradient of
lambda * ||T||^2 to each table's gradient, inside the optimiser kernel that already
touches every row, so it costs no extra pass.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fastattrec import __version__
from fastattrec.atomic import atomic_path, atomic_write_json, atomic_write_text
from fastattrec.batches import DeviceData
from fastattrec.data.dataset import load_prepared, read_meta
from fastattrec.errors import UserError
from fastattrec.evaluate import (
    DEFAULT_KS,
    ModelRanker,
    evaluate,
    full_ranks_of,
    metrics_from_ranks,
)
from fastattrec.kernels import BACKENDS, PRECISIONS, resolve_backend
from fastattrec.model import MODES, AttRec, AttRecConfig, batch_loss
from fastattrec.optim import KerasAdam

NEGATIVE_MODES = ("fixed", "resample")
LOG_COLUMNS = ("Iteration", "fit_time", "evaluate_time", "hit_rate", "ndcg", "mrr")


@dataclass
class TrainConfig:
    """Every option of a training run (the notebook's defaults); saved in config.json."""

    maxlen: int = 5
    dim: int = 100
    mode: str = "inner"
    w: float = 0.5
    gamma: float = 0.5
    embed_reg: float = 1e-6
    lr: float = 1e-3
    batch_size: int = 1024
    epochs: int = 40
    eval_every: int = 5
    k: int = 10
    seed: int = 0
    device: str = "auto"
    negatives: str = "fixed"
    early_stop: int = 0
    kernel: str = "auto"
    precision: str = "ieee"
    compile: bool = True
    ndcg_log: str = "2"
    data_dir: str = ""

    def check(self) -> None:
        """Explain the first bad option in one sentence."""
        positive = ("maxlen", "dim", "batch_size", "epochs", "eval_every", "k")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, "
                                f"got {getattr(self, name)}.")
        choices = {"mode": MODES, "negatives": NEGATIVE_MODES, "kernel": BACKENDS,
                   "precision": PRECISIONS, "ndcg_log": ("2", "e")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} must be one of "
                                f"{', '.join(allowed)}, got {getattr(self, name)!r}.")
        if not 0.0 <= self.w <= 1.0:
            raise UserError(f"--w must be between 0 and 1, got {self.w}.")
        if self.lr <= 0 or self.embed_reg < 0 or self.early_stop < 0:
            raise UserError("--lr must be positive and --embed-reg, --early-stop non-negative.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU here "
                        "(is this a CPU-only torch build?); use --device cpu.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device must be cpu, cuda or auto, got {name!r}.")
    return torch.device(name)


def make_optimizer(model: AttRec, cfg: TrainConfig, device: torch.device,
                   capturable: bool) -> KerasAdam:
    """Adam as SPEC section 3 (eps 1e-7, placed as in Keras); L2 on the tables as
    weight decay 2*lambda. `capturable`: the step runs inside a CUDA graph."""
    groups = [
        {"params": model.tables(), "weight_decay": 2.0 * cfg.embed_reg},
        {"params": [model.proj], "weight_decay": 0.0},
    ]
    # Eager: PyTorch's fused kernel (one multi-tensor kernel per step, CPU and CUDA).
    return KerasAdam(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-7,
                     capturable=capturable and device.type == "cuda", fused=True)


class EpochRunner:
    """Runs the training steps of one epoch; on CUDA, as replays of one CUDA graph.

    The step reads only device tensors: `step` (which batch), `perm` (this epoch's order
    of the train samples) and `negs` (the negatives of every row). It adds the batch's
    summed per-sample loss to `loss_sum`, so nothing is read back inside an epoch.
    """

    def __init__(self, model: AttRec, opt: torch.optim.Optimizer, data: DeviceData,
                 cfg: TrainConfig, forward: torch.nn.Module | None = None,
                 shard: tuple[int, int] = (0, 1)):
        self.model, self.opt, self.data, self.cfg = model, opt, data, cfg
        # `forward` is the module to call: the model, or its DistributedDataParallel wrapper.
        self.forward = forward if forward is not None else model
        dev = data.device
        self.n_train = int(data.train_rows.shape[0])
        self.rank, self.world = shard
        # A global batch of cfg.batch_size is split into `world` equal shards.
        self.global_bs = cfg.batch_size
        self.local_bs = math.ceil(cfg.batch_size / self.world)
        self.n_steps = math.ceil(self.n_train / self.global_bs)
        self.step = torch.zeros((), dtype=torch.long, device=dev)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.perm = torch.zeros(max(self.n_train, 1), dtype=torch.long, device=dev)
        # Per-sample arrays, cut once: windows (T, L), users, targets, and this epoch's
        # negatives (refreshed by set_negatives); int32 halves what each step gathers.
        self.windows, self.users, self.targets = data.train_arrays(cfg.maxlen)
        self.train_negs = data.negs[data.train_rows].to(torch.int32)
        self.slot = torch.arange(self.local_bs, device=dev) + self.rank * self.local_bs
        # DDP averages gradients over processes; each process's loss is its share of the
        # global batch's sum (inner: divided by the global count), scaled by `world`, so the
        # average is exactly the single-process gradient.
        self.loss_scale = float(self.world)
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self) -> None:
        cfg = self.cfg
        lo = self.step * self.global_bs
        hi = torch.clamp(lo + self.global_bs, max=self.n_train)
        pos = lo + self.slot  # (b,) positions in the permutation
        valid = pos < hi
        idx = self.perm[pos.clamp(max=self.n_train - 1)]  # (b,) train sample indices
        vf = valid.to(torch.float32)
        count = (hi - lo).to(torch.float32)  # samples in the whole global batch
        loss = self.forward(self.users[idx], self.windows[idx], self.targets[idx],
                            self.train_negs[idx], vf, count)
        (loss * self.loss_scale).backward()
        self.opt.step()
        local_sum = loss.detach() * (count if cfg.mode == "inner" else 1.0)
        self.loss_sum += local_sum.to(torch.float64)
        self.step += 1

    def set_negatives(self, negs: torch.Tensor) -> None:
        """Use `negs` (N,), one per flat row, from now on (in place: graphs see it)."""
        self.train_negs.copy_(negs[self.data.train_rows])

    def capture(self) -> None:
        """Record one step as a CUDA graph, leaving weights and optimiser untouched."""
        params = [p.detach().clone() for p in self.model.parameters()]
        saved = {p: {k: v.clone() for k, v in st.items()} for p, st in self.opt.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocations, kernel autotuning, Adam state
                self.opt.zero_grad(set_to_none=True)
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - fall back rather than fail a run
                    if self.model._batch_loss is batch_loss:
                        raise
                    warnings.warn(f"torch.compile of the loss failed ({e}); using eager "
                                  f"loss inside the CUDA graph", stacklevel=1)
                    self.model._batch_loss = batch_loss
                    self.opt.zero_grad(set_to_none=True)
                    self._step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), params, strict=True):
                p.copy_(v)
            for p, st in self.opt.state.items():
                for k, v in st.items():
                    if p in saved:
                        v.copy_(saved[p][k])
                    else:
                        v.zero_()
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        torch.cuda.synchronize()

    def run(self, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """All steps of one epoch; returns the device tensor of summed sample losses."""
        self.step.zero_()
        self.loss_sum.zero_()
        for i in range(self.n_steps):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.opt.zero_grad(set_to_none=True)
                self._step()
            if progress is not None:
                progress(i)
        return self.loss_sum


@torch.no_grad()
def validation_loss(model: AttRec, data: DeviceData, maxlen: int, chunk: int = 65536,
                    dist=None) -> float:
    """Mean per-sample loss of the validation targets with their fixed negatives."""
    rows_all = data.val_rows if dist is None else dist.shard(data.val_rows)
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    for lo in range(0, rows_all.shape[0], chunk):
        rows = rows_all[lo:lo + chunk]
        losses = model.pair_losses(data.row_user[rows], data.windows_before(rows, maxlen),
                                   data.items[rows], data.negs[rows])
        total += losses.double().sum()
    if dist is not None:
        total = dist.all_sum(total)
    return float(total) / max(1, data.val_rows.shape[0])


def _csv_text(history: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LOG_COLUMNS)
    for h in history:
        if "test" in h:
            s = h["test"]["sampled"]
            k = h["k"]
            w.writerow([h["epoch"], f"{h['fit_time']:.4f}", f"{h['eval_time']:.4f}",
                        f"{s[f'HR@{k}']:.6f}", f"{s[f'NDCG@{k}']:.6f}", f"{s['MRR']:.6f}"])
    return buf.getvalue()


def write_logs(run_dir: Path, history: list[dict]) -> None:
    """log.csv (the notebook's columns) and metrics.jsonl (everything), both rewritten
    atomically from the checkpointed history, so they never disagree with it."""
    atomic_write_text(run_dir / "log.csv", _csv_text(history))
    atomic_write_text(run_dir / "metrics.jsonl",
                      "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def plot_curves(run_dir: Path, history: list[dict]) -> bool:
    """curves.png of losses and metrics per epoch, when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [h["train_loss"] for h in history], label="train loss")
    a.plot(ep, [h["val_loss"] for h in history], label="validation loss")
    a.set_xlabel("epoch")
    a.legend()
    b.plot(ep, [h["val_metric"] for h in history], label=f"validation {history[0]['val_name']}")
    tested = [h for h in history if "test" in h]
    if tested:
        k = tested[0]["k"]
        for proto in ("sampled", "full"):
            b.plot([h["epoch"] for h in tested], [h["test"][proto][f"HR@{k}"] for h in tested],
                   marker="o", label=f"test HR@{k} ({proto})")
    b.set_xlabel("epoch")
    b.legend()
    fig.tight_layout()
    with atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _to_host(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor copied to host memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_host(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes checkpoints from a background thread, so the next epoch does not wait for
    the disk. The state is copied to host memory first (training keeps changing it);
    each file is still written to a temporary name and renamed; `wait` joins."""

    def __init__(self) -> None:
        import threading

        self._threading = threading
        self._thread = None
        self._error: BaseException | None = None

    def submit(self, files: list[tuple[Path, dict[str, Any]]]) -> None:
        self.wait()
        files = [(p, _to_host(s)) for p, s in files]

        def work() -> None:
            try:
                for path, state in files:
                    save_checkpoint(path, state)
            except BaseException as e:  # reported by wait()
                self._error = e

        self._thread = self._threading.Thread(target=work, daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    backend: str
    device: str
    stopped_early: bool


def train(data_dir: Path | None, run_dir: Path, cfg: TrainConfig | None = None,
          resume: bool = False, log: Callable[[str], None] = print, progress: bool = False,
          force: bool = False, distributed: Any = None) -> TrainResult:
    """Train AttRec on a prepared dataset into `run_dir` (or continue it with `resume`)."""
    run_dir = Path(run_dir)
    ckpt = None
    if resume:
        if not (run_dir / "checkpoint.pt").exists():
            raise UserError(f"{run_dir} has no checkpoint.pt to resume; start a new run with "
                            f"`fastattrec train DATA_DIR -o {run_dir}`.")
        ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(ckpt["config"])
        if cfg is not None:  # only the epoch count and the device may change on resume
            saved.epochs, saved.device = cfg.epochs, cfg.device
        cfg = saved
        data_dir = Path(cfg.data_dir)
    else:
        cfg = cfg or TrainConfig()
        if data_dir is None:
            raise UserError("give DATA_DIR (a folder written by `fastattrec prep`).")
        if run_dir.exists() and any(run_dir.iterdir()) and not force:
            hint = " or --resume it" if (run_dir / "checkpoint.pt").exists() else ""
            raise UserError(f"{run_dir} already exists and is not empty; choose another -o, "
                            f"pass --force to overwrite{hint}.")
        cfg.data_dir = str(Path(data_dir).resolve())
    cfg.check()
    meta = read_meta(Path(data_dir))
    device = distributed.device if distributed else pick_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    rank, world = (distributed.rank, distributed.world) if distributed else (0, 1)
    main_proc = rank == 0
    if not main_proc:
        log = lambda s: None  # noqa: E731 - only rank 0 speaks
    try:
        backend = resolve_backend(cfg.kernel, device)
    except RuntimeError as e:
        raise UserError(f"--kernel {cfg.kernel}: {e}.") from None

    prepared = load_prepared(Path(data_dir))
    data = DeviceData.from_prepared(prepared, device)
    if data.train_rows.shape[0] == 0:
        raise UserError(f"{data_dir} has no train samples (every user has fewer than 4 "
                        f"items); use a larger log.")
    mcfg = AttRecConfig(n_users=data.n_users, n_items=data.n_items, dim=cfg.dim,
                        maxlen=cfg.maxlen, mode=cfg.mode, w=cfg.w, gamma=cfg.gamma,
                        embed_reg=cfg.embed_reg, kernel=backend, precision=cfg.precision)
    model = AttRec(mcfg, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    use_graph = cfg.compile and device.type == "cuda" and distributed is None
    if cfg.compile and device.type == "cuda":
        model.compile_loss()
    opt = make_optimizer(model, cfg, device, capturable=use_graph)
    g_shuffle = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    g_negs = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    history: list[dict] = []
    best = {"metric": -math.inf, "epoch": 0}
    stale, start = 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        g_shuffle.set_state(ckpt["rng"]["shuffle"])
        g_negs.set_state(ckpt["rng"]["negatives"])
        history, best, stale, start = ckpt["history"], ckpt["best"], ckpt["stale"], ckpt["epoch"]
        log(f"resuming {run_dir} after epoch {start} of {cfg.epochs}")
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", {
            "train": asdict(cfg), "model": mcfg.to_dict(), "fastattrec_version": __version__,
            "data": {"path": cfg.data_dir, "source_sha256": meta["source"]["sha256"],
                     "counts": meta["counts"]},
        })
    kernel_note = {"triton": f"triton fused kernel, {cfg.precision} dots",
                   "structured": "structured (torch ops, hand-written backward)",
                   "torch": "torch reference"}[backend]
    log(f"device {device}; short-term attention: {kernel_note}; "
        f"step: {'CUDA graph, compiled loss' if use_graph else 'eager'}; "
        f"{data.train_rows.shape[0]:,} train samples, batch {cfg.batch_size}"
        + (f", {world} processes" if world > 1 else ""))

    forward = distributed.wrap(model) if distributed else None
    runner = EpochRunner(model, opt, data, cfg, forward=forward, shard=(rank, world))
    if use_graph:
        runner.capture()
    val_name = f"NDCG@{cfg.k}(full)"
    stopped_early = False
    writer = CheckpointWriter()
    n_train = runner.n_train
    for epoch in range(start + 1, cfg.epochs + 1):
        t1 = time.perf_counter()
        if cfg.negatives == "resample":
            runner.set_negatives(data.sample_negatives(g_negs))
        runner.perm.copy_(torch.randperm(n_train, generator=g_shuffle, device=device))
        bar = None
        if progress and main_proc:
            from tqdm import tqdm

            bar = tqdm(total=runner.n_steps, desc=f"epoch {epoch}/{cfg.epochs}",
                       unit="step", leave=False, dynamic_ncols=True)
        last = [time.perf_counter()]

        def tick(i: int, bar=bar, last=last, t1=t1) -> None:
            bar.update(1)
            now = time.perf_counter()
            if now - last[0] > 1.0:  # reading the loss syncs: at most once a second
                done = min((i + 1) * cfg.batch_size, n_train)
                bar.set_postfix(loss=f"{runner.loss_sum.item() / max(done, 1):.4f}",
                                samples_s=f"{done / (now - t1):,.0f}")
                last[0] = now

        loss_sum = runner.run(tick if bar is not None else None)
        if distributed:
            loss_sum = distributed.all_sum(loss_sum)
        train_loss = float(loss_sum) / n_train  # the one sync of the epoch
        if device.type == "cuda":
            torch.cuda.synchronize()
        fit_time = time.perf_counter() - t1
        if bar is not None:
            bar.close()
        t2 = time.perf_counter()
        with torch.no_grad():
            reg = float(model.reg_loss())
        ranker = ModelRanker(model)
        val_loss = validation_loss(model, data, cfg.maxlen, dist=distributed) + reg
        val_ranks = full_ranks_of(ranker, data, data.val_rows, cfg.maxlen, distributed)
        val_metric = metrics_from_ranks(val_ranks, (cfg.k,))[f"NDCG@{cfg.k}"]
        row: dict[str, Any] = {
            "epoch": epoch, "train_loss": train_loss, "reg_loss": reg,
            "train_loss_total": train_loss + reg, "val_loss": val_loss,
            "val_metric": val_metric, "val_name": val_name, "fit_time": fit_time,
            "samples_per_s": n_train / fit_time, "k": cfg.k, "kernel": backend,
        }
        tested = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
        if tested:
            ks = sorted(set(DEFAULT_KS) | {cfg.k})
            row["test"] = evaluate(ranker, data, cfg.maxlen, "both", ks, cfg.ndcg_log,
                                   dist=distributed)
        row["eval_time"] = time.perf_counter() - t2
        history.append(row)
        improved = val_metric > best["metric"]
        if improved:
            best = {"metric": val_metric, "epoch": epoch}
            stale = 0
        else:
            stale += 1
        stop = cfg.early_stop > 0 and stale >= cfg.early_stop
        if main_proc:
            state = {  # (the same on every process)
                "epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": {"shuffle": g_shuffle.get_state(), "negatives": g_negs.get_state()},
                "history": history, "best": best, "stale": stale, "config": asdict(cfg),
                "model_config": mcfg.to_dict(), "fastattrec_version": __version__,
            }
            files = [(run_dir / "checkpoint.pt", state)]
            if improved:
                files.insert(0, (run_dir / "best.pt", {
                    "epoch": epoch, "model": state["model"], "model_config": state["model_config"],
                    "config": state["config"]}))
            writer.submit(files)
            write_logs(run_dir, history)
        line = (f"epoch {epoch:3d}/{cfg.epochs}  loss {train_loss:.4f} (+reg {reg:.4f})  "
                f"val loss {val_loss:.4f}  val {val_name} {val_metric:.4f}  "
                f"fit {fit_time:.2f}s ({n_train / fit_time:,.0f} samples/s)")
        if tested:
            s = row["test"]["sampled"]
            line += (f"  test HR@{cfg.k} {s[f'HR@{cfg.k}']:.4f} NDCG@{cfg.k} "
                     f"{s[f'NDCG@{cfg.k}']:.4f} MRR {s['MRR']:.4f}")
        log(line)
        if stop:
            log(f"early stop: validation {val_name} has not improved for {stale} epochs; "
                f"best epoch {best['epoch']} is kept in best.pt")
            stopped_early = True
            break
    writer.wait()
    if main_proc and history:
        plot_curves(run_dir, history)
    return TrainResult(run_dir, history, backend, str(device), stopped_early)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB for reuse instead of unmapping them.

    A CPU training step allocates a few dozen megabyte-sized temporaries; by default
    glibc returns each to the kernel and the next step page-faults it in again, which
    showed up as a third of the step's time in system calls. Returns False where this is
    not glibc (nothing is changed there)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
        return ok and libc.mallopt(m_trim_threshold, 256 << 20) == 1
    except (OSError, AttributeError):
        return False


def set_threads(n: int) -> None:
    """Use `n` CPU threads for torch (0: leave torch's default, one per core)."""
    if n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
