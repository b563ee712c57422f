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
    """Loss and gradients of one batch of AttRec, by hand, into persistent `.grad`s."""

    def __init__(self, model: AttRec) -> None:
        self.model = model
        self._buffers()

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
        cfg = m.cfg
        w = cfg.w
        b, length = windows.shape
        d = cfg.dim
        x = F.embedding(windows, m.item_emb)  # (B, L, d)
        short, saved = structured_forward(x, windows != 0, m.proj, m.pos_enc)  # (B, d)
        items = torch.stack([pos, neg], dim=1)  # (B, 2)
        u = F.embedding(users, m.user_emb)  # (B, d)
        e = F.embedding(items, m.item_emb)  # (B, 2, d)
        e2 = F.embedding(items, m.item2_emb)  # (B, 2, d)
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
        m.user_emb.grad.zero_().index_add_(0, users, du)
        eg = m.item_emb.grad.zero_()
        eg.index_add_(0, windows.reshape(-1), dx.reshape(b * length, d))
        eg.index_add_(0, items.reshape(-1), de.reshape(2 * b, d))
        m.item2_emb.grad.zero_().index_add_(0, items.reshape(-1), de2.reshape(2 * b, d))
        m.proj.grad.copy_(dw)
        return loss
