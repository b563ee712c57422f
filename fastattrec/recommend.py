"""Top-K recommendations from each user's latest window, seen items excluded."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from fastattrec.errors import UserError
from fastattrec.evaluate import ModelRanker
from fastattrec.runs import LoadedRun


@torch.no_grad()
def top_k(run: LoadedRun, users: torch.Tensor, k: int,
          chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) item rows and goodness for dense `users` (B,), excluding seen items."""
    data, ranker = run.data, ModelRanker(run.model)
    maxlen = run.model.cfg.maxlen
    k = min(k, int(data.item_valid.sum()))
    items, scores = [], []
    for lo in range(0, users.shape[0], chunk):
        u = users[lo:lo + chunk]
        g = ranker.goodness_all(u, data.latest_windows(u, maxlen)).clone()  # (b, I)
        g[:, ~data.item_valid] = -math.inf
        n = data.lengths[u]
        b = torch.repeat_interleave(torch.arange(u.shape[0], device=u.device), n)
        within = torch.arange(b.shape[0], device=u.device) - torch.repeat_interleave(
            torch.cumsum(n, 0) - n, n)
        g[b, data.items[data.offsets[u][b] + within]] = -math.inf
        s, i = torch.topk(g, k, dim=1)
        items.append(i)
        scores.append(s)
    return torch.cat(items), torch.cat(scores)


def dense_user(run: LoadedRun, raw_user: str) -> int:
    """The dense id of a raw user id given on the command line."""
    raw = run.prepared.raw_users
    value: object = raw_user
    if raw.dtype.is_integer():
        try:
            value = int(raw_user)
        except ValueError:
            raise UserError(f"user ids in this dataset are integers; {raw_user!r} is not one."
                            ) from None
    hits = np.flatnonzero((raw == value).to_numpy())
    if hits.size == 0:
        raise UserError(f"user {raw_user} is not in the prepared data "
                        f"({run.prepared.path}); users with one interaction are dropped.")
    return int(hits[0]) + 1


def item_lookup(run: LoadedRun) -> pl.DataFrame:
    """item row -> raw item id."""
    return pl.DataFrame({"item": run.prepared.item_rows, "raw_item": run.prepared.raw_items})


def read_titles(movies: Path) -> pl.DataFrame:
    """MovieLens movies.dat (`MovieID::Title::Genres`, Latin-1) -> raw_item, title."""
    if not Path(movies).exists():
        raise UserError(f"{movies} does not exist; give MovieLens' movies.dat.")
    text = Path(movies).read_bytes().decode("latin-1")
    rows = [line.split("::") for line in text.splitlines() if line.strip()]
    if not rows or any(len(r) < 2 for r in rows[:5]):
        raise UserError(f"{movies} is not a MovieLens movies.dat (MovieID::Title::Genres).")
    return pl.DataFrame({"raw_item": [int(r[0]) for r in rows], "title": [r[1] for r in rows]})


def recommend_frame(run: LoadedRun, users: torch.Tensor, k: int,
                    titles: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per (user, rank): raw user, rank 1..k, raw item, score (and title)."""
    items, scores = top_k(run, users, k)
    kk = items.shape[1]
    frame = pl.DataFrame({
        "user": np.repeat(users.cpu().numpy(), kk),
        "rank": np.tile(np.arange(1, kk + 1), users.shape[0]),
        "item": items.cpu().numpy().ravel().astype(np.int32),
        "score": scores.cpu().numpy().ravel(),
    })
    raw_users = pl.DataFrame({"user": np.arange(1, run.prepared.n_users + 1),
                              "raw_user": run.prepared.raw_users})
    frame = (frame.join(raw_users, on="user", how="left", maintain_order="left")
             .join(item_lookup(run), on="item", how="left", maintain_order="left"))
    if titles is not None:
        frame = frame.join(titles.with_columns(pl.col("raw_item").cast(frame.schema["raw_item"],
                                                                        strict=False)),
                           on="raw_item", how="left", maintain_order="left")
    cols = ["raw_user", "rank", "raw_item", "score"] + (["title"] if titles is not None else [])
    return frame.select(cols)
