"""One training step on the CPU with its gradient written out by hand.

Why: on a CPU the AttRec step is three (B·L, d) x (d, d) matrix products surrounded by
about 150 small operations. Through autograd, those small operations, the graph
bookkeeping and the dense embedding backward (a zero-filled (rows, d) gradient per lookup,
then the sums of those) cost about twice the matrix products (docs/RESULTS.md). Here the
forward keeps only what the backward needs, the backward is the chain rule written out,
and each table's gradient is accumulated with `index_add_` into one buffer that lives as
long as the model and that the optimiser reads: the step is ~40 operations, no graph.

The maths is the model's (docs/spec.md §2.4-2.5), differentiated by hand; the short-term
attention is the structured algorithm of `fastattrec.kernels.structured`, forward and
backward. tests/test_cpu_step.py checks the loss and every gradient against autograd of
the plain reference model, in both modes, with padding, repeated items and masked samples.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from fastattrec.kernels.structured import structured_backward, structured_forward
from fastattrec.model import AttRec


def _clip(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows scaled to length <= 1 (as model.clip_rows), and each row's divisor."""
    n = torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp(min=1.0)
    return v / n, n


def _clip_backward(vc: torch.Tensor, n: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Gradient through v -> v / max(1, |v|): identity where |v| <= 1, else the projection
    (g - vc <vc, g>) / |v| that removes the radial part."""
    radial = (vc * g).sum(-1, keepdim=True) * (n > 1.0)
    return (g - vc * radial) / n


class ManualStep:
    """Loss and gradients of one batch of AttRec, by hand, into persistent `.grad`s.

    With `compile`, the arithmetic (`grads`, everything but the scatter into the tables'
    gradients) is compiled by torch.compile (Inductor generates C++ for the CPU), which
    fuses its ~40 operations into a few loops: measured about 1.8x faster per epoch. The
    scatter stays `index_add_` (Inductor would make it atomic adds, slower). If
    compilation fails (no C++ compiler, say), the step says so once and runs eagerly:
    the same arithmetic, unfused."""

    def __init__(self, model: AttRec, compile: bool = False) -> None:
        self.model = model
        self._buffers()
        self._eager_grads = self.grads
        if compile:
            self.grads = torch.compile(self.grads, dynamic=False)

    def _buffers(self) -> None:
        for p in self.model.parameters():  # (again, if someone set them to None)
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    @torch.no_grad()
    def __call__(self, users: torch.Tensor, windows: torch.Tensor, pos: torch.Tensor,
                 neg: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """The batch loss (as AttRec.forward: mean over valid samples for inner, sum for
        dist); the parameters' `.grad` hold its gradient afterwards (L2 excluded: the
        optimiser's weight decay adds it)."""
        self._buffers()
        m = self.model
        items = torch.stack([pos, neg], dim=1)  # (B, 2)
        args = (m.user_emb, m.item_emb, m.item2_emb, m.proj, m.pos_enc, users, windows, items,
                valid, count)
        try:
            loss, du, dx, de, de2, dw = self.grads(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back, exactly
            if self.grads is self._eager_grads:
                raise
            warnings.warn(f"torch.compile of the CPU training step failed "
                          f"({str(e).strip().splitlines()[0][:200]}); running it uncompiled",
                          stacklevel=2)
            self.grads = self._eager_grads
            loss, du, dx, de, de2, dw = self.grads(*args)
        d = m.cfg.dim
        # index_add_ with int64 indices: measured 2.3x faster than with int32 ones.
        users, windows, items = users.long(), windows.long().reshape(-1), items.long().reshape(-1)
        m.user_emb.grad.zero_().index_add_(0, users, du)
        eg = m.item_emb.grad.zero_()
        eg.index_add_(0, windows, dx.reshape(-1, d))
        eg.index_add_(0, items, de.reshape(-1, d))
        m.item2_emb.grad.zero_().index_add_(0, items, de2.reshape(-1, d))
        m.proj.grad.copy_(dw)
        return loss

    def grads(self, user_emb: torch.Tensor, item_emb: torch.Tensor, item2_emb: torch.Tensor,
              proj: torch.Tensor, pos_enc: torch.Tensor, users: torch.Tensor,
              windows: torch.Tensor, items: torch.Tensor, valid: torch.Tensor,
              count: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Loss and the gradients of the rows looked up: du (B, d), dx (B, L, d),
        de and de2 (B, 2, d), and dW (d, d). A pure function of its tensors."""
        cfg = self.model.cfg
        w = cfg.w
        x = F.embedding(windows, item_emb)  # (B, L, d)
        short, saved = structured_forward(x, windows != 0, proj, pos_enc)  # (B, d)
        u = F.embedding(users, user_emb)  # (B, d)
        e = F.embedding(items, item_emb)  # (B, 2, d)
        e2 = F.embedding(items, item2_emb)  # (B, 2, d)
        if cfg.mode == "inner":
            s = w * (u[:, None] * e2).sum(-1) + (1 - w) * (short[:, None] * e).sum(-1)
            diff = s[:, 1] - s[:, 0]  # (B,)
            loss = (F.softplus(diff) * valid).sum() / count
            g = torch.sigmoid(diff) * valid / count  # d loss / d diff
            ds = torch.stack([-g, g], dim=1)[..., None]  # (B, 2, 1) d loss / d s
            du = w * (ds * e2).sum(1)
            de2 = w * ds * u[:, None]
            dshort = (1 - w) * (ds * e).sum(1)
            de = (1 - w) * ds * short[:, None]
        else:
            uc, nu = _clip(u)
            ec, ne = _clip(e)
            e2c, ne2 = _clip(e2)
            r_long = uc[:, None] - e2c  # (B, 2, d)
            r_short = short[:, None] - ec
            s = w * r_long.pow(2).sum(-1) + (1 - w) * r_short.pow(2).sum(-1)  # (B, 2)
            margin = s[:, 0] - s[:, 1] + cfg.gamma
            loss = (torch.relu(margin) * valid).sum()
            g = (margin > 0).to(s.dtype) * valid
            ds = torch.stack([g, -g], dim=1)[..., None]  # (B, 2, 1)
            dlong = 2 * w * ds * r_long  # d loss / d r_long
            dsh = 2 * (1 - w) * ds * r_short
            du = _clip_backward(uc, nu, dlong.sum(1))
            de2 = _clip_backward(e2c, ne2, -dlong)
            dshort = dsh.sum(1)
            de = _clip_backward(ec, ne, -dsh)
        dx, dw = structured_backward(saved, dshort)
        return loss, du, dx, de, de2, dw
