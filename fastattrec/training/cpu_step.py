"""One training step on the CPU with its gradient written out by hand.

Why: on a CPU the AttRec step is three (B·L, d) x (d, d) matrix products surrounded by
about 150 small operations. Through autograd, those small operations, the graph
bookkeeping and the dense embedding backward (a zero-filled (rows, d) gradient per lookup,
then the sums of those) cost more than the matrix products themselves. Here the
forward keeps only what the backward needs, the backward is the chain rule written out,
and each table's gradient is accumulated with `index_add_` into one buffer that lives as
long as the model and that the optimiser reads: ~40 operations a step, no graph.

Two rearrangements cut the arithmetic, both exact in real numbers (float rounding aside):

- Projection through the table. The window rows are rows of the item table E (V, d), so
  (X + P) W = (E W)[windows] + P W. When the table has fewer rows than the batch has
  window slots (V < B·L: MovieLens-100K has 1,683 rows against 5,120 slots), the three
  products run over E's V rows instead of B·L gathered ones: the forward E W, and in the
  backward, with S (V, d) the window slots' dH summed per item (one `index_add_`),
  dE += S W^T and dW = E^T S + P^T sum_b dH_b. Bigger catalogues use the gathered rows.
- Inside torch.compile, the batched (L, L) products are broadcast sums, which Inductor
  fuses into its loops (`kernels/structured.py`'s `pairwise` and `mix`).

The maths is the model's (docs/spec.md §2.4-2.5): the scores, the objectives' losses and
clipping are model.py's functions, the short-term attention is
`fastattrec.kernels.structured.attend` with its backward; only the objectives' gradients
at the scores (`score_grads`) and the chain rule through the scores are written here. It
computes the objectives pair, bce, gbce and sampled-softmax with N negatives per sample
(`HAND_WRITTEN_OBJECTIVES`), with or without dropout (the masks are the model's
`dropout_rows` masks: their seeds drawn from the same generator in the same order, the
masks computed from them inside the compiled code, so both steps train alike; a dropped
window row is no table row, so dropout projects the gathered rows);
softmax over all items and shared negatives train through autograd. tests/test_cpu_step.py
checks the loss and every gradient against autograd of the plain reference model, for
each objective, in both modes and both projection layouts, with dropout, padding,
repeated items and masked samples.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastattrec.compiled import compile_for_run
from fastattrec.errors import first_error_line
from fastattrec.kernels.structured import attend, attend_backward
from fastattrec.model import (
    AttRec,
    clip_parts,
    dropout_scale,
    dropout_seeds,
    logits_of,
    mean_reduced,
    pair_scores,
    reduce_batch,
    sample_terms,
)
from fastattrec.training.step import Samples, add_batch_loss


def score_grads(s: torch.Tensor, objective: str, mode: str, gamma: float, beta: float,
                valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """d loss / d s (B, K): the gradient of the batch loss (`sample_terms` reduced as
    `reduce_batch`) at the scores s (B, K) [target, K - 1 negatives], written out; tests/
    test_cpu_step.py checks it against autograd of those functions for every objective."""
    if objective == "pair":  # mean of the K - 1 pair losses; inner: mean, dist: sum
        pos, neg = s[:, :1], s[:, 1:]
        if mode == "inner":
            g = torch.sigmoid(neg - pos) * valid[:, None] / count  # d / d s_neg
        else:
            g = -((pos - neg + gamma) > 0).to(s.dtype) * valid[:, None]
        if neg.shape[1] > 1:
            g = g / neg.shape[1]
        return torch.cat([-g.sum(1, keepdim=True), g], dim=1)
    lg = logits_of(s, mode)
    if objective in ("bce", "gbce"):  # beta softplus(-l+) + sum_j softplus(l-_j)
        dl = torch.cat([-beta * torch.sigmoid(-lg[:, :1]), torch.sigmoid(lg[:, 1:])], dim=1)
    elif objective == "sampled-softmax":  # logsumexp(l) - l+
        dl = torch.softmax(lg, dim=1)
        dl = torch.cat([dl[:, :1] - 1, dl[:, 1:]], dim=1)
    else:
        raise ValueError(f"the hand-written step has no objective {objective!r}")
    ds = logits_of(dl, mode)  # d l / d s is +1 (inner) or -1 (dist)
    return ds * (valid / count)[:, None]


def _clip_backward(vc: torch.Tensor, n: torch.Tensor, moves: torch.Tensor,
                   g: torch.Tensor) -> torch.Tensor:
    """Gradient through v -> v / max(1, |v|): identity where |v| < 1, else the projection
    (g - vc <vc, g>) / |v| that removes the radial part."""
    radial = (vc * g).sum(-1, keepdim=True) * moves
    return (g - vc * radial) / n


class ManualStep:
    """Loss and gradients of one batch of AttRec, by hand, into persistent `.grad`s.

    `table` chooses the projection layout (module docstring); None picks it per batch:
    through the table when it has fewer rows than the batch has window slots.

    With `compile`, the arithmetic (`grads`: everything but the scatters into the tables'
    gradients and the backward's two products over the whole item table) is compiled by
    torch.compile (Inductor generates C++ for the CPU), which fuses its operations into a
    few loops. The scatters
    stay `index_add_` (Inductor would make them atomic adds: slower, and their order, so
    the rounding, would change from run to run). If compilation fails (no C++ compiler,
    say), the step says so once and runs eagerly: the same arithmetic, unfused."""

    def __init__(self, model: AttRec, compile: bool = False, table: bool | None = None) -> None:
        self.model = model
        self.table = table
        self._buffers()
        self._eager_grads = self.grads
        self.compiled = compile  # until a compiler failure turns it off
        if compile:
            self.grads = compile_for_run(self.grads, dynamic=False)

    def _buffers(self) -> None:
        for p in self.model.parameters():  # (again, if someone set them to None)
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def uses_table(self, batch: int) -> bool:
        """Whether a batch of `batch` samples projects through the item table."""
        if self.table is not None:
            return self.table
        return self.model.item_emb.shape[0] < batch * self.model.cfg.maxlen

    @torch.no_grad()
    def __call__(self, users: torch.Tensor, windows: torch.Tensor, pos: torch.Tensor,
                 neg: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The batch loss (as AttRec.forward: mean over valid samples for inner, sum for
        dist); the parameters' `.grad` hold its gradient afterwards (L2 excluded: the
        optimiser's weight decay adds it)."""
        return self.gathered(torch.arange(users.shape[0], device=users.device), users,
                             windows, pos, neg, valid, count)

    @torch.no_grad()
    def gathered(self, idx: torch.Tensor, users: torch.Tensor, windows: torch.Tensor,
                 pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor,
                 count: torch.Tensor) -> torch.Tensor:
        """As calling the step with rows `idx` (B,) of the per-sample arrays users (T,),
        windows (T, L), pos (T,) and neg (T,): the gathers run inside the compiled code."""
        self._buffers()
        m = self.model
        table = self.uses_table(idx.shape[0]) and m.cfg.dropout == 0
        drop = self._dropout_seeds()
        args = (m.user_emb, m.item_emb, m.item2_emb, m.proj, m.pos_enc, idx, users, windows,
                pos, neg, valid, count, table, *drop)
        try:
            out = self.grads(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, exactly
            if not self.compiled:  # an eager error is the caller's (a bad index, say)
                raise
            warnings.warn(f"torch.compile of the CPU training step failed "
                          f"({first_error_line(e)}); running it uncompiled",
                          stacklevel=2)
            self.grads, self.compiled = self._eager_grads, False
            out = self.grads(*args)
        loss, u_rows, win_rows, item_rows, du, dwin, de, de2, dw = out
        d = m.cfg.dim
        # index_add_ with int64 indices: measured 2.3x faster than with int32 ones.
        m.user_emb.grad.zero_().index_add_(0, u_rows, du)
        eg = m.item_emb.grad
        if table:  # dwin = [dH | direct term] per window slot, summed per item first
            s = torch.zeros(eg.shape[0], 2 * d, dtype=eg.dtype, device=eg.device)
            s.index_add_(0, win_rows, dwin)
            torch.addmm(s[:, d:], s[:, :d], m.proj.T, out=eg)  # dE = S2 + S1 W^T
            torch.addmm(dw, m.item_emb.T, s[:, :d], out=m.proj.grad)  # dW = P^T.. + E^T S1
        else:
            eg.zero_().index_add_(0, win_rows, dwin)
            m.proj.grad.copy_(dw)
        eg.index_add_(0, item_rows, de)
        m.item2_emb.grad.zero_().index_add_(0, item_rows, de2)
        return loss

    def _dropout_seeds(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[()]:
        """With dropout: the seeds (2,) of the users' mask and of the window rows' mask,
        drawn as AttRec.forward draws them (users first, from the run's dropout
        generator); without, nothing."""
        if self.model.cfg.dropout == 0:
            return ()
        gen, dev = self.model.dropout_generator, self.model.user_emb.device
        return dropout_seeds(gen, dev), dropout_seeds(gen, dev)

    def grads(self, user_emb: torch.Tensor, item_emb: torch.Tensor, item2_emb: torch.Tensor,
              proj: torch.Tensor, pos_enc: torch.Tensor, idx: torch.Tensor,
              users: torch.Tensor, windows: torch.Tensor, pos: torch.Tensor,
              neg: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
              table: bool, seeds_u: torch.Tensor | None = None,
              seeds_x: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Loss, the int64 rows looked up (users (B,), window slots (B·L,), candidates
        (B·K,)) and the gradients of those rows: du (B, d), dwin (B·L, 2d) through the table
        or (B·L, d) dX, de and de2 (B·K, d), and dw (d, d): P^T sum_b dH_b through the
        table, else dW. With dropout, the masks of seeds_u and seeds_x (2,) scale the
        users' rows (B, d) and the window rows (B, L, d) (not through the table). A pure
        function of its tensors."""
        cfg = self.model.cfg
        w, b = cfg.w, idx.shape[0]
        drop_u = drop_x = None
        if seeds_u is not None:
            drop_u = dropout_scale(seeds_u, (b, proj.shape[0]), cfg.dropout, user_emb.dtype)
            drop_x = dropout_scale(seeds_x, (b, windows.shape[1], proj.shape[0]),
                                   cfg.dropout, user_emb.dtype)
        users, windows = users[idx].long(), windows[idx].long()  # (B,), (B, L)
        items = torch.cat([pos[idx, None], neg[idx].reshape(b, -1)], dim=1).long()  # (B, K)
        short, saved = self._attention(item_emb, proj, pos_enc, windows, table,
                                       drop_x)  # (B, d)
        u = F.embedding(users, user_emb)  # (B, d)
        if drop_u is not None:
            u = u * drop_u
        e = F.embedding(items, item_emb)  # (B, K, d)
        e2 = F.embedding(items, item2_emb)  # (B, K, d)
        s = pair_scores(u, e, e2, short, cfg.mode, w)  # (B, K) [target, negatives]
        beta = self.model.beta
        ok = torch.ones_like(s[:, 1:], dtype=torch.bool)
        terms = sample_terms(s, ok, cfg.objective, cfg.mode, cfg.gamma, beta)  # (B,)
        mean = mean_reduced(cfg.objective, cfg.mode)
        loss = reduce_batch(terms, valid, count, "inner" if mean else "dist")
        ds = score_grads(s, cfg.objective, cfg.mode, cfg.gamma, beta, valid,
                         count)[..., None]  # (B, K, 1) d loss / d s
        if cfg.mode == "inner":
            du = w * (ds * e2).sum(1)
            de2 = w * ds * u[:, None]
            dshort = (1 - w) * (ds * e).sum(1)
            de = (1 - w) * ds * short[:, None]
        else:
            uc, nu, mu = clip_parts(u)
            ec, ne, me = clip_parts(e)
            e2c, ne2, me2 = clip_parts(e2)
            dlong = 2 * w * ds * (uc[:, None] - e2c)  # d loss / d (u - e2)
            dsh = 2 * (1 - w) * ds * (short[:, None] - ec)
            du = _clip_backward(uc, nu, mu, dlong.sum(1))
            de2 = _clip_backward(e2c, ne2, me2, -dlong)
            dshort = dsh.sum(1)
            de = _clip_backward(ec, ne, me, -dsh)
        dwin, dw = self._attention_backward(saved, dshort, proj, pos_enc, table)
        d = proj.shape[0]
        if drop_u is not None:  # d loss / d (raw row) = d loss / d (dropped row) * factor
            du = du * drop_u
            dwin = dwin * drop_x.reshape(-1, d)
        return (loss, users, windows.reshape(-1), items.reshape(-1), du, dwin,
                de.reshape(-1, d), de2.reshape(-1, d), dw)

    @staticmethod
    def _attention(item_emb: torch.Tensor, proj: torch.Tensor, pos_enc: torch.Tensor,
                   windows: torch.Tensor, table: bool,
                   drop_x: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """(B, L) windows -> (B, d) short-term interest, and what the backward needs:
        the structured attention, projected as `table` says, of the window rows scaled
        by `drop_x` (B, L, d) when given (then never through the table)."""
        b, l = windows.shape
        d = proj.shape[0]
        mask = windows != 0  # (B, L)
        x = F.embedding(windows, item_emb)  # (B, L, d)
        if drop_x is not None:
            x = x * drop_x
        if table:
            h = F.embedding(windows, item_emb @ proj) + pos_enc @ proj  # (B, L, d)
            z = None
        else:
            z = (x + pos_enc).reshape(b * l, d)  # (B·L, d)
            h = (z @ proj).reshape(b, l, d)
        out, saved = attend(x, mask, h)
        return out, (saved, z)

    @staticmethod
    def _attention_backward(saved: tuple, c: torch.Tensor, proj: torch.Tensor,
                            pos_enc: torch.Tensor, table: bool
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """From c = dL/dshort (B, d): the window slots' gradient rows and dw (see grads)."""
        inner, z = saved
        dh, direct = attend_backward(inner, c)  # (B, L, d) each
        b, l, d = dh.shape
        if table:
            dwin = torch.cat([dh, direct], dim=-1).reshape(b * l, 2 * d)
            return dwin, pos_enc.T @ dh.sum(0)  # P^T sum_b dH_b (d, d)
        dh_flat = dh.reshape(b * l, d)
        return dh_flat @ proj.T + direct.reshape(b * l, d), z.T @ dh_flat


class CpuStep:
    """The Step (fastattrec.training.step) of the CPU default: `ManualStep`'s loss and
    gradients of batch i, then Adam. One process, the structured attention."""

    def __init__(self, model: AttRec, opt: torch.optim.Optimizer, samples: Samples,
                 compile: bool = True) -> None:
        self.model, self.opt, self.samples = model, opt, samples
        self.manual = ManualStep(model, compile=compile)
        self.loss_sum = torch.zeros((), dtype=torch.float64)

    def start_epoch(self) -> None:
        self.loss_sum.zero_()

    def __call__(self, i: int) -> None:
        smp = self.samples
        b = smp.batch_at(i)
        loss = self.manual.gathered(b.idx, smp.users, smp.windows, smp.targets, smp.negs,
                                    b.valid, b.count)
        self.opt.step()
        add_batch_loss(self.loss_sum, loss, b.count, self.model)

    def describe(self) -> str:
        return ("hand-written, compiled by torch.compile" if self.manual.compiled
                else "hand-written")
