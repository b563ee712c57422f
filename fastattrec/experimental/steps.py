"""The experimental training steps (see the package docstring), as Step forms.

- `OneScatterStep`: every table row the batch looks up gathered by one kernel into one
  autograd leaf, autograd stops there, and one deterministic scatter adds the leaf's
  gradient into the tables' gradient buffer (`EpochBatches` plans the epoch at its start).
- `FusedStep`: the same step as eight Triton launches with the chain rule written out,
  no autograd (CUDA, the Triton tile layout).
- `MultiGraphStep`: `graph_steps` steps recorded in one CUDA graph, so the host launches
  once per N steps.

Each is checked against the default autograd step in tests/test_train.py (and on a GPU by
tests/test_train_cuda.py).
"""

from __future__ import annotations

from typing import Any

import torch

from fastattrec.config import TrainConfig
from fastattrec.errors import UserError
from fastattrec.experimental.adam import TritonKerasAdam
from fastattrec.experimental.epoch_batches import EpochBatches, lookups, plan_bytes
from fastattrec.kernels import triton_available
from fastattrec.model import AttRec
from fastattrec.optim import make_optimizer
from fastattrec.training.cpu_step import CpuStep
from fastattrec.training.step import AutogradStep, CudaGraphStep, Samples, Step


def build_experimental(cfg: TrainConfig, model: AttRec, samples: Samples,
                       device: torch.device, use_graph: bool, distributed: Any
                       ) -> tuple[TritonKerasAdam, Step]:
    """The optimiser and step of a run with experimental options (`build`'s branch)."""
    if cfg.one_scatter and not cfg.default_step():
        raise UserError("one_scatter computes the notebook's pair loss with one negative "
                        "and no dropout only; drop one_scatter or those options.")
    opt = make_optimizer(model, cfg, device, capturable=use_graph, cls=TritonKerasAdam,
                         zero_grads_after=cfg.one_scatter)
    hand = (device.type == "cpu" and distributed is None and model.cfg.kernel == "structured"
            and cfg.hand_written_step())
    if hand:  # the CPU default ignores one_scatter and graph_steps
        return opt, CpuStep(model, opt, samples, compile=cfg.compile)
    forward = distributed.wrap(model) if distributed else None
    if cfg.one_scatter and distributed is None:
        cls = FusedStep if fused_applies(model, device) else OneScatterStep
        step: AutogradStep = cls(model, opt, samples)
    else:
        step = AutogradStep(model, opt, samples, forward)
    if not use_graph:
        return opt, step
    graph = MultiGraphStep(step, cfg.graph_steps) if cfg.graph_steps > 1 else CudaGraphStep(step)
    graph.capture()
    return opt, graph


def extra_bytes(cfg: TrainConfig, meta: dict, distributed: Any) -> dict[str, int]:
    """The one-scatter step's epoch plans, by name, for the memory check."""
    if not cfg.one_scatter or distributed is not None:
        return {}
    c = meta["counts"]
    t = int(c.get("train_samples", c["interactions"]))
    return {"the epoch's batches and scatter plans (one_scatter)":
            plan_bytes(t, cfg.batch_size, cfg.maxlen)}


def fused_applies(model: AttRec, device: torch.device) -> bool:
    """Whether the one-scatter step runs as the fused chain: Triton on CUDA, the Triton
    tile layout for this --maxlen, rows that fit the loss kernel."""
    from fastattrec.kernels.attention import layout_for
    from fastattrec.kernels.experimental.pair_loss import MAX_DIM

    cfg = model.cfg
    return (device.type == "cuda" and triton_available() and cfg.kernel == "triton"
            and layout_for(cfg.maxlen) == "tiles" and cfg.dim <= MAX_DIM)


class OneScatterStep(AutogradStep):
    """One gather for every table row and one scatter for every table gradient, from the
    epoch's batches cut and planned at its start; the gradients land in one buffer whose
    row blocks are the tables' .grad. Same maths as the autograd step."""

    def __init__(self, model: AttRec, opt: TritonKerasAdam, samples: Samples) -> None:
        super().__init__(model, opt, samples)
        tables = model.tables()
        dev = samples.perm.device
        self.flat_grad = torch.zeros(sum(t.shape[0] for t in tables), model.cfg.dim,
                                     device=dev, dtype=tables[0].dtype)
        self.grad_views = list(self.flat_grad.split([t.shape[0] for t in tables]))
        self.batches = EpochBatches(samples.n_train, samples.global_bs, model.cfg.maxlen,
                                    tables[0].shape[0], tables[1].shape[0], dev)
        # the small kernels' backend: Triton on CUDA; on the CPU their torch forms (same
        # bits; the tests also run the kernels interpreted)
        self.rows_backend = "auto" if dev.type == "cuda" and triton_available() else "torch"
        # the capturable Adam zeroes the gradients it reads, else the step zeroes them
        self.opt_zeroes_grads = opt.zeroes_grads()

    def start_epoch(self) -> None:
        super().start_epoch()
        s = self.samples
        self.batches.fill(s.perm[:s.n_train], s.users, s.windows, s.targets, s.negs)

    def count(self, loss: torch.Tensor, count: torch.Tensor) -> None:
        """The bookkeeping as one launch where the small kernels are Triton's."""
        if self.rows_backend == "torch":
            return super().count(loss, count)
        from fastattrec.kernels.experimental.step_tail import step_tail_

        step_tail_(loss, count, self.loss_sum, self.counter, self.model.cfg.mode == "inner")
        return None

    def loss_and_grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's loss and count; its table gradients from one scatter. Both kernels
        read the step's row of the epoch's index and plan with the device counter, so
        nothing is read back: the step can be captured in a CUDA graph."""
        from fastattrec.kernels.experimental.embedding_gather import gather_rows_
        from fastattrec.kernels.experimental.embedding_scatter import scatter_rows_

        m, nb = self.model, self.batches
        b, length, d = nb.batch, nb.maxlen, m.cfg.dim
        rows = torch.empty((nb.n_lookups, d), device=self.flat_grad.device,
                           dtype=self.flat_grad.dtype)  # (N, d)
        flags = torch.empty(nb.n_lookups, dtype=torch.bool, device=rows.device)  # (N,)
        gather_rows_(rows, [t.detach() for t in m.tables()], nb.index, step=self.counter,
                     backend=self.rows_backend, flags=flags, flag_row=nb.padding_row)
        rows.requires_grad_(True)
        valid, count = nb.step_aux(self.counter)  # (B,), 0-d
        u, x, e, e2 = rows.split(lookups(b, length))
        loss = m.loss_of_rows(u, x.view(b, length, d), nb.window_mask(flags),
                              e.view(b, 2, d), e2.view(b, 2, d), valid, count)
        loss.backward()  # into rows.grad and proj.grad
        if not self.opt_zeroes_grads:  # else the last step's Adam left them zero
            self.flat_grad.zero_()
        scatter_rows_(self.flat_grad, rows.grad, nb.plan, accumulate=False,
                      step=self.counter, backend=self.rows_backend)
        self._set_table_grads()
        return loss, count

    def _set_table_grads(self) -> None:
        for t, view in zip(self.model.tables(), self.grad_views, strict=True):
            t.grad = view

    def describe(self) -> str:
        return "one-scatter step (autograd, one gather and one scatter)"


class FusedStep(OneScatterStep):
    """The one-scatter step as eight Triton launches, no autograd: (1) gather the rows,
    flag the key mask, compute P W -> (2) attention forward -> (3) the pairwise loss and
    the gradients of users and candidates, straight into the step's gradient rows -> (4)
    attention backward, dX into the window rows -> (5) dW -> (6) the scatter into the
    tables' gradient buffer -> (7) Adam -> (8) the bookkeeping (loss sum, step counter,
    Adam's step counters). Each kernel reads the step from the device counter."""

    def __call__(self, i: int) -> None:
        from fastattrec.kernels.attention_tiles import tile_backward, tile_forward
        from fastattrec.kernels.experimental.embedding_scatter import scatter_rows_
        from fastattrec.kernels.experimental.pair_loss import pair_loss_, programs
        from fastattrec.kernels.experimental.step_prologue import step_prologue_
        from fastattrec.kernels.experimental.step_tail import MAX_COUNTERS, step_tail_parts_

        m, nb, cfg = self.model, self.batches, self.model.cfg
        b, length, d = nb.batch, nb.maxlen, cfg.dim
        dev = self.flat_grad.device
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            rows = torch.empty((nb.n_lookups, d), device=dev)  # (N, d)
            flags = torch.empty(nb.n_lookups, dtype=torch.bool, device=dev)
            w, pos = m.proj.detach(), m.pos_enc
            pw = step_prologue_(rows, [t.detach() for t in m.tables()], nb.index,
                                self.counter, flags, nb.padding_row, pos, w)  # and P W
            win = slice(b, b + b * length)
            x = rows[win].view(b, length, d)
            mask8 = nb.window_mask(flags).view(torch.uint8)  # (B, L)
            short = tile_forward(x, mask8, w, pos, cfg.precision, pw)  # (B, d)
            grad_rows = torch.empty_like(rows)
            dshort = torch.empty_like(short)
            parts = torch.empty(programs(b), device=dev)
            pair_loss_(rows, short, nb.aux, self.counter, grad_rows, dshort, parts, length,
                       cfg.mode, cfg.w, cfg.gamma)
            _, m.proj.grad = tile_backward(dshort, x, mask8, w, pos, cfg.precision, pw,
                                           dx=grad_rows[win].view(b, length, d))
            if not self.opt_zeroes_grads:
                self.flat_grad.zero_()
            scatter_rows_(self.flat_grad, grad_rows, nb.plan, accumulate=False,
                          step=self.counter, backend="triton")
        self._set_table_grads()
        # the capturable Adam's own kernel: its step counters are counted by the
        # bookkeeping launch, which runs after it anyway
        defer = self.opt_zeroes_grads and len(list(m.parameters())) <= MAX_COUNTERS
        if defer:
            self.opt.device_step(count_steps=False)
        else:
            self.opt.step()
        step_tail_parts_(parts, self.loss_sum, self.counter,
                         self.opt.step_counters() if defer else None)

    def describe(self) -> str:
        return "one-scatter step, fused (Triton kernels, no autograd)"


def replay_sizes(n_steps: int, per_graph: int) -> list[int]:
    """The steps of each CUDA-graph replay in an epoch of `n_steps`: replays of
    `per_graph` steps, then one replay of the rest (two graphs at most)."""
    k = max(1, min(per_graph, n_steps))
    full, rest = divmod(n_steps, k)
    return [k] * full + ([rest] if rest else [])


class MultiGraphStep(CudaGraphStep):
    """`per_graph` steps recorded in one CUDA graph (and one graph of the epoch's rest);
    step i replays a graph when a replay starts there, else does nothing."""

    def __init__(self, inner: AutogradStep, per_graph: int) -> None:
        super().__init__(inner)
        self.replays = replay_sizes(inner.samples.n_steps, per_graph)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # steps -> graph of that many
        self.starts: dict[int, int] = {}  # step number -> replay size starting there
        done = 0
        for size in self.replays:
            self.starts[done] = size
            done += size

    def capture(self) -> None:
        self.warm_up()
        for size in sorted(set(self.replays), reverse=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(size):
                    self.inner(0)
            self.graphs[size] = graph
        self.graph = self.graphs[self.replays[0]]
        torch.cuda.synchronize()

    def __call__(self, i: int) -> None:
        size = self.starts.get(i)
        if size is not None:
            self.graphs[size].replay()

    def describe(self) -> str:
        return f"CUDA graph of {self.replays[0]} steps, {self.inner.describe()}"
