"""Vectorised ranking evaluation (docs/spec.md §4): sampled and full-ranking protocols.

Every scorer reports "goodness" (higher is better; mode dist's distances are negated), so
one ranking rule serves all: a user's rank is the number of competing items whose goodness
is at least the target's (ties count against the target). Each user's short-term interest
is computed once per evaluation and scored against all candidates in one tensor
operation; users go in chunks that bound memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from fastattrec.batches import DeviceData
from fastattrec.model import AttRec

DEFAULT_KS = (1, 5, 10, 20)
PROTOCOLS = ("sampled", "full", "both", "sasrec")
# the SASRec paper's sampled protocol: 100 negatives per test user, uniform with
# replacement over the items the user never rated, drawn at evaluation (seeded)
SASREC_NEGATIVES = 100


class Ranker(Protocol):
    """Anything that scores candidate items for users (higher is better)."""

    def goodness(self, users: torch.Tensor, windows: torch.Tensor,
                 items: torch.Tensor) -> torch.Tensor: ...  # (B, K)

    def goodness_all(self, users: torch.Tensor,
                     windows: torch.Tensor) -> torch.Tensor: ...  # (B, n_items)


class ModelRanker:
    """Scores from an AttRec model; the short-term interest is computed once per user."""

    def __init__(self, model: AttRec) -> None:
        self.model = model
        self.sign = 1.0 if model.cfg.mode == "inner" else -1.0

    def goodness(self, users, windows, items):
        short = self.model.short_term(windows)  # (B, d)
        return self.sign * self.model.score(users, short, items)

    def goodness_all(self, users, windows):
        return self.model.goodness_all(users, self.model.short_term(windows))


class PopularityRanker:
    """The popularity baseline: an item's count in the train and validation rows."""

    def __init__(self, popularity: torch.Tensor) -> None:
        self.pop = popularity  # (n_items,)

    def goodness(self, users, windows, items):
        return self.pop[items]

    def goodness_all(self, users, windows):
        return self.pop[None, :].expand(users.shape[0], -1)


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                       ndcg_log: str = "2") -> dict[str, float]:
    """HR@K, NDCG@K and MRR from 0-based ranks (U,): means over users.

    NDCG@K = [rank < K] / log(rank + 2) with log base 2 (ndcg_log="2") or the natural log
    of the original notebook (ndcg_log="e"). MRR = 1 / (rank + 1), not cut at K.
    """
    if ndcg_log not in ("2", "e"):
        raise ValueError("ndcg_log must be '2' or 'e'")
    r = ranks.to(torch.float64)
    log = torch.log2 if ndcg_log == "2" else torch.log
    out: dict[str, float] = {"users": int(r.numel())}
    for k in ks:
        hit = (r < k).to(torch.float64)
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float((hit / log(r + 2)).mean())
    out["MRR"] = float((1.0 / (r + 1)).mean())
    return out


def worst_if_nan(g: torch.Tensor) -> torch.Tensor:
    """Goodness with NaN made -inf, in place: a NaN score ranks last (and, as ties count
    against the target, a NaN target is beaten by every candidate), never a hit."""
    return g.masked_fill_(torch.isnan(g), -math.inf)


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


@torch.no_grad()
def sampled_ranks(ranker: Ranker, data: DeviceData, maxlen: int, chunk: int = 8192,
                  users: tuple[int, int] | None = None,
                  negs: torch.Tensor | None = None) -> torch.Tensor:
    """(U_test,) ranks of each test target among that user's test negatives (prep's, or
    `negs` (U_test, n)); only test users lo..hi-1 with `users=(lo, hi)`. A negative that
    scores the same as the target counts against it (once per copy)."""
    negs = data.test_negs if negs is None else negs
    lo_u, hi_u = users or (0, data.test_rows.shape[0])
    out = []
    n_cand = 1 + negs.shape[1]
    # With a moderate catalogue one matrix product against every item and a gather beats
    # gathering (B, 1 + n) embedding rows; both give the same scores.
    via_all = data.n_items <= 64 * n_cand
    if via_all:
        chunk = min(chunk, _full_chunk_size(data.n_items, data.device))
    for lo, hi in _chunks(hi_u - lo_u, chunk):
        lo, hi = lo + lo_u, hi + lo_u
        rows = data.test_rows[lo:hi]
        who = data.row_user[rows]
        windows = data.windows_before(rows, maxlen)  # (B, L)
        cand = torch.cat([data.items[rows][:, None], negs[lo:hi]], dim=1)  # (B, 1+n)
        if via_all:
            g = ranker.goodness_all(who, windows).gather(1, cand)
        else:
            g = ranker.goodness(who, windows, cand)
        g = worst_if_nan(g)
        out.append((g[:, 1:] >= g[:, :1]).sum(dim=1))
    if not out:
        return torch.zeros(0, dtype=torch.long, device=data.device)
    return torch.cat(out)


def _full_chunk_size(n_items: int, device: torch.device) -> int:
    budget = (1 << 30) if device.type == "cuda" else (1 << 27)  # bytes of scores per chunk
    return max(1, min(65536, budget // (4 * max(n_items, 1))))


@torch.no_grad()
def full_ranks(ranker: Ranker, data: DeviceData, rows: torch.Tensor, maxlen: int,
               chunk: int | None = None) -> torch.Tensor:
    """(B,) ranks of the targets at `rows` among every real item, excluding the items the
    user had before the target (the target itself stays a candidate only once)."""
    chunk = chunk or _full_chunk_size(data.n_items, data.device)
    out = []
    for lo, hi in _chunks(rows.shape[0], chunk):
        r = rows[lo:hi]
        users = data.row_user[r]
        g = worst_if_nan(ranker.goodness_all(users, data.windows_before(r, maxlen)).clone())
        target = data.items[r]  # g: (B, I)
        g_t = g.gather(1, target[:, None])  # (B, 1)
        # Competitors: every real item except those the user had before the target and
        # the target itself; (chunk row, item) pairs cleared with one scatter.
        compete = data.item_valid[None, :].repeat(r.shape[0], 1)  # (B, I)
        hist = data.row_pos[r]  # (B,) number of earlier rows
        b = torch.repeat_interleave(torch.arange(r.shape[0], device=r.device), hist)
        within = torch.arange(b.shape[0], device=r.device) - torch.repeat_interleave(
            torch.cumsum(hist, 0) - hist, hist)
        compete[b, data.items[data.offsets[users][b] + within]] = False
        compete[torch.arange(r.shape[0], device=r.device), target] = False
        out.append(((g >= g_t) & compete).sum(dim=1))
    if not out:
        return torch.zeros(0, dtype=torch.long, device=data.device)
    return torch.cat(out)


def evaluate(ranker: Ranker, data: DeviceData, maxlen: int, protocol: str = "both",
             ks: Sequence[int] = DEFAULT_KS, ndcg_log: str = "2",
             dist=None) -> dict[str, dict]:
    """Test metrics under the sampled and/or full-ranking protocol ("both": the two), or
    the SASRec paper's sampled protocol ("sasrec", `sasrec_negatives`). With `dist` (a
    fastattrec.distributed.Distributed) each process ranks its share of the users and the
    ranks are gathered, so every process returns the same metrics."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}")
    n = data.test_rows.shape[0]
    res: dict[str, dict] = {}
    if protocol in ("sampled", "both"):
        lo, hi = (0, n) if dist is None else dist.bounds(n)
        ranks = sampled_ranks(ranker, data, maxlen, users=(lo, hi))
        ranks = ranks if dist is None else dist.gather(ranks, n)
        res["sampled"] = metrics_from_ranks(ranks, ks, ndcg_log)
    if protocol in ("full", "both"):
        ranks = full_ranks_of(ranker, data, data.test_rows, maxlen, dist)
        res["full"] = metrics_from_ranks(ranks, ks, ndcg_log)
    if protocol == "sasrec":
        lo, hi = (0, n) if dist is None else dist.bounds(n)
        ranks = sampled_ranks(ranker, data, maxlen, users=(lo, hi),
                              negs=sasrec_negatives(data))
        ranks = ranks if dist is None else dist.gather(ranks, n)
        res["sasrec"] = metrics_from_ranks(ranks, ks, ndcg_log)
    return res


def sasrec_negatives(data: DeviceData, seed: int = 0) -> torch.Tensor:
    """(U_test, 100) negatives of the SASRec paper's protocol: uniform with replacement
    over the items each test user never rated (in any split), from a generator seeded
    `seed`, so two evaluations of one dataset draw the same."""
    gen = torch.Generator(device=data.device).manual_seed(seed)
    return data.sample_negatives(gen, SASREC_NEGATIVES, rows=data.test_rows)


def full_ranks_of(ranker: Ranker, data: DeviceData, rows: torch.Tensor, maxlen: int,
                  dist=None) -> torch.Tensor:
    """`full_ranks` of all `rows`; with `dist`, each process ranks its share and the ranks
    are gathered, so every process returns all of them."""
    if dist is None:
        return full_ranks(ranker, data, rows, maxlen)
    return dist.gather(full_ranks(ranker, data, dist.shard(rows), maxlen), rows.shape[0])
