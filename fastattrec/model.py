"""The AttRec module (docs/spec.md §2): embedding tables, scores and losses.

The short-term interest comes from `fastattrec.kernels.short_term_attention` (the backend
the run chose: the fused Triton kernel, the structured torch form or the plain reference);
this module only gathers embeddings and combines them. The scores, the pair losses and the
norm clipping are defined here once; the hand-written CPU step differentiates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastattrec.config import MODES, AttRecConfig
from fastattrec.kernels import position_encoding, short_term_attention

__all__ = ["MODES", "AttRec", "AttRecConfig", "batch_loss", "clip_rows", "pair_scores",
           "pair_terms", "reduce_batch"]


def clip_parts(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tf.clip_by_norm(t, 1, axis=-1): rows longer than 1 scaled to length 1; with each
    row's divisor max(1, |t|) and whether it moves with the row (|t| >= 1, counted at
    exactly 1 as autograd's clamp counts it), which the hand-written backward needs."""
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    n = norm.clamp(min=1.0)
    return t / n, n, norm >= 1.0


def clip_rows(t: torch.Tensor) -> torch.Tensor:
    """tf.clip_by_norm(t, 1, axis=-1): rows longer than 1 scaled to length 1."""
    return clip_parts(t)[0]


def pair_scores(u: torch.Tensor, e: torch.Tensor, e2: torch.Tensor, short: torch.Tensor,
                mode: str, w: float) -> torch.Tensor:
    """Scores (B, K) of K items with embeddings e, e2 (B, K, d) for users u (B, d) with
    short-term interest `short` (B, d). inner: higher is better; dist: lower is better."""
    u, short = u[:, None, :], short[:, None, :]
    if mode == "inner":
        return w * (u * e2).sum(-1) + (1 - w) * (short * e).sum(-1)
    u, e, e2 = clip_rows(u), clip_rows(e), clip_rows(e2)
    return w * (u - e2).pow(2).sum(-1) + (1 - w) * (short - e).pow(2).sum(-1)


def pair_terms(s: torch.Tensor, mode: str, gamma: float) -> torch.Tensor:
    """(B,) per-sample losses from (B, 2) scores [positive, negative]: softplus(s_neg -
    s_pos) (= -log sigmoid(s_pos - s_neg)) for inner, relu(s_pos - s_neg + gamma) for dist."""
    if mode == "inner":
        return F.softplus(s[:, 1] - s[:, 0])
    return torch.relu(s[:, 0] - s[:, 1] + gamma)


def batch_loss(u: torch.Tensor, e: torch.Tensor, e2: torch.Tensor, short: torch.Tensor,
               valid: torch.Tensor, count: torch.Tensor, mode: str, w: float,
               gamma: float) -> torch.Tensor:
    """The batch loss from gathered embeddings (item 0 of e/e2 is the positive, item 1 the
    negative): mean of softplus(s_neg - s_pos) (= -log sigmoid(s_pos - s_neg)) over the
    valid samples for inner, sum of relu(s_pos - s_neg + gamma) for dist. A pure tensor
    function, so on CUDA torch.compile can fuse it into a couple of kernels."""
    return reduce_batch(pair_terms(pair_scores(u, e, e2, short, mode, w), mode, gamma),
                        valid, count, mode)


def reduce_batch(terms: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                 mode: str) -> torch.Tensor:
    """The batch loss from per-sample losses (B,): the mean over the `count` valid samples
    for inner, their sum for dist; `valid` (B,) 0/1 masks a padded batch's padding."""
    total = (terms * valid).sum()
    return total / count if mode == "inner" else total


class AttRec(nn.Module):
    """AttRec: long-term user-item part plus self-attentive short-term part."""

    def __init__(self, cfg: AttRecConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        # All tables N(0, 0.05^2), row 0 included and trainable (docs/spec.md §2.1-2.2).
        self.user_emb = nn.Parameter(torch.empty(cfg.n_users, d).normal_(0, 0.05,
                                                                           generator=generator))
        self.item_emb = nn.Parameter(torch.empty(cfg.n_items, d).normal_(0, 0.05,
                                                                           generator=generator))
        self.item2_emb = nn.Parameter(torch.empty(cfg.n_items, d).normal_(0, 0.05,
                                                                            generator=generator))
        self.proj = nn.Parameter(torch.empty(d, d).uniform_(-0.05, 0.05, generator=generator))
        self.register_buffer("pos_enc", position_encoding(cfg.maxlen, d), persistent=False)
        self._batch_loss = batch_loss  # replaced by a compiled version on request

    def compile_loss(self) -> None:
        """Fuse the score-and-loss arithmetic with torch.compile (used on CUDA, where the
        training step is launch-bound; the first step pays the compilation)."""
        self._batch_loss = torch.compile(batch_loss, dynamic=False, fullgraph=True)

    def uncompile_loss(self) -> None:
        """Back to the eager loss (after a compiler failure): the same arithmetic."""
        self._batch_loss = batch_loss

    def loss_is_compiled(self) -> bool:
        return self._batch_loss is not batch_loss

    def tables(self) -> list[nn.Parameter]:
        """The three embedding tables that carry the L2 term."""
        return [self.user_emb, self.item_emb, self.item2_emb]

    def short_term(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, L) item ids, 0 = padding -> (B, d) short-term interest."""
        x = F.embedding(windows, self.item_emb)  # (B, L, d)
        mask = windows != 0  # (B, L)
        return short_term_attention(x, mask, self.proj, self.pos_enc,
                                    backend=self.cfg.kernel, precision=self.cfg.precision)

    def score(self, users: torch.Tensor, short: torch.Tensor,
              items: torch.Tensor) -> torch.Tensor:
        """Scores of `items` (B,) or (B, K) for users (B,) with short-term interest (B, d).

        Mode inner: higher is better; mode dist: lower is better (a squared distance).
        """
        u = F.embedding(users, self.user_emb)  # (B, d)
        one = items.dim() == 1
        items = items[:, None] if one else items
        e = F.embedding(items, self.item_emb)  # (B, K, d)
        e2 = F.embedding(items, self.item2_emb)
        s = pair_scores(u, e, e2, short, self.cfg.mode, self.cfg.w)  # (B, K)
        return s[:, 0] if one else s

    def goodness_all(self, users: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        """(B, n_items) scores of every item row, oriented so that higher is better."""
        w = self.cfg.w
        if self.cfg.mode == "inner":
            left = torch.cat([w * self.user_emb[users], (1 - w) * short], dim=1)  # (B, 2d)
            right = torch.cat([self.item2_emb, self.item_emb], dim=1)  # (I, 2d)
            return left @ right.T
        u = clip_rows(self.user_emb[users])
        e, e2 = clip_rows(self.item_emb), clip_rows(self.item2_emb)
        # ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2, as one matrix product for all items.
        left = torch.cat([w * u, (1 - w) * short], dim=1)
        right = torch.cat([e2, e], dim=1)
        dist = (w * u.pow(2).sum(1, keepdim=True) + (1 - w) * short.pow(2).sum(1, keepdim=True)
                - 2 * left @ right.T
                + (w * e2.pow(2).sum(1) + (1 - w) * e.pow(2).sum(1))[None, :])
        return -dist

    def pair_losses(self, users: torch.Tensor, windows: torch.Tensor, pos: torch.Tensor,
                    neg: torch.Tensor) -> torch.Tensor:
        """(B,) per-sample losses before reduction: softplus(neg - pos) for inner
        (= -log sigmoid(pos - neg)), relu(pos - neg + gamma) for dist."""
        s = self.score(users, self.short_term(windows), torch.stack([pos, neg], dim=1))
        return pair_terms(s, self.cfg.mode, self.cfg.gamma)

    def forward(self, users: torch.Tensor, windows: torch.Tensor, pos: torch.Tensor,
                neg: torch.Tensor, valid: torch.Tensor | None = None,
                count: torch.Tensor | float | None = None) -> torch.Tensor:
        """The batch loss without the L2 term: mean (inner) or sum (dist) over the valid
        samples. `valid` (B,) 0/1 marks padding samples of a fixed-shape last batch;
        `count` overrides the mean's denominator (for batches split across processes)."""
        items = torch.stack([pos, neg], dim=1)  # (B, 2): one gather per table
        u = F.embedding(users, self.user_emb)
        e = F.embedding(items, self.item_emb)
        e2 = F.embedding(items, self.item2_emb)
        x = F.embedding(windows, self.item_emb)  # (B, L, d)
        if valid is None:
            valid = torch.ones(users.shape[0], dtype=e.dtype, device=e.device)
        if count is None:
            count = valid.sum()
        if not torch.is_tensor(count):
            count = torch.tensor(float(count), dtype=e.dtype, device=e.device)
        return self.loss_of_rows(u, x, windows != 0, e, e2, valid, count)

    def loss_of_rows(self, u: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                     e: torch.Tensor, e2: torch.Tensor, valid: torch.Tensor,
                     count: torch.Tensor) -> torch.Tensor:
        """`forward` from rows already looked up: users u (B, d), window rows x (B, L, d)
        with key mask (B, L), candidates e and e2 (B, 2, d) [positive, negative]. The
        training step that gathers every row into one leaf calls this directly."""
        short = short_term_attention(x, mask, self.proj, self.pos_enc,
                                     backend=self.cfg.kernel, precision=self.cfg.precision)
        return self._batch_loss(u, e, e2, short, valid, count, self.cfg.mode, self.cfg.w,
                                self.cfg.gamma)

    def reg_loss(self) -> torch.Tensor:
        """lambda * (||U||^2 + ||E||^2 + ||E2||^2) over whole tables (docs/spec.md §2.6, §3.2)."""
        return self.cfg.embed_reg * sum(t.pow(2).sum() for t in self.tables())
