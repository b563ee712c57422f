"""`fastattrec train`: the training loop (docs/spec.md §3), readable top to bottom.

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

import contextlib
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
from fastattrec.cpu_step import ManualStep
from fastattrec.data.dataset import fingerprint, load_prepared, read_meta
from fastattrec.epoch_batches import EpochBatches, lookups, plan_bytes
from fastattrec.errors import UserError, shown
from fastattrec.evaluate import (
    DEFAULT_KS,
    ModelRanker,
    evaluate,
    full_ranks_of,
    metrics_from_ranks,
)
from fastattrec.kernels import BACKENDS, PRECISIONS, resolve_backend, triton_available
from fastattrec.model import MODES, AttRec, AttRecConfig, batch_loss
from fastattrec.optim import KerasAdam
from fastattrec.outputs import absolute, claim_output
from fastattrec.run_folder import (
    BEST,
    CHECKPOINT,
    CONFIG,
    RUN_FORMAT_VERSION,
    RUN_KIND,
    clear_run,
    is_run_folder,
    load_checkpoint,
    read_run_config,
)

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
    threads: int = 0  # 0: chosen at the start (free cores) and saved as the number used
    graph_steps: int = 1  # CUDA with --compile: training steps recorded in one CUDA graph
    # The epoch's batches planned at its start, every table row by one gather and every
    # table gradient by one deterministic scatter; on CUDA with the Triton attention, the
    # step as eight Triton launches without autograd (`EpochRunner._fused_step`). Not yet
    # timed on a GPU, so off. On CPU it runs the kernels' slow torch forms.
    one_scatter: bool = False
    data_dir: str = ""

    def check(self) -> None:
        """Explain the first bad option in one sentence."""
        flag = {"k": "-k"}

        def name_of(name: str) -> str:
            return flag.get(name, "--" + name.replace("_", "-"))

        numeric = {"maxlen": int, "dim": int, "batch_size": int, "epochs": int,
                   "eval_every": int, "k": int, "seed": int, "early_stop": int, "threads": int,
                   "graph_steps": int,
                   "lr": float,
                   "embed_reg": float, "w": float, "gamma": float}
        for name, kind in numeric.items():
            v = getattr(self, name)
            ok = isinstance(v, int) if kind is int else isinstance(v, int | float)
            if not ok or isinstance(v, bool):
                want = "an integer" if kind is int else "a number"
                raise UserError(f"{name_of(name)} must be {want}, got {v!r}.")
        for name in ("maxlen", "dim", "batch_size", "epochs", "eval_every", "k", "graph_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name_of(name)} must be at least 1, got {getattr(self, name)}.")
        for name in ("compile", "one_scatter"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name_of(name)} must be true or false, got "
                                f"{getattr(self, name)!r}.")
        choices = {"mode": MODES, "negatives": NEGATIVE_MODES, "kernel": BACKENDS,
                   "precision": PRECISIONS, "ndcg_log": ("2", "e")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name_of(name)} must be one of {', '.join(allowed)}, got "
                                f"{getattr(self, name)!r}.")
        for name in ("lr", "embed_reg", "w", "gamma"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{name_of(name)} must be a finite number, got "
                                f"{getattr(self, name)}.")
        if not 0.0 <= self.w <= 1.0:
            raise UserError(f"--w must be between 0 and 1, got {self.w}.")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}.")
        if self.embed_reg < 0:
            raise UserError(f"--embed-reg must not be negative, got {self.embed_reg}.")
        if self.early_stop < 0:
            raise UserError(f"--early-stop must not be negative, got {self.early_stop}.")
        if self.graph_steps > 4096:
            raise UserError(f"--graph-steps must be at most 4096, got {self.graph_steps}.")
        if not 0 <= self.threads <= 1024:
            raise UserError(f"--threads must be between 0 and 1024, got {self.threads}.")
        if not 0 <= self.seed < 2**63 - 2:
            raise UserError(f"--seed must be between 0 and 2^63 - 3, got {self.seed}.")

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
        raise UserError(f"--device must be cpu, cuda or auto, got {shown(name)}.")
    return torch.device(name)


def make_optimizer(model: AttRec, cfg: TrainConfig, device: torch.device,
                   capturable: bool) -> KerasAdam:
    """Adam as docs/spec.md §3.1-3.2 (eps 1e-7, placed as in Keras); L2 on the tables as
    weight decay 2*lambda. `capturable`: the step runs inside a CUDA graph."""
    groups = [
        {"params": model.tables(), "weight_decay": 2.0 * cfg.embed_reg},
        {"params": [model.proj], "weight_decay": 0.0},
    ]
    # Eager: PyTorch's fused kernel (one multi-tensor kernel per step, CPU and CUDA).
    return KerasAdam(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-7,
                     capturable=capturable and device.type == "cuda", fused=True)


def replay_sizes(n_steps: int, per_graph: int) -> list[int]:
    """The steps of each CUDA-graph replay in an epoch of `n_steps`: replays of
    `per_graph` steps, then one replay of the rest (two graphs at most)."""
    k = max(1, min(per_graph, n_steps))
    full, rest = divmod(n_steps, k)
    return [k] * full + ([rest] if rest else [])


class EpochRunner:
    """Runs the training steps of one epoch; on CUDA, as replays of CUDA graphs of
    `cfg.graph_steps` steps each (`replay_sizes`).

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
        # The graph of the first replay size (one step when graph_steps is 1, the default).
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # steps -> graph of that many
        self.replays = replay_sizes(self.n_steps, cfg.graph_steps)
        # On the CPU, one process, the structured attention: the hand-written step
        # (cpu_step.py), which writes the gradients itself instead of autograd.
        manual = (dev.type == "cpu" and self.world == 1 and forward is None
                  and model.cfg.kernel == "structured")
        self.manual = ManualStep(model, compile=cfg.compile) if manual else None
        # One gather for every table row and one scatter for every table gradient
        # (`_planned_step`), from the epoch's batches cut and planned at its start; the
        # gradients land in one buffer whose row blocks are the tables' .grad, set again
        # after each zero_grad.
        self.flat_grad: torch.Tensor | None = None
        self.batches: EpochBatches | None = None
        if cfg.one_scatter and not manual and self.world == 1:
            tables = model.tables()
            self.flat_grad = torch.zeros(sum(t.shape[0] for t in tables), cfg.dim,
                                         device=dev, dtype=tables[0].dtype)
            self.grad_views = list(self.flat_grad.split([t.shape[0] for t in tables]))
            self.batches = EpochBatches(self.n_train, self.global_bs, cfg.maxlen,
                                        tables[0].shape[0], tables[1].shape[0], dev)
        # the backend of the step's small kernels (the one-scatter step's gather and
        # scatter, every step's bookkeeping): Triton on CUDA; on the CPU their torch
        # forms (same bits; the tests also run the kernels interpreted)
        self.rows_backend = "auto" if dev.type == "cuda" and triton_available() else "torch"
        # The one-scatter step writes the table gradients (no accumulation) into a buffer
        # kept between steps: the capturable Adam zeroes them after reading, else the step
        # zeroes the buffer itself.
        if self.batches is not None and isinstance(opt, KerasAdam):
            opt.zero_grads_after = True
        self.opt_zeroes_grads = (self.batches is not None and isinstance(opt, KerasAdam)
                                 and opt.zeroes_grads())
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None  # (valid, count)

    def _manual_step(self, i: int) -> None:
        """Step `i` of the epoch on the hand-written CPU path: the batch's bounds in
        Python integers, its rows gathered inside the compiled step (same batches, same
        padding of the last one as `_step`)."""
        lo = i * self.global_bs
        hi = min(lo + self.global_bs, self.n_train)
        if hi - lo == self.global_bs:
            idx = self.perm[lo:hi]
            if self._full is None:
                self._full = (torch.ones(hi - lo), torch.tensor(float(hi - lo)))
            vf, count = self._full
        else:  # the last, partial batch keeps the fixed shape, its padding masked
            pos = lo + self.slot
            idx = self.perm[pos.clamp(max=self.n_train - 1)]
            vf, count = (pos < hi).to(torch.float32), torch.tensor(float(hi - lo))
        loss = self.manual.gathered(idx, self.users, self.windows, self.targets,
                                    self.train_negs, vf, count)
        self._finish_step(loss, count)

    def _finish_step(self, loss: torch.Tensor, count: torch.Tensor) -> None:
        """Every step's end: the optimiser step, the batch's summed loss, the counter
        (one launch where the step's kernels are Triton's: `kernels/step_tail.py`)."""
        self.opt.step()
        if self.rows_backend != "torch":
            from fastattrec.kernels.experimental.step_tail import step_tail_

            step_tail_(loss, count, self.loss_sum, self.step, self.cfg.mode == "inner")
            return
        local_sum = loss.detach() * (count if self.cfg.mode == "inner" else 1.0)
        self.loss_sum += local_sum.to(torch.float64)
        self.step += 1

    def start_epoch(self) -> None:
        """Before an epoch's first step (`run` and `capture` call it): with one_scatter,
        cut and plan every batch of the epoch from `perm` and the negatives."""
        if self.batches is not None:
            self.batches.fill(self.perm[:self.n_train], self.users, self.windows,
                              self.targets, self.train_negs)

    def _planned_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss, its table gradients from one scatter: every table row the
        batch looks up (users, window items, candidates in the item and item2 tables)
        is gathered by one kernel into one autograd leaf, autograd stops there, and one
        deterministic scatter adds the leaf's gradient into the tables' gradient buffer.
        Both kernels read the step's row of the epoch's index and plan with the device
        counter (`EpochBatches`), so nothing is read back and no Python runs between
        steps: the step can be captured in a CUDA graph. Same maths as the autograd
        step. Returns (loss, count)."""
        from fastattrec.kernels.experimental.embedding_gather import gather_rows_
        from fastattrec.kernels.experimental.embedding_scatter import scatter_rows_

        m, nb = self.model, self.batches
        b, length, d = nb.batch, nb.maxlen, m.cfg.dim
        backend = self.rows_backend
        rows = torch.empty((nb.n_lookups, d), device=self.flat_grad.device,
                           dtype=self.flat_grad.dtype)  # (N, d)
        flags = torch.empty(nb.n_lookups, dtype=torch.bool, device=rows.device)  # (N,)
        gather_rows_(rows, [t.detach() for t in m.tables()], nb.index, step=self.step,
                     backend=backend, flags=flags, flag_row=nb.padding_row)
        rows.requires_grad_(True)
        valid, count = nb.step_aux(self.step)  # (B,), 0-d
        u, x, e, e2 = rows.split(lookups(b, length))
        loss = m.loss_of_rows(u, x.view(b, length, d), nb.window_mask(flags),
                              e.view(b, 2, d), e2.view(b, 2, d), valid, count)
        loss.backward()  # into rows.grad and proj.grad
        if not self.opt_zeroes_grads:  # else the last step's Adam left them zero
            self.flat_grad.zero_()
        scatter_rows_(self.flat_grad, rows.grad, nb.plan, accumulate=False, step=self.step,
                      backend=backend)
        for t, view in zip(m.tables(), self.grad_views, strict=True):
            t.grad = view
        return loss, count

    def fused(self) -> bool:
        """Whether the one-scatter step runs without autograd, as a chain of Triton
        kernels (`_fused_step`): its small kernels are Triton's, the attention is the
        Triton tile layout, and rows fit the loss kernel."""
        from fastattrec.kernels.attention import layout_for
        from fastattrec.kernels.experimental.pair_loss import MAX_DIM

        cfg = self.model.cfg
        return (self.batches is not None and self.rows_backend != "torch"
                and cfg.kernel == "triton" and layout_for(cfg.maxlen) == "tiles"
                and cfg.dim <= MAX_DIM)

    def _fused_step(self) -> None:
        """The one-scatter step as eight Triton launches with the chain rule written out,
        no autograd: (1) gather the rows, flag the key mask, compute P W -> (2) attention
        forward -> (3) the pairwise loss and the gradients of users and candidates,
        straight into the step's gradient rows -> (4) attention backward, dX into the
        window rows -> (5) dW -> (6) the scatter into the tables' gradient buffer -> (7)
        Adam -> (8) the bookkeeping (loss sum, step counter, Adam's step counters). With
        the capturable Adam, which zeroes the gradients it reads, nothing else runs
        (else one zeroing launch more). Each kernel reads the step from the device
        counter; nothing is read back. Same maths as the autograd step."""
        from fastattrec.kernels.attention_tiles import tile_backward, tile_forward
        from fastattrec.kernels.experimental.embedding_scatter import scatter_rows_
        from fastattrec.kernels.experimental.pair_loss import pair_loss_, programs
        from fastattrec.kernels.experimental.step_prologue import step_prologue_
        from fastattrec.kernels.experimental.step_tail import MAX_COUNTERS, step_tail_parts_

        m, nb, cfg = self.model, self.batches, self.model.cfg
        b, length, d = nb.batch, nb.maxlen, cfg.dim
        dev = self.flat_grad.device
        with torch.no_grad():
            rows = torch.empty((nb.n_lookups, d), device=dev)  # (N, d)
            flags = torch.empty(nb.n_lookups, dtype=torch.bool, device=dev)
            w, pos = m.proj.detach(), m.pos_enc
            pw = step_prologue_(rows, [t.detach() for t in m.tables()], nb.index, self.step,
                                flags, nb.padding_row, pos, w)  # and P W (L, d)
            win = slice(b, b + b * length)
            x = rows[win].view(b, length, d)
            mask8 = nb.window_mask(flags).view(torch.uint8)  # (B, L)
            short = tile_forward(x, mask8, w, pos, cfg.precision, pw)  # (B, d)
            grad_rows = torch.empty_like(rows)
            dshort = torch.empty_like(short)
            parts = torch.empty(programs(b), device=dev)
            pair_loss_(rows, short, nb.aux, self.step, grad_rows, dshort, parts, length,
                       cfg.mode, cfg.w, cfg.gamma)
            _, m.proj.grad = tile_backward(dshort, x, mask8, w, pos, cfg.precision, pw,
                                           dx=grad_rows[win].view(b, length, d))
            if not self.opt_zeroes_grads:
                self.flat_grad.zero_()
            scatter_rows_(self.flat_grad, grad_rows, nb.plan, accumulate=False,
                          step=self.step, backend="triton")
        for t, view in zip(m.tables(), self.grad_views, strict=True):
            t.grad = view
        # the capturable Adam's own kernel: its step counters are counted by the
        # bookkeeping launch, which runs after it anyway
        defer = self.opt_zeroes_grads and len(list(m.parameters())) <= MAX_COUNTERS
        if defer:
            self.opt.device_step(count_steps=False)
        else:
            self.opt.step()
        step_tail_parts_(parts, self.loss_sum, self.step,
                         self.opt.step_counters() if defer else None)

    def _step(self) -> None:
        if self.batches is not None:
            if self.fused():
                self._fused_step()
            else:
                self._finish_step(*self._planned_step())
            return
        lo = self.step * self.global_bs
        hi = torch.clamp(lo + self.global_bs, max=self.n_train)
        pos = lo + self.slot  # (b,) positions in the permutation
        valid = pos < hi
        idx = self.perm[pos.clamp(max=self.n_train - 1)]  # (b,) train sample indices
        vf = valid.to(torch.float32)
        count = (hi - lo).to(torch.float32)  # samples in the whole global batch
        args = (self.users[idx], self.windows[idx], self.targets[idx], self.train_negs[idx],
                vf, count)
        if self.manual is not None:  # (the epoch loop calls _manual_step instead)
            loss = self.manual(*args)
        else:
            loss = self.forward(*args)
            (loss * self.loss_scale).backward()
        self._finish_step(loss, count)

    def set_negatives(self, negs: torch.Tensor) -> None:
        """Use `negs` (N,), one per flat row, from now on (in place: graphs see it)."""
        self.train_negs.copy_(negs[self.data.train_rows])

    def capture(self) -> None:
        """Record the steps of each replay size as a CUDA graph (the gradients set to
        None before each step, as in an eager epoch), leaving weights and optimiser
        untouched."""
        params = [p.detach().clone() for p in self.model.parameters()]
        saved = {p: {k: v.clone() for k, v in st.items()} for p, st in self.opt.state.items()}
        self.start_epoch()  # the one-scatter step reads the epoch's batches
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocations, kernel autotuning, Adam state
                self.opt.zero_grad(set_to_none=True)
                self.step.zero_()  # step 0 each time: an epoch may have a single step
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
        self.step.zero_()
        self.loss_sum.zero_()
        with torch.no_grad():
            for p, v in zip(self.model.parameters(), params, strict=True):
                p.copy_(v)
            for p, st in self.opt.state.items():
                for k, v in st.items():
                    if p in saved:
                        v.copy_(saved[p][k])
                    else:
                        v.zero_()
        if not self.replays:  # no train samples: nothing to record
            return
        for size in sorted(set(self.replays), reverse=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(size):
                    self.opt.zero_grad(set_to_none=True)
                    self._step()
            self.graphs[size] = graph
        self.graph = self.graphs[self.replays[0]]
        torch.cuda.synchronize()

    def run(self, progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """All steps of one epoch; returns the device tensor of summed sample losses."""
        self.step.zero_()
        self.loss_sum.zero_()
        self.start_epoch()
        if self.graphs:
            done = 0
            for size in self.replays:
                self.graphs[size].replay()
                if progress is not None:
                    for i in range(done, done + size):
                        progress(i)
                done += size
            return self.loss_sum
        for i in range(self.n_steps):
            if self.manual is not None:
                self._manual_step(i)
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
    """torch.save through a temporary file and an atomic rename; a failed write (full
    disk, read-only folder) is one sentence naming the file."""
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as e:  # torch reports a failed write as a RuntimeError
            first = str(e).strip().splitlines()[0]
            raise UserError(f"cannot write {path} ({first}); check free space and "
                            f"permissions of {path.parent}.") from None


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
    """Commits epochs from a background thread, so the next epoch does not wait for the
    disk. The state is copied to host memory first (training keeps changing it); each file
    is written to a temporary name and renamed; the logs are rewritten from the committed
    history only after checkpoint.pt is in place (the commit point); `wait` joins."""

    def __init__(self, run_dir: Path) -> None:
        import threading

        self._threading = threading
        self._run_dir = run_dir
        self._thread = None
        self._error: BaseException | None = None

    def submit(self, files: list[tuple[Path, dict[str, Any]]], history: list[dict]) -> None:
        self.wait()
        files = [(p, _to_host(s)) for p, s in files]
        history = [dict(h) for h in history]

        def work() -> None:
            try:
                for path, state in files:
                    save_checkpoint(path, state)
                write_logs(self._run_dir, history)
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


class Diverged(UserError):
    """Training produced a non-finite loss or weight: the run stops, unsaved."""


@dataclass
class RunState:
    """Where a run stands: what the checkpoint holds, or the start of a new run."""

    history: list[dict]
    best: dict[str, Any]
    stale: int
    epoch: int  # epochs done


def _open_run(data_dir: Path | None, run_dir: Path, cfg: TrainConfig | None, resume: bool,
              log: Callable[[str], None]) -> tuple[TrainConfig, dict | None, dict]:
    """Set-up: the run's options, its checkpoint (None for a fresh start) and the saved
    config.json (empty for a new run). Resuming keeps the saved options, except --epochs
    and --device; a run killed before its first checkpoint starts over from them."""
    if not resume:
        cfg = cfg or TrainConfig()
        cfg.data_dir = str(Path(data_dir).resolve())
        return cfg, None, {}
    saved = read_run_config(run_dir)
    ckpt = None
    if (run_dir / CHECKPOINT).exists():
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
    else:
        log(f"{run_dir} has no checkpoint yet (interrupted before its first epoch ended); "
            f"starting it over with its saved options")
    base = dict(ckpt["config"] if ckpt is not None else saved["train"])
    if data_dir is not None:  # the dataset moved: _check_same_data checks it is the same
        base["data_dir"] = str(Path(data_dir).resolve())
    try:
        resumed = TrainConfig.from_dict(base)
        resumed.check()
    except (TypeError, UserError) as e:
        raise UserError(f"{run_dir / CONFIG} holds options this fastattrec cannot use "
                        f"({str(e).rstrip('.')}); start the run again with --force.") from None
    if cfg is not None:  # only the epoch count and the device may change on resume
        resumed.epochs, resumed.device = cfg.epochs, cfg.device
    return resumed, ckpt, saved


def _check_same_data(run_dir: Path, data_dir: Path, meta: dict, saved: dict,
                     ckpt: dict | None) -> str:
    """The dataset's fingerprint; on resume it must be the one the run started on."""
    fp = fingerprint(meta)
    recorded = (ckpt or {}).get("data_fingerprint") or saved.get("data", {}).get("fingerprint")
    if saved and recorded and recorded != fp:
        raise UserError(f"{data_dir} is not the dataset {run_dir} started on (it was prepared "
                        f"again or from other input: fingerprint {fp[:12]} vs {recorded[:12]}); "
                        f"restore that dataset, or start a new run.")
    return fp


@contextlib.contextmanager
def _claim_run(run_dir: Path, data_dir: Path | None, resume: bool, force: bool,
               log: Callable[[str], None]):
    """Lock the run folder (one command at a time), tidy what a killed run left, and check
    that a new run may write there: empty, or with --force a fastattrec run folder."""
    if resume:
        with claim_output(run_dir, force=False, made_by_us=is_run_folder, what="run folder",
                          option="--resume", log=log, allow_existing=True):
            yield
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file; give a folder for the run with -o.")
    with claim_output(run_dir, force=force, made_by_us=is_run_folder, what="run folder",
                      inputs=[data_dir], log=log, allow_existing=not force):
        if run_dir.is_dir() and any(run_dir.iterdir()) and not force:
            hint = " or --resume it" if is_run_folder(run_dir) else ""
            raise UserError(f"{run_dir} already exists and is not empty; choose another -o, "
                            f"pass --force to replace the run{hint}.")
        yield


def _build(cfg: TrainConfig, data: DeviceData, device: torch.device, backend: str,
           use_graph: bool) -> tuple[AttRec, AttRecConfig, KerasAdam, dict[str, torch.Generator]]:
    """The model, its optimiser and the run's random generators, from the seed."""
    mcfg = AttRecConfig(n_users=data.n_users, n_items=data.n_items, dim=cfg.dim,
                        maxlen=cfg.maxlen, mode=cfg.mode, w=cfg.w, gamma=cfg.gamma,
                        embed_reg=cfg.embed_reg, kernel=backend, precision=cfg.precision)
    model = AttRec(mcfg, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    if cfg.compile and device.type == "cuda":
        model.compile_loss()
    opt = make_optimizer(model, cfg, device, capturable=use_graph)
    gens = {"shuffle": torch.Generator(device=device).manual_seed(cfg.seed + 1),
            "negatives": torch.Generator(device=device).manual_seed(cfg.seed + 2)}
    return model, mcfg, opt, gens


def _restore(ckpt: dict | None, model: AttRec, opt: KerasAdam,
             gens: dict[str, torch.Generator]) -> RunState:
    """Resume: weights, optimiser state and generator states from the checkpoint."""
    if ckpt is None:
        return RunState(history=[], best={"metric": -math.inf, "epoch": 0}, stale=0, epoch=0)
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        for name, g in gens.items():
            g.set_state(ckpt["rng"][name])
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:160]
        raise UserError(f"the checkpoint does not fit this run's model ({first}); start the "
                        f"run again with --force.") from None
    return RunState(ckpt["history"], ckpt["best"], ckpt["stale"], ckpt["epoch"])


def _write_config(run_dir: Path, cfg: TrainConfig, mcfg: AttRecConfig, meta: dict,
                  fp: str) -> None:
    atomic_write_json(run_dir / CONFIG, {
        "kind": RUN_KIND, "run_format_version": RUN_FORMAT_VERSION,
        "train": asdict(cfg), "model": mcfg.to_dict(), "fastattrec_version": __version__,
        "data": {"path": cfg.data_dir, "fingerprint": fp,
                 "source_sha256": meta["source"].get("sha256"), "counts": meta["counts"]},
    })


def _progress_bar(runner: EpochRunner, cfg: TrainConfig, epoch: int, t1: float):
    """A tqdm bar over the epoch's steps and its tick function (loss read once a second)."""
    from tqdm import tqdm

    bar = tqdm(total=runner.n_steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="step",
               leave=False, dynamic_ncols=True)
    last = [time.perf_counter()]

    def tick(i: int) -> None:
        bar.update(1)
        now = time.perf_counter()
        if now - last[0] > 1.0:  # reading the loss syncs: at most once a second
            done = min((i + 1) * cfg.batch_size, runner.n_train)
            bar.set_postfix(loss=f"{runner.loss_sum.item() / max(done, 1):.4f}",
                            samples_s=f"{done / (now - t1):,.0f}")
            last[0] = now

    return bar, tick


def _fit_epoch(runner: EpochRunner, cfg: TrainConfig, data: DeviceData, epoch: int,
               gens: dict[str, torch.Generator], show: bool, distributed: Any
               ) -> tuple[float, float]:
    """One epoch of training steps: (mean train loss, seconds)."""
    device = data.device
    t1 = time.perf_counter()
    if cfg.negatives == "resample":
        runner.set_negatives(data.sample_negatives(gens["negatives"]))
    runner.perm.copy_(torch.randperm(runner.n_train, generator=gens["shuffle"], device=device))
    bar, tick = _progress_bar(runner, cfg, epoch, t1) if show else (None, None)
    loss_sum = runner.run(tick)
    if distributed:
        loss_sum = distributed.all_sum(loss_sum)
    train_loss = float(loss_sum) / runner.n_train  # the one sync of the epoch
    if device.type == "cuda":
        torch.cuda.synchronize()
    if bar is not None:
        bar.close()
    return train_loss, time.perf_counter() - t1


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


def _evaluate_epoch(model: AttRec, data: DeviceData, cfg: TrainConfig, epoch: int,
                    distributed: Any) -> tuple[dict[str, Any], float]:
    """Validation loss and full-ranking NDCG every epoch; test metrics every eval_every
    epochs and after the last. Returns the log row's evaluation part and the reg. term."""
    with torch.no_grad():
        reg = float(model.reg_loss())
    ranker = ModelRanker(model)
    val_loss = validation_loss(model, data, cfg.maxlen, dist=distributed) + reg
    val_ranks = full_ranks_of(ranker, data, data.val_rows, cfg.maxlen, distributed)
    row: dict[str, Any] = {
        "val_loss": val_loss,
        "val_metric": metrics_from_ranks(val_ranks, (cfg.k,))[f"NDCG@{cfg.k}"],
        "val_name": f"NDCG@{cfg.k}(full)",
    }
    if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
        ks = sorted(set(DEFAULT_KS) | {cfg.k})
        row["test"] = evaluate(ranker, data, cfg.maxlen, "both", ks, cfg.ndcg_log,
                               dist=distributed)
    return row, reg


def _epoch_line(row: dict[str, Any], cfg: TrainConfig, n_train: int) -> str:
    line = (f"epoch {row['epoch']:3d}/{cfg.epochs}  loss {row['train_loss']:.4f} (+reg "
            f"{row['reg_loss']:.4f})  val loss {row['val_loss']:.4f}  val {row['val_name']} "
            f"{row['val_metric']:.4f}  fit {row['fit_time']:.2f}s "
            f"({n_train / row['fit_time']:,.0f} samples/s)")
    if "test" in row:
        s, k = row["test"]["sampled"], cfg.k
        line += (f"  test HR@{k} {s[f'HR@{k}']:.4f} NDCG@{k} {s[f'NDCG@{k}']:.4f} "
                 f"MRR {s['MRR']:.4f}")
    return line


def _commit(writer: CheckpointWriter, run_dir: Path, state: RunState, improved: bool,
            model: AttRec, opt: KerasAdam, gens: dict[str, torch.Generator],
            cfg: TrainConfig, mcfg: AttRecConfig, fp: str) -> None:
    """Queue the epoch's checkpoint (and best.pt), then the logs written from it."""
    ckpt = {
        "epoch": state.epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "rng": {name: g.get_state() for name, g in gens.items()},
        "history": state.history, "best": state.best, "stale": state.stale,
        "config": asdict(cfg), "model_config": mcfg.to_dict(),
        "fastattrec_version": __version__, "data_fingerprint": fp,
    }
    files = [(run_dir / CHECKPOINT, ckpt)]
    if improved:
        files.insert(0, (run_dir / BEST, {
            "epoch": state.epoch, "model": ckpt["model"], "model_config": ckpt["model_config"],
            "config": ckpt["config"], "data_fingerprint": fp}))
    writer.submit(files, state.history)


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
    claim = (_claim_run(run_dir, None if resume else Path(data_dir), resume, force, log)
             if main_proc else contextlib.nullcontext())
    with claim:
        cfg, ckpt, saved = _open_run(data_dir, run_dir, cfg, resume, log)
        cfg.check()
        cfg.threads = set_threads(cfg.threads)  # saved in config.json: --resume reuses it
        return _train_in(run_dir, Path(cfg.data_dir), cfg, ckpt, saved, log, progress,
                         distributed, replace=main_proc and force and not resume)


def _train_in(run_dir: Path, data_dir: Path, cfg: TrainConfig, ckpt: dict | None,
              saved: dict, log: Callable[[str], None], progress: bool,
              distributed: Any, replace: bool) -> TrainResult:
    """The run itself, with the folder claimed (see `train`). `replace`: remove the old
    run's files (--force), once the data and options have been checked."""
    main_proc = distributed is None or distributed.rank == 0
    meta = read_meta(data_dir)
    fp = _check_same_data(run_dir, data_dir, meta, saved, ckpt)
    device = distributed.device if distributed else pick_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    rank, world = (distributed.rank, distributed.world) if distributed else (0, 1)
    try:
        backend = resolve_backend(cfg.kernel, device)
    except RuntimeError as e:
        raise UserError(f"--kernel {cfg.kernel}: {e}.") from None
    check_memory(cfg, meta, device, world)
    data = DeviceData.from_prepared(load_prepared(data_dir), device)
    if data.train_rows.shape[0] == 0:
        raise UserError(f"{data_dir} has no train samples (every user has fewer than 4 "
                        f"items); use a larger log.")
    use_graph = cfg.compile and device.type == "cuda" and distributed is None
    model, mcfg, opt, gens = _build(cfg, data, device, backend, use_graph)
    state = _restore(ckpt, model, opt, gens)
    if replace:
        for p in clear_run(run_dir):
            log(f"removed {p} of the run being replaced")
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(run_dir, cfg, mcfg, meta, fp)
        write_logs(run_dir, state.history)  # drop log lines of an epoch never committed
    if ckpt is not None:
        log(f"resuming {run_dir} after epoch {state.epoch} of {cfg.epochs}")
    forward = distributed.wrap(model) if distributed else None
    runner = EpochRunner(model, opt, data, cfg, forward=forward, shard=(rank, world))
    log(f"device {device}; short-term attention: {_kernel_note(backend, cfg)}; step: "
        f"{_step_note(runner, use_graph)}; {data.train_rows.shape[0]:,} train samples, "
        f"batch {cfg.batch_size}" + (f", {world} processes" if world > 1 else "")
        + (f", {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""))
    if use_graph:
        runner.capture()
    stopped_early = cfg.early_stop > 0 and state.stale >= cfg.early_stop
    if stopped_early:  # the run had already stopped early: resuming changes nothing
        log(f"{run_dir} stopped early after epoch {state.epoch} (no better validation "
            f"{state.history[-1]['val_name']} for {state.stale} epochs); nothing to resume")
    writer = CheckpointWriter(run_dir)
    try:
        for epoch in range(state.epoch + 1, 0 if stopped_early else cfg.epochs + 1):
            row, improved = _run_epoch(runner, model, data, cfg, epoch, gens, state, backend,
                                       progress and main_proc, distributed)
            if main_proc:
                _commit(writer, run_dir, state, improved, model, opt, gens, cfg, mcfg, fp)
            log(_epoch_line(row, cfg, runner.n_train))
            if cfg.early_stop > 0 and state.stale >= cfg.early_stop:
                log(f"early stop: validation {row['val_name']} has not improved for "
                    f"{state.stale} epochs; best epoch {state.best['epoch']} is kept in best.pt")
                stopped_early = True
                break
    finally:
        writer.wait()
    if main_proc and state.history:
        plot_curves(run_dir, state.history)
    return TrainResult(run_dir, state.history, backend, str(device), stopped_early)


def _run_epoch(runner: EpochRunner, model: AttRec, data: DeviceData, cfg: TrainConfig,
               epoch: int, gens: dict[str, torch.Generator], state: RunState, backend: str,
               show: bool, distributed: Any) -> tuple[dict[str, Any], bool]:
    """Fit one epoch, stop if it diverged, evaluate, and record it in `state`: the log row
    and whether the validation metric improved."""
    train_loss, fit_time = _fit_epoch(runner, cfg, data, epoch, gens, show, distributed)
    _check_finite(model, cfg, epoch, train_loss=train_loss)
    t2 = time.perf_counter()
    evals, reg = _evaluate_epoch(model, data, cfg, epoch, distributed)
    _check_finite(model, cfg, epoch, validation_loss=evals["val_loss"])
    row: dict[str, Any] = {
        "epoch": epoch, "train_loss": train_loss, "reg_loss": reg,
        "train_loss_total": train_loss + reg, "fit_time": fit_time,
        "samples_per_s": runner.n_train / fit_time, "k": cfg.k, "kernel": backend,
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


def _kernel_note(backend: str, cfg: TrainConfig) -> str:
    return {"triton": f"triton fused kernel, {cfg.precision} dots",
            "structured": "structured (torch ops, hand-written backward)",
            "torch": "torch reference"}[backend]


def _step_note(runner: EpochRunner, use_graph: bool) -> str:
    if runner.batches is None:
        body = "compiled loss"
    elif runner.fused():
        body = "one-scatter step, fused (Triton kernels, no autograd)"
    else:
        body = "one-scatter step (autograd, one gather and one scatter)"
    if use_graph:
        k = runner.replays[0] if runner.replays else 1
        return f"CUDA graph{f' of {k} steps' if k > 1 else ''}, {body}"
    ignored = (f" (--graph-steps {runner.cfg.graph_steps} ignored: it applies to CUDA with "
               f"--compile, one process)" if runner.cfg.graph_steps > 1 else "")
    if runner.manual is not None:
        return ("hand-written, compiled by torch.compile" if runner.cfg.compile
                else "hand-written") + ignored
    return ("autograd" if runner.batches is None else body) + ignored


def check_memory(cfg: TrainConfig, meta: dict, device: torch.device, world: int = 1) -> None:
    """Refuse options whose arrays cannot fit, with an estimate, before allocating them
    (an impossible --maxlen would otherwise be killed by the system, unexplained).
    `world`: processes sharing the run (the one-scatter plans exist with one only)."""
    c = meta["counts"]
    n, t = int(c["interactions"]), int(c.get("train_samples", c["interactions"]))
    rows = int(c["users"]) + 1 + 2 * int(c["item_rows"])
    parts = {
        "the training windows (train samples x --maxlen)": 12 * t * cfg.maxlen,
        "the embedding tables with their gradients and Adam moments": 16 * rows * cfg.dim,
        "one batch's activations (--batch-size x --maxlen x --dim)":
            40 * cfg.batch_size * cfg.maxlen * cfg.dim,
        "the prepared sequences": 48 * n,
        "validation windows": 4 * min(65536, n) * cfg.maxlen * cfg.dim * 4,
    }
    manual_cpu = device.type == "cpu" and cfg.kernel in ("auto", "structured")
    if cfg.one_scatter and world == 1 and not manual_cpu:  # where EpochBatches is built
        parts["the epoch's batches and scatter plans (one_scatter)"] = plan_bytes(
            t, cfg.batch_size, cfg.maxlen)
    need = sum(parts.values())
    have = available_memory(device)
    if have is not None and need > 0.9 * have:
        worst = max(parts, key=parts.get)
        raise UserError(f"these options need about {need / 2**30:,.1f} GiB of {device.type} "
                        f"memory, mostly for {worst}, but about {have / 2**30:,.1f} GiB is "
                        f"available; lower --maxlen (now {cfg.maxlen}), --batch-size "
                        f"(now {cfg.batch_size}) or --dim (now {cfg.dim}).")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on `device` (None when it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


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


def set_threads(n: int) -> int:
    """Use `n` CPU threads for torch; 0 picks `free_cores()`. Returns the number used."""
    n = n or free_cores()
    torch.set_num_threads(n)
    return n


def free_cores() -> int:
    """Cores this process may use that are not busy with other work right now.

    On a shared machine a thread pool as wide as the machine loses badly when another
    process holds a core: every parallel region waits for the thread that is not
    scheduled (measured on 2 cores beside one busy process: 2 threads 3-5x slower than
    idle, 1 thread about 1.5x). The count of other runnable threads is read from
    /proc/loadavg (the minimum of a few samples, so a passing blip does not count)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    samples = []
    for _ in range(5):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return cores
        samples.append(max(0, running - 1))  # minus the thread reading it
        time.sleep(0.01)
    return max(1, cores - min(samples))
