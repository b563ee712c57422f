"""Top-K recommendations from each user's latest window, seen items excluded."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import torch

from fastattrec.atomic import atomic_path
from fastattrec.errors import UserError, quoted, shown
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
        if not bool(torch.isfinite(g[:, data.item_valid]).all()):
            raise UserError(f"the model's scores are not finite numbers (its weights overflow "
                            f"when combined) in {quoted(run.run_dir)}; this checkpoint cannot rank "
                            f"items — train again with a lower --lr.")
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


RECOMMEND_MARK = {"fastattrec": "recommendations"}  # Parquet metadata of what recommend writes


def write_recommendations(frame: pl.DataFrame, path: Path) -> None:
    """Write the frame atomically, marked so that a later `--force` may replace it."""
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, metadata=RECOMMEND_MARK)


def made_by_recommend(path: Path) -> bool:
    """True when `path` is a Parquet file that `recommend` wrote (its metadata says so)."""
    try:
        meta = pl.read_parquet_metadata(path)
    except Exception:  # noqa: BLE001 - not Parquet, unreadable: not ours either way
        return False
    return meta.get("fastattrec") == RECOMMEND_MARK["fastattrec"]


def dense_users(run: LoadedRun, raw_ids: list) -> np.ndarray:
    """Dense ids of raw user ids (as given on the command line or in Python), in order.
    Integer ids are matched by their exact decimal text ('10', never '1_0' or ' 10')."""
    raw = run.prepared.raw_users
    if raw.dtype.is_integer():
        values: list = []
        for v in raw_ids:
            text = str(v) if not isinstance(v, bool) else ""
            if not _DECIMAL.fullmatch(text):
                raise UserError(f"user ids in this dataset are integers; {shown(v)} is not "
                                f"one.")
            n = int(text)
            values.append(n if -(2**63) <= n < 2**63 else None)  # None: cannot be present
        query = pl.Series(values, dtype=pl.Int64)
    else:
        query = pl.Series([str(v) for v in raw_ids], dtype=pl.String)
    table = pl.DataFrame({"raw": raw.cast(query.dtype), "dense": np.arange(1, raw.len() + 1)})
    found = pl.DataFrame({"raw": query}).join(table, on="raw", how="left",
                                               maintain_order="left", nulls_equal=False)
    missing = [v for v, d in zip(raw_ids, found.get_column("dense"), strict=True) if d is None]
    if missing:
        raise UserError(f"user {shown(missing[0])} is not in the prepared data "
                        f"({quoted(run.prepared.path)}); users with one interaction are dropped.")
    return found.get_column("dense").to_numpy().astype(np.int64)


_DECIMAL = re.compile(r"-?[0-9]+")


def item_lookup(run: LoadedRun) -> pl.DataFrame:
    """item row -> raw item id."""
    return pl.DataFrame({"item": run.prepared.item_rows, "raw_item": run.prepared.raw_items})


def read_titles(movies: Path) -> pl.DataFrame:
    """MovieLens movies.dat (`MovieID::Title::Genres`, Latin-1) -> raw_item, title."""
    movies = Path(movies)
    hint = "give MovieLens' movies.dat (MovieID::Title::Genres) with --movies"
    if not movies.exists():
        raise UserError(f"{quoted(movies)} does not exist; {hint}.")
    if movies.is_dir():
        raise UserError(f"{quoted(movies)} is a folder; {hint}.")
    if not movies.is_file():
        raise UserError(f"{quoted(movies)} is not a regular file (a pipe or device); {hint}.")
    try:
        text = movies.read_bytes().decode("latin-1")
    except OSError as e:
        raise UserError(f"cannot read {quoted(movies)} ({e.strerror}); {hint}.") from None
    ids, titles, first = [], [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3 or not parts[0].strip().lstrip("-").isdigit():
            raise UserError(f"{quoted(movies)}, line {n}: expected 'MovieID::Title::Genres' "
                            f"but found {shown(line)}; {hint}.")
        movie = int(parts[0])
        if movie in first:
            raise UserError(f"{quoted(movies)}, line {n}: MovieID {movie} already appeared on line "
                            f"{first[movie]}; each movie needs one line.")
        first[movie] = n
        ids.append(movie)
        titles.append(parts[1])
    if not ids:
        raise UserError(f"{quoted(movies)} holds no titles; {hint}.")
    return pl.DataFrame({"raw_item": ids, "title": titles})


def check_titles(titles: pl.DataFrame) -> None:
    """A titles frame given in Python: one row per raw_item, with a title column."""
    missing = [c for c in ("raw_item", "title") if c not in titles.columns]
    if missing:
        raise UserError(f"titles lacks column(s) {', '.join(missing)} (it has "
                        f"{shown(', '.join(titles.columns) or 'none')}); give a frame of "
                        f"raw_item and title, or the path of MovieLens' movies.dat.")
    if titles.get_column("raw_item").is_duplicated().any():
        first = titles.filter(pl.col("raw_item").is_duplicated()).get_column("raw_item")[0]
        raise UserError(f"titles has raw_item {shown(first)} more than once; give each item "
                        f"one title.")


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
    # A user with fewer than k unseen items: the rest of the top k are seen (or padding)
    # items at -inf, which are not recommendations.
    frame = frame.filter(pl.col("score") > -math.inf)
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
