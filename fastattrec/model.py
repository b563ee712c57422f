"""The AttRec module (docs/spec.md §2): embedding tables, scores and losses.

The short-term interest comes from `fastattrec.kernels.short_term_attention` (the backend
the run chose: the fused Triton kernel, the structured torch form or the plain reference);
this module only gathers embeddings and combines them. The scores, the pair losses and the
norm clipping are defined here once; the hand-written CPU step differentiates them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastattrec.compiled import compile_for_run
from fastattrec.config import MODES, OBJECTIVES, AttRecConfig
from fastattrec.kernels import position_encoding, short_term_attention

__all__ = ["MODES", "AttRec", "AttRecConfig", "batch_loss", "clip_rows", "gbce_beta",
           "mean_reduced", "pair_scores", "pair_terms", "reduce_batch", "sample_terms"]


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


def logits_of(s: torch.Tensor, mode: str) -> torch.Tensor:
    """Scores as logits, higher is better: the score for inner, minus the distance for dist."""
    return s if mode == "inner" else -s


def gbce_beta(n_negatives: int, n_items: int, t: float) -> float:
    """gSASRec's power on the target's probability: beta = alpha (t (1 - 1/alpha) + 1/alpha)
    with alpha = N / (n_items - 1) the negative sampling rate over the n_items real items
    (Petrov and Macdonald, 2023)."""
    alpha = min(1.0, n_negatives / max(1, n_items - 1))
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def sample_terms(s: torch.Tensor, ok: torch.Tensor, objective: str, mode: str,
                 gamma: float, beta: float = 1.0,
                 lse_all: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) per-sample losses of the objective (docs/spec.md §2.5) from scores s (B, 1 + N)
    [target, negatives]; `ok` (B, N) masks negatives equal to the target (shared
    negatives); `lse_all` (B,): logsumexp of every item's logit (objective softmax).

    pair: the notebook's pair loss, averaged over the N negatives; bce: -log sigma(l+) -
    sum_j log(1 - sigma(l-_j)); gbce: the same with sigma(l+) raised to `beta`;
    sampled-softmax: -log softmax over [l+, l-_1..N]; softmax: -log softmax over all items.
    With uniform negatives the log-Q correction of the sampled softmax is one constant for
    every candidate and cancels, so none is applied."""
    okf = ok.to(s.dtype)
    if objective == "pair":
        if s.shape[1] == 2:
            return pair_terms(s, mode, gamma) * okf[:, 0]
        pos, neg = s[:, :1], s[:, 1:]
        pairs = F.softplus(neg - pos) if mode == "inner" else torch.relu(pos - neg + gamma)
        return (pairs * okf).sum(1) / okf.sum(1).clamp(min=1.0)
    lg = logits_of(s, mode)
    if objective in ("bce", "gbce"):
        return beta * F.softplus(-lg[:, 0]) + (F.softplus(lg[:, 1:]) * okf).sum(1)
    if objective == "sampled-softmax":
        neg = lg[:, 1:].masked_fill(~ok, float("-inf"))
        return torch.logsumexp(torch.cat([lg[:, :1], neg], dim=1), dim=1) - lg[:, 0]
    if objective == "softmax":
        return lse_all - lg[:, 0]
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def batch_loss(u: torch.Tensor, e: torch.Tensor, e2: torch.Tensor, short: torch.Tensor,
               valid: torch.Tensor, count: torch.Tensor, mode: str, w: float,
               gamma: float, objective: str = "pair", ok: torch.Tensor | None = None,
               beta: float = 1.0, lse_all: torch.Tensor | None = None,
               extra: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss from gathered embeddings (item 0 of e/e2, (B, 1 + N, d), is the
    target, the rest its negatives; `extra` (B, N'): scores of more negatives computed
    elsewhere, appended): the objective's per-sample losses (`sample_terms`), reduced as
    `reduce_batch`. A pure tensor function, so on CUDA torch.compile can fuse it into a
    couple of kernels."""
    s = pair_scores(u, e, e2, short, mode, w)  # (B, 1 + N)
    if extra is not None:
        s = torch.cat([s, extra], dim=1)
    if ok is None:
        ok = torch.ones_like(s[:, 1:], dtype=torch.bool)
    terms = sample_terms(s, ok, objective, mode, gamma, beta, lse_all)
    return reduce_batch(terms, valid, count, "inner" if mean_reduced(objective, mode) else "dist")


def mean_reduced(objective: str, mode: str) -> bool:
    """Whether the batch loss is the mean of the per-sample losses (else their sum: the
    notebook's pair loss in mode dist)."""
    return objective != "pair" or mode == "inner"


def reduce_batch(terms: torch.Tensor, valid: torch.Tensor, count: torch.Tensor,
                 mode: str) -> torch.Tensor:
    """The batch loss from per-sample losses (B,): the mean over the `count` valid samples
    for inner (and every objective but the notebook's pair loss), their sum for dist
    (as the notebook); `valid` (B,) 0/1 masks a padded batch's padding."""
    total = (terms * valid).sum()
    return total / count if mode == "inner" else total


# Dropout's uniform draws have 24 bits, as torch.rand's float32 ones.
DROPOUT_BITS = 24


def _mul32_(h: torch.Tensor, c: int, tmp: torch.Tensor) -> None:
    """h <- h * c mod 2^32, in place, for int64 0 <= h < 2^32 and 0 <= c < 2^32: the
    product split at c's 16 bits so no int64 product overflows."""
    torch.mul(h, c >> 16, out=tmp)
    tmp.bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    h.mul_(c & 0xFFFF).add_(tmp).bitwise_and_(0xFFFFFFFF)


def _mix32_(h: torch.Tensor, tmp: torch.Tensor) -> None:
    """h <- lowbias32(h), in place: C. Wellons' 32-bit integer hash, a bijection of
    [0, 2^32) in which every input bit flips every output bit with probability ~1/2."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        h.bitwise_xor_(torch.bitwise_right_shift(h, shift, out=tmp))
        _mul32_(h, mult, tmp)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=tmp))


def dropout_seeds(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Two 32-bit seeds (2,) int64 for one dropout mask, from the run's generator: one
    small draw per mask, whatever its size (docs/spec.md §2.5)."""
    return torch.randint(0, 2**32, (2,), generator=generator, device=device)


def dropout_scale(seeds: torch.Tensor, shape: tuple[int, ...], p: float,
                  dtype: torch.dtype, shard: int = 0) -> torch.Tensor:
    """Inverted dropout's factors (shape): keep / (1 - p), keep = 0 with probability p.
    Entry k (row-major, counted from shard * numel: process `shard`'s part of the global
    batch's mask) keeps iff the top 24 bits of lowbias32(lowbias32((k + s0) mod 2^32)
    XOR s1) are >= ceil(p 2^24): a counter-based draw, about 40 integer operations an
    entry (fused into one loop under torch.compile), the same mask from the same seeds
    on any device, step path or number of processes."""
    n = math.prod(shape)
    h = torch.arange(shard * n, (shard + 1) * n, device=seeds.device)  # (n,) int64
    tmp = torch.empty_like(h)
    h.add_(seeds[0]).bitwise_and_(0xFFFFFFFF)
    _mix32_(h, tmp)
    h.bitwise_xor_(seeds[1])
    _mix32_(h, tmp)
    keep = h.bitwise_right_shift_(32 - DROPOUT_BITS) >= math.ceil(p * 2**DROPOUT_BITS)
    return (keep.to(dtype) / (1.0 - p)).reshape(shape)


def dropout_rows(t: torch.Tensor, p: float, generator: torch.Generator | None,
                 scale: Callable[..., torch.Tensor] | None = None,
                 shard: int = 0) -> torch.Tensor:
    """Inverted dropout of `t`'s entries at rate p, its mask's seeds drawn from the run's
    own generator (so a resumed run draws the same masks); `scale` computes the factors
    (`dropout_scale`, or a torch.compile of it); `shard`: this process's rank, whose
    rows of the global batch `t` holds (every rank draws the same seeds)."""
    scale = scale or dropout_scale
    return t * scale(dropout_seeds(generator, t.device), tuple(t.shape), p, t.dtype, shard)


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
        self._dropout_scale = dropout_scale  # (likewise)
        # item rows that are real items (the softmax objective's normaliser; padding row 0
        # excluded); `set_item_rows` narrows it to the dataset's
        mask = torch.ones(cfg.n_items, dtype=torch.bool)
        mask[0] = False
        self.register_buffer("item_rows", mask, persistent=False)
        self.beta = self._beta_of(cfg.n_items - 1)  # gbce's power (1.0 for the others)
        self.dropout_generator: torch.Generator | None = None  # the run's, set by build
        self.dropout_shard = 0  # this process's rank under torchrun, set by build

    def compile_loss(self) -> None:
        """Fuse the score-and-loss arithmetic with torch.compile (used on CUDA, where the
        training step is launch-bound; the first step pays the compilation)."""
        self._batch_loss = compile_for_run(batch_loss, dynamic=False, fullgraph=True)
        # dropout's masks too: eagerly they are ~45 separate operations, one launch each
        self._dropout_scale = compile_for_run(dropout_scale, dynamic=False, fullgraph=True)

    def uncompile_loss(self) -> None:
        """Back to the eager loss (after a compiler failure): the same arithmetic."""
        self._batch_loss, self._dropout_scale = batch_loss, dropout_scale

    def loss_is_compiled(self) -> bool:
        return self._batch_loss is not batch_loss

    def set_item_rows(self, valid: torch.Tensor) -> None:
        """Which item rows are real items (n_items,) bool: the full softmax normalises over
        those only, and gbce's sampling rate counts them."""
        self.item_rows.copy_(valid)
        self.beta = self._beta_of(int(valid.sum()))

    def _beta_of(self, n_real: int) -> float:
        cfg = self.cfg
        if cfg.objective != "gbce":
            return 1.0
        return gbce_beta(cfg.n_negatives, n_real, cfg.gbce_t)

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

    def user_rows(self, users: torch.Tensor) -> torch.Tensor:
        """(B, d) long-term user embeddings of users (B,); user 0, one the model was not
        trained on (a new history), gets the mean of the trained users' rows 1.. (docs/spec.md
        §4.10)."""
        rows = F.embedding(users, self.user_emb)  # (B, d)
        mean = self.user_emb[1:].mean(0)  # (d,)
        return torch.where((users == 0)[:, None], mean[None, :], rows)

    def goodness_all(self, users: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        """(B, n_items) scores of every item row, oriented so that higher is better."""
        return self.goodness_of_rows(self.user_emb[users], short)

    def goodness_of_rows(self, u: torch.Tensor, short: torch.Tensor,
                         items: torch.Tensor | None = None) -> torch.Tensor:
        """`goodness_all` from user rows u (B, d) already looked up; of the item rows
        `items` (K,) only, (B, K), when given (shared negatives)."""
        w = self.cfg.w
        e = self.item_emb if items is None else F.embedding(items, self.item_emb)
        e2 = self.item2_emb if items is None else F.embedding(items, self.item2_emb)
        if self.cfg.mode == "inner":
            left = torch.cat([w * u, (1 - w) * short], dim=1)  # (B, 2d)
            right = torch.cat([e2, e], dim=1)  # (I, 2d)
            return left @ right.T
        u = clip_rows(u)
        e, e2 = clip_rows(e), clip_rows(e2)
        # ||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2, as one matrix product for all items.
        left = torch.cat([w * u, (1 - w) * short], dim=1)
        right = torch.cat([e2, e], dim=1)
        dist = (w * u.pow(2).sum(1, keepdim=True) + (1 - w) * short.pow(2).sum(1, keepdim=True)
                - 2 * left @ right.T
                + (w * e2.pow(2).sum(1) + (1 - w) * e.pow(2).sum(1))[None, :])
        return -dist

    def all_items_lse(self, u: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        """(B,) logsumexp of every real item's logit (the full softmax's normaliser)."""
        g = self.goodness_of_rows(u, short).masked_fill(~self.item_rows, float("-inf"))
        return torch.logsumexp(g, dim=1)

    def sample_losses(self, users: torch.Tensor, windows: torch.Tensor, pos: torch.Tensor,
                      neg: torch.Tensor) -> torch.Tensor:
        """(B,) per-sample losses of the run's objective before reduction, no dropout
        (the validation loss): targets `pos` (B,), negatives `neg` (B,) or (B, N)."""
        items = self.candidates(pos, neg)
        short = self.short_term(windows)
        s = self.score(users, short, items)
        lse = (self.all_items_lse(F.embedding(users, self.user_emb), short)
               if self.cfg.objective == "softmax" else None)
        return sample_terms(s, torch.ones_like(s[:, 1:], dtype=torch.bool), self.cfg.objective,
                            self.cfg.mode, self.cfg.gamma, self.beta, lse)

    def candidates(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N) item ids [target, negatives] (the target alone for softmax)."""
        if self.cfg.objective == "softmax":
            return pos[:, None]
        return torch.cat([pos[:, None], neg.reshape(pos.shape[0], -1).to(pos.dtype)], dim=1)

    def forward(self, users: torch.Tensor, windows: torch.Tensor, pos: torch.Tensor,
                neg: torch.Tensor, valid: torch.Tensor | None = None,
                count: torch.Tensor | float | None = None) -> torch.Tensor:
        """The batch loss without the L2 term (mean, or for the notebook's dist pair loss
        the sum, over the valid samples). Negatives `neg` (B,) or (B, N) per sample, or
        with shared negatives (N,) for the whole batch; `valid` (B,) 0/1 marks padding
        samples of a fixed-shape last batch; `count` overrides the mean's denominator (for
        batches split across processes). Dropout, when set, applies here only (training)."""
        shared = self.cfg.shared_negatives and self.cfg.objective != "softmax"
        items = pos[:, None] if shared else self.candidates(pos, neg)  # (B, 1 + N)
        u = F.embedding(users, self.user_emb)
        e = F.embedding(items, self.item_emb)  # one gather per table
        e2 = F.embedding(items, self.item2_emb)
        x = F.embedding(windows, self.item_emb)  # (B, L, d)
        if self.cfg.dropout > 0:
            u = dropout_rows(u, self.cfg.dropout, self.dropout_generator,
                             self._dropout_scale, self.dropout_shard)
            x = dropout_rows(x, self.cfg.dropout, self.dropout_generator,
                             self._dropout_scale, self.dropout_shard)
        if valid is None:
            valid = torch.ones(users.shape[0], dtype=e.dtype, device=e.device)
        if count is None:
            count = valid.sum()
        if not torch.is_tensor(count):
            count = torch.tensor(float(count), dtype=e.dtype, device=e.device)
        # only a shared negative can be the sample's own target (prep's and resampled ones
        # are unseen items; the notebook's compat negatives count as drawn)
        ok = neg.to(pos.dtype)[None, :] != pos[:, None] if shared else None  # (B, N)
        return self.loss_of_rows(u, x, windows != 0, e, e2, valid, count, ok,
                                 neg if shared else None)

    def loss_of_rows(self, u: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                     e: torch.Tensor, e2: torch.Tensor, valid: torch.Tensor,
                     count: torch.Tensor, ok: torch.Tensor | None = None,
                     shared: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` from rows already looked up: users u (B, d), window rows x (B, L, d)
        with key mask (B, L), candidates e and e2 (B, 1 + N, d) [target, negatives], `ok`
        (B, N) the negatives that differ from the target; or with `shared` (N,) negative
        ids of the whole batch, e and e2 hold the targets only and the negatives' scores
        are one matrix product with their N rows (`goodness_of_rows`). The training step
        that gathers every row into one leaf calls this directly."""
        short = short_term_attention(x, mask, self.proj, self.pos_enc,
                                     backend=self.cfg.kernel, precision=self.cfg.precision)
        cfg = self.cfg
        lse = self.all_items_lse(u, short) if cfg.objective == "softmax" else None
        extra = None
        if shared is not None:  # scores (B, N), oriented as pair_scores'
            g = self.goodness_of_rows(u, short, shared)
            extra = g if cfg.mode == "inner" else -g
        return self._batch_loss(u, e, e2, short, valid, count, cfg.mode, cfg.w, cfg.gamma,
                                cfg.objective, ok, self.beta, lse, extra)

    def reg_loss(self) -> torch.Tensor:
        """lambda * (||U||^2 + ||E||^2 + ||E2||^2) over whole tables (docs/spec.md §2.6, §3.2)."""
        return self.cfg.embed_reg * sum(t.pow(2).sum() for t in self.tables())
