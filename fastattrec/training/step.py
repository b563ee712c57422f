"""One training step: the batches of an epoch, the Step protocol and its two general forms.

Data goes to the device once (`Samples`); each step gathers its rows on the device from
the per-sample arrays (no DataLoader, no per-sample Python, no host<->device copy per
step). A step reads only device tensors (its counter, the epoch's permutation, the
negatives), so on CUDA it is captured once as a CUDA graph and replayed
(`CudaGraphStep`); the last, partial batch is padded and masked, which keeps its loss
exact. The steps:

- `AutogradStep`: the model's loss, autograd, Adam; under torchrun the model is its
  DistributedDataParallel wrapper.
- `CudaGraphStep`: any capturable step recorded as one CUDA graph.
- `fastattrec.training.cpu_step.CpuStep`: the hand-written CPU step (the default on CPU).

The whole-table L2 term is applied through Adam's (L2, not decoupled) weight decay on
the three tables: weight_decay = 2*lambda adds exactly the gradient of lambda * ||T||^2
to each table's gradient, inside the optimiser kernel that already touches every row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch

from fastattrec.batches import DeviceData
from fastattrec.errors import first_error_line
from fastattrec.model import AttRec, mean_reduced


class Batch(NamedTuple):
    """One step's samples: `idx` (B,) rows of the per-sample arrays, `valid` (B,) 1.0 for
    real samples and 0.0 for the padding of a partial last batch, `count` (0-d) the real
    samples in the whole (global) batch, `step` the step's number (0-d tensor or int)."""

    idx: torch.Tensor
    valid: torch.Tensor
    count: torch.Tensor
    step: torch.Tensor | int = 0


class Samples:
    """The train samples on the device, cut into fixed-shape batches in the epoch's order.

    Per-sample arrays, cut once: windows (T, L), users (T,), targets (T,) and this epoch's
    negatives (T,), or (T, N) with N negatives per positive, int32 to halve what each step
    gathers; with `shared` negatives, N per step instead, the same for every sample of the
    batch. Under torchrun, a global batch of `batch_size` is split into `world` equal
    shards and rank r takes shard r."""

    def __init__(self, data: DeviceData, maxlen: int, batch_size: int,
                 shard: tuple[int, int] = (0, 1), n_negatives: int = 1,
                 shared: bool = False) -> None:
        self.data = data
        dev = data.device
        self.rank, self.world = shard
        self.n_train = int(data.train_rows.shape[0])
        self.global_bs = batch_size
        self.local_bs = math.ceil(batch_size / self.world)
        self.n_steps = math.ceil(self.n_train / batch_size)
        self.windows, self.users, self.targets = data.train_arrays(maxlen)
        self.negs = data.negs[data.train_rows].to(torch.int32)  # (T,)
        if n_negatives > 1 and not shared:  # (T, N), drawn again before every epoch
            self.negs = self.negs[:, None].repeat(1, n_negatives)
        # (steps, N) shared negatives of every step of the epoch, or None
        self.shared = (torch.zeros((max(self.n_steps, 1), n_negatives), dtype=torch.int32,
                                   device=dev) if shared else None)
        self.perm = torch.zeros(max(self.n_train, 1), dtype=torch.long, device=dev)
        self.slot = torch.arange(self.local_bs, device=dev) + self.rank * self.local_bs
        self._full: tuple[torch.Tensor, torch.Tensor] | None = None

    def shuffle(self, gen: torch.Generator) -> None:
        """The epoch's order of the train samples, from the run's shuffle generator."""
        self.perm.copy_(torch.randperm(self.n_train, generator=gen, device=self.perm.device))

    def set_negatives(self, negs: torch.Tensor) -> None:
        """Use `negs` (rows,) or (rows, N), per flat row, from now on (in place: graphs see
        it)."""
        self.negs.copy_(negs[self.data.train_rows].reshape(self.negs.shape))

    def set_train_negatives(self, negs: torch.Tensor) -> None:
        """Use `negs` (T, N), per train sample, from now on (in place)."""
        self.negs.copy_(negs)

    def set_shared(self, negs: torch.Tensor) -> None:
        """Use `negs` (steps, N) as the epoch's shared negatives (in place)."""
        self.shared.copy_(negs)

    def batch(self, step: torch.Tensor) -> Batch:
        """The batch of device counter `step` (0-d long): no host sync, capturable."""
        lo = step * self.global_bs
        hi = torch.clamp(lo + self.global_bs, max=self.n_train)
        pos = lo + self.slot  # (b,) positions in the permutation
        idx = self.perm[pos.clamp(max=self.n_train - 1)]  # (b,) train sample indices
        return Batch(idx, (pos < hi).to(torch.float32), (hi - lo).to(torch.float32), step)

    def batch_at(self, i: int) -> Batch:
        """The same batch as `batch` for a Python step number (one process): full batches
        are slices of the permutation, with no padding arithmetic."""
        lo = i * self.global_bs
        hi = min(lo + self.global_bs, self.n_train)
        if hi - lo == self.global_bs and self.world == 1:
            if self._full is None:
                self._full = (torch.ones(hi - lo, device=self.perm.device),
                              torch.tensor(float(hi - lo), device=self.perm.device))
            return Batch(self.perm[lo:hi], *self._full, i)
        pos = lo + self.slot
        return Batch(self.perm[pos.clamp(max=self.n_train - 1)], (pos < hi).to(torch.float32),
                     torch.tensor(float(hi - lo), device=self.perm.device), i)

    def arrays(self, b: Batch) -> tuple[torch.Tensor, ...]:
        """The model's inputs for batch `b`: users, windows, positives, negatives ((B,) or
        (B, N) per sample, or (N,) shared by the batch), valid, count."""
        i = b.idx
        negs = self.negs[i] if self.shared is None else self.shared[b.step]  # (N,) shared
        return (self.users[i], self.windows[i], self.targets[i], negs, b.valid, b.count)


class Step(Protocol):
    """What the epoch loop drives. `__call__(i)` runs step i of the epoch (parameters and
    optimiser updated, the batch's summed sample loss added to `loss_sum`); `start_epoch`
    comes before step 0 of every epoch; `describe` is the run-start note."""

    samples: Samples
    loss_sum: torch.Tensor  # 0-d float64 on the device: the epoch's summed sample losses

    def start_epoch(self) -> None: ...

    def __call__(self, i: int) -> None: ...

    def describe(self) -> str: ...


def run_epoch(step: Step, progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """All steps of one epoch; returns the device tensor of summed sample losses."""
    step.start_epoch()
    for i in range(step.samples.n_steps):
        step(i)
        if progress is not None:
            progress(i)
    return step.loss_sum


class AutogradStep:
    """The model's batch loss, its gradient by autograd, one optimiser step.

    `forward`: the module to call, the model or its DistributedDataParallel wrapper, which
    averages gradients over the `world` processes. Each process's loss is its share of
    the global batch (inner: divided by the global count); scaled by `world`, the average
    is exactly the single-process gradient."""

    def __init__(self, model: AttRec, opt: torch.optim.Optimizer, samples: Samples,
                 forward: torch.nn.Module | None = None) -> None:
        self.model, self.opt, self.samples = model, opt, samples
        self.forward = forward if forward is not None else model
        self.loss_scale = float(samples.world)
        dev = samples.perm.device
        self.counter = torch.zeros((), dtype=torch.long, device=dev)  # the step's number
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=dev)

    def start_epoch(self) -> None:
        self.counter.zero_()
        self.loss_sum.zero_()

    def __call__(self, i: int) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss, count = self.loss_and_grads()
        self.opt.step()
        self.count(loss, count)

    def loss_and_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of the device counter: its loss (0-d), real sample count, and the
        parameters' gradients."""
        b = self.samples.batch(self.counter)
        loss = self.forward(*self.samples.arrays(b))
        (loss * self.loss_scale).backward()
        return loss, b.count

    def count(self, loss: torch.Tensor, count: torch.Tensor) -> None:
        """The step's bookkeeping: its summed sample losses, the counter + 1."""
        add_batch_loss(self.loss_sum, loss, count, self.model)
        self.counter += 1

    def describe(self) -> str:
        loss = "compiled loss" if self.model.loss_is_compiled() else "eager loss"
        return f"autograd, {loss}" + (f", {self.samples.world} processes"
                                      if self.samples.world > 1 else "")


def add_batch_loss(loss_sum: torch.Tensor, loss: torch.Tensor, count: torch.Tensor,
                   model: AttRec) -> None:
    """Add a batch's summed sample losses to `loss_sum` (float64): its loss times its
    sample count where the loss is a mean, the loss itself where it is a sum."""
    mean = mean_reduced(model.cfg.objective, model.cfg.mode)
    loss_sum += (loss.detach() * (count if mean else 1.0)).to(torch.float64)


class Snapshot:
    """A copy of the weights and the optimiser state, to put back after warm-up steps."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        self.model, self.opt = model, opt
        self.params = [p.detach().clone() for p in model.parameters()]
        self.state = {p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for p, v in zip(self.model.parameters(), self.params, strict=True):
            p.copy_(v)
        for p, st in self.opt.state.items():  # state created since: back to zero
            for k, v in st.items():
                v.copy_(self.state[p][k]) if p in self.state else v.zero_()


class CudaGraphStep:
    """A capturable step recorded once as a CUDA graph and replayed for every step.

    `capture` warms the step up twice on a side stream (allocations, autotuning, Adam's
    state), falls back to the eager loss if torch.compile of the loss fails there, puts
    weights and optimiser back (`Snapshot`), then records one step. The step reads its
    batch from the device counter, so each replay takes the next batch."""

    def __init__(self, inner: AutogradStep) -> None:
        self.inner = inner
        self.samples = inner.samples
        self.loss_sum = inner.loss_sum
        self.graph: torch.cuda.CUDAGraph | None = None

    def warm_up(self) -> None:
        """Two eager steps at step 0 on a side stream (an epoch may have one step only),
        then weights and optimiser put back."""
        inner = self.inner
        snap = Snapshot(inner.model, inner.opt)
        inner.start_epoch()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                inner.counter.zero_()
                try:
                    inner(0)
                except Exception as e:  # noqa: BLE001 - fall back rather than fail a run
                    if not inner.model.loss_is_compiled():
                        raise
                    warnings.warn(f"torch.compile of the loss failed "
                                  f"({first_error_line(e)}); using the eager "
                                  f"loss inside the CUDA graph", stacklevel=1)
                    inner.model.uncompile_loss()
                    inner.counter.zero_()
                    inner(0)
        torch.cuda.current_stream().wait_stream(side)
        inner.start_epoch()
        snap.restore()

    def capture(self) -> None:
        """Warm up, then record one step as the graph."""
        self.warm_up()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.inner(0)
        torch.cuda.synchronize()

    def start_epoch(self) -> None:
        self.inner.start_epoch()

    def __call__(self, i: int) -> None:
        self.graph.replay()

    def describe(self) -> str:
        return f"CUDA graph of one step, {self.inner.describe()}"
