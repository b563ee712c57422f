"""Vectorised ranking evaluation (docs/spec.md §4): sampled and full-ranking protocols.

Every scorer reports "goodness" (higher is better; mode dist's distances are negated), so
one ranking rule serves all: a target's rank is the number of competing items whose
goodness is at least the target's (ties count against the target). Each query's (user's)
short-term interest is computed once per evaluation and scored against all candidates in
one tensor operation; queries go in chunks that bound memory. A query may have several
targets (the time and ratio splits, §4.9): each is ranked against the non-target
candidates and metrics are taken over the query's targets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from fastattrec.batches import DeviceData, Phase
from fastattrec.errors import UserError
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
                       ndcg_log: str = "2", owner: torch.Tensor | None = None,
                       recall: bool = False) -> dict[str, float]:
    """HR@K, NDCG@K and MRR (and Recall@K with `recall`) from 0-based ranks: means over
    queries (users).

    With one target per query (`owner` None), `ranks` (U,) are the targets' ranks:
    NDCG@K = [rank < K] / log(rank + 2) with log base 2 (ndcg_log="2") or the natural log
    of the original notebook (ndcg_log="e"); MRR = 1 / (rank + 1), not cut at K.

    With several, `ranks` (M,) are the 0-based positions of every query's relevant items
    in its ranked list, query by query (`owner` (M,) nondecreasing) and ascending within
    a query, as `target_ranks` returns them. Then, for a query with n relevant items at
    positions p_0 < p_1 < ... (docs/spec.md §4.9): HR@K = [p_0 < K];
    Recall@K = #{p_j < K} / n (RecBole's recall); NDCG@K = Σ [p_j < K] / log(p_j + 2)
    divided by the ideal Σ_{j < min(K, n)} 1 / log2(j + 2); MRR = 1 / (p_0 + 1). With one
    target these are the formulas above, to the bit.
    """
    if ndcg_log not in ("2", "e"):
        raise ValueError("ndcg_log must be '2' or 'e'")
    r = ranks.to(torch.float64)
    log = torch.log2 if ndcg_log == "2" else torch.log
    if owner is None or owner.shape[0] == 0 or bool((owner[1:] != owner[:-1]).all()):
        first, n_rel, segments = r, None, None  # one target per query
    else:  # segments of each query's targets: sums by cumulative sums (deterministic)
        starts = torch.cat([torch.ones(1, dtype=torch.bool, device=r.device),
                            owner[1:] != owner[:-1]]).nonzero().flatten()  # (P,)
        ends = torch.cat([starts[1:], torch.tensor([r.shape[0]], device=r.device)])
        first, n_rel, segments = r[starts], (ends - starts).to(torch.float64), (starts, ends)
    out: dict[str, float] = {"users": int(first.numel())}
    for k in ks:
        hit = (r < k).to(torch.float64)
        gain = hit / log(r + 2)
        out[f"HR@{k}"] = float((first < k).to(torch.float64).mean())
        if segments is None:
            if recall:
                out[f"Recall@{k}"] = out[f"HR@{k}"]
            out[f"NDCG@{k}"] = float(gain.mean())
            continue
        if recall:
            out[f"Recall@{k}"] = float((_segment_sums(hit, *segments) / n_rel).mean())
        ideal = torch.cumsum(1.0 / torch.log2(torch.arange(
            k, dtype=torch.float64, device=r.device) + 2), 0)  # (K,) ideal DCG of 1..K hits
        best = ideal[torch.clamp(n_rel.long(), max=k) - 1]
        out[f"NDCG@{k}"] = float((_segment_sums(gain, *segments) / best).mean())
    out["MRR"] = float((1.0 / (first + 1)).mean())
    return out


def _segment_sums(v: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """(P,) sums of v (M,) over [starts, ends) (P,), by one cumulative sum."""
    c = torch.cat([torch.zeros(1, dtype=v.dtype, device=v.device), torch.cumsum(v, 0)])
    return c[ends] - c[starts]


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
                  negs: torch.Tensor | None = None,
                  targets: torch.Tensor | None = None) -> torch.Tensor:
    """(U_test,) ranks of each test target among that user's test negatives (prep's, or
    `negs` (U_test, n)); only test users lo..hi-1 with `users=(lo, hi)`; the flat rows
    `targets` (U, ) with their `negs` (U, n) instead of the test rows (the validation
    rows, say). A negative that scores the same as the target counts against it (once
    per copy)."""
    negs = data.test_negs if negs is None else negs
    targets = data.test_rows if targets is None else targets
    lo_u, hi_u = users or (0, targets.shape[0])
    out = []
    n_cand = 1 + negs.shape[1]
    # With a moderate catalogue one matrix product against every item and a gather beats
    # gathering (B, 1 + n) embedding rows; both give the same scores.
    via_all = data.n_items <= 64 * n_cand
    if via_all:
        chunk = min(chunk, _full_chunk_size(data.n_items, data.device))
    for lo, hi in _chunks(hi_u - lo_u, chunk):
        lo, hi = lo + lo_u, hi + lo_u
        rows = targets[lo:hi]
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
    return target_ranks(ranker, data, Phase.of_rows(data, rows), maxlen, chunk)


@torch.no_grad()
def target_ranks(ranker: Ranker, data: DeviceData, phase: Phase, maxlen: int,
                 chunk: int | None = None, queries: tuple[int, int] | None = None
                 ) -> torch.Tensor:
    """(D,) positions of the relevant items (`phase.rank_rows`) of queries lo..hi-1
    (`queries`, default all) in their query's full ranking: query by query, ascending
    within a query (the order `metrics_from_ranks` takes).

    Candidates are every real item but the user's items before the window end; a target
    that is also among them stays a candidate. Each target's rank r is the number of
    non-target candidates whose goodness is at least its own (ties count against it);
    the k-th best of a query's targets (0-based) is at position r + k of the list."""
    chunk = chunk or _full_chunk_size(data.n_items, data.device)
    lo_q, hi_q = queries or (0, phase.n)
    starts = list(range(lo_q, hi_q, chunk))
    # First target of each chunk and one past the last (one host sync for all chunks).
    cuts = torch.searchsorted(phase.rank_owner, torch.tensor(
        [*starts, hi_q], device=phase.rank_owner.device)).tolist()
    out = []
    for c, lo in enumerate(starts):
        hi = min(hi_q, lo + chunk)
        users, ends, avail = phase.users[lo:hi], phase.ends[lo:hi], phase.avail[lo:hi]
        g = worst_if_nan(ranker.goodness_all(users, data.query_windows(
            phase, maxlen, lo, hi)).clone())  # (B, I)
        b_n = hi - lo
        tq = phase.rank_owner[cuts[c]:cuts[c + 1]] - lo  # (Mc,) query of each target
        ti = data.items[phase.rank_rows[cuts[c]:cuts[c + 1]]]  # (Mc,) its item
        # Competitors: every real item except the user's earlier items and the targets;
        # (query, item) pairs cleared with one scatter each.
        compete = data.item_valid[None, :].repeat(b_n, 1)  # (B, I)
        b = torch.repeat_interleave(torch.arange(b_n, device=g.device), avail)
        within = torch.arange(b.shape[0], device=g.device) - torch.repeat_interleave(
            torch.cumsum(avail, 0) - avail, avail)
        compete[b, data.items[(ends - avail)[b] + within]] = False
        compete[tq, ti] = False
        g_t = g[tq, ti]  # (Mc,)
        if tq.shape[0] == b_n:  # one target per query: tq is 0..B-1
            r = ((g >= g_t[:, None]) & compete).sum(dim=1)
        else:  # several: the targets' rows, gathered at most B at a time
            r = torch.cat([((g[tq[s:s + b_n]] >= g_t[s:s + b_n, None]) & compete[
                tq[s:s + b_n]]).sum(dim=1) for s in range(0, tq.shape[0], b_n)])
            srt = torch.sort(tq * (data.n_items + 1) + r, stable=True).values
            k = torch.arange(tq.shape[0], device=g.device) - torch.searchsorted(tq, tq)
            r = srt - tq * (data.n_items + 1) + k  # (Mc,) positions, ascending per query
        out.append(r)
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
    if protocol in ("sampled", "sasrec") and not data.leave_one_out:
        raise UserError(f"the {protocol} protocol ranks one test item per user against "
                        f"sampled negatives, which only the leave-one-out split has; this "
                        f"dataset's split is {data.split}, so use protocol full (or both, "
                        f"which is full alone for it).")
    n = data.test_rows.shape[0]
    res: dict[str, dict] = {}
    if protocol in ("sampled", "both") and data.leave_one_out:
        lo, hi = (0, n) if dist is None else dist.bounds(n)
        ranks = sampled_ranks(ranker, data, maxlen, users=(lo, hi))
        ranks = ranks if dist is None else dist.gather(ranks, n)
        res["sampled"] = metrics_from_ranks(ranks, ks, ndcg_log)
    if protocol in ("full", "both"):
        res["full"] = phase_metrics(ranker, data, data.test, maxlen, ks, ndcg_log, dist)
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


def phase_metrics(ranker: Ranker, data: DeviceData, phase: Phase, maxlen: int,
                  ks: Sequence[int] = DEFAULT_KS, ndcg_log: str = "2",
                  dist=None) -> dict[str, float]:
    """Full-ranking metrics of a phase's queries (`data.val` or `data.test`); Recall@K as
    well unless the split is leave-one-out (where it is HR@K). With `dist`, each process
    ranks its share of the queries and the positions are gathered, so every process
    returns the same metrics."""
    if dist is None:
        ranks = target_ranks(ranker, data, phase, maxlen)
    else:
        lo, hi = dist.bounds(phase.n)
        # every process's share of the targets, known to all from the query bounds
        edges = torch.searchsorted(phase.rank_owner, torch.tensor(
            [dist.bounds(phase.n, r)[0] for r in range(dist.world)] + [phase.n],
            device=phase.rank_owner.device)).tolist()
        sizes = [edges[r + 1] - edges[r] for r in range(dist.world)]
        ranks = dist.gather(target_ranks(ranker, data, phase, maxlen, queries=(lo, hi)),
                            phase.rank_rows.shape[0], sizes)
    return metrics_from_ranks(ranks, ks, ndcg_log, phase.rank_owner,
                              recall=not data.leave_one_out)
