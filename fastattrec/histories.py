"""New or updated histories scored without retraining (docs/spec.md §4.10).

A history is a user's items, oldest first. Its window is its last L items the model
knows; a user of the dataset keeps their long-term embedding (and their dataset history
counts as seen), a user the model was not trained on gets the mean trained user. Histories
come as a mapping {user: [items]} (Python, `recommend --history`) or as a table of user,
item (and optionally time) rows (`recommend --histories FILE`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from fastattrec.errors import UserError, first_error_line, quoted, shown
from fastattrec.recommend import id_texts, match_ids, top_k_of, whole_ids
from fastattrec.runs import LoadedRun

USER_COLUMNS = ("user", "raw_user", "user_id", "userId", "UserID", "uid", "user_id:token")
ITEM_COLUMNS = ("item", "raw_item", "item_id", "movieId", "movie_id", "MovieID", "iid",
                "item_id:token")
TIME_COLUMNS = ("time", "timestamp", "Timestamp", "date", "datetime", "ts",
                "timestamp:float")
FILE_HINT = ("give a CSV, TSV, Parquet or JSON-lines file of user and item columns (and "
             "optionally time), one row per interaction, each user's rows oldest first")


@dataclass
class Histories:
    """Queries in the order first given: the user as given, their user row (0: new), and
    their known item rows, oldest first, `counts[b]` for query b."""

    raw_users: pl.Series  # (B,)
    users: np.ndarray  # (B,) int64
    items: np.ndarray  # (S,) int64
    counts: np.ndarray  # (B,) int64
    order: str = "as given"  # how each user's rows were ordered: by which column, or as given


def from_mapping(run: LoadedRun, histories: Any, skip_unknown: bool,
                 source: str = "histories") -> Histories:
    """{user: [items oldest first]} -> Histories; a key of None is a new user without an
    id. Each user once; every history needs an item the model knows."""
    if not isinstance(histories, dict) or not histories:
        raise UserError(f"histories must be a non-empty dict of user -> list of item ids "
                        f"(oldest first), or a frame of user, item rows; got "
                        f"{shown(histories)}.")
    users, items = [], []
    for key, seq in histories.items():
        if isinstance(seq, str | bytes) or not hasattr(seq, "__iter__"):
            raise UserError(f"the history of user {shown(key)} must be a list of item ids, "
                            f"got {shown(seq)}.")
        seq = list(seq)
        if not seq:
            raise UserError(f"the history of user {shown(key)} is empty; give at least one "
                            f"item.")
        users += [key] * len(seq)
        items += seq
    keys = list(histories)
    texts = id_texts(keys)
    if texts.is_duplicated().any():
        twice = keys[int(texts.is_duplicated().arg_max())]
        raise UserError(f"user {shown(twice)} is given twice in histories (as text and as a "
                        f"number); give each user one history.")
    given = pl.DataFrame({"key": id_texts(users), "item": id_texts(items)})
    shown_users = _typed_users(run, keys)
    return _build(run, given, pl.DataFrame({"key": id_texts(keys), "raw_user": shown_users}),
                  source, skip_unknown)


def from_frame(run: LoadedRun, frame: pl.DataFrame, source: str,
               skip_unknown: bool) -> Histories:
    """A table of user, item (and optionally time) rows -> Histories: each user's rows in
    time order (stable), else in the table's order."""
    cols = frame.columns
    user_col = _column(cols, USER_COLUMNS, "user", source)
    item_col = _column(cols, ITEM_COLUMNS, "item", source)
    time_col = next((c for c in TIME_COLUMNS if c in cols), None)
    if frame.height == 0:
        raise UserError(f"{source} holds no rows; {FILE_HINT}.")
    rows = frame.select(pl.col(user_col).alias("user"), pl.col(item_col).alias("item"),
                        *([pl.col(time_col).alias("time")] if time_col else []))
    rows = rows.with_columns(whole_ids(rows.get_column("user")),
                             whole_ids(rows.get_column("item")))
    for col, what in ((user_col, "user"), (item_col, "item")):
        if rows.get_column(what).null_count():
            n = int(rows.get_column(what).is_null().arg_max()) + 1
            raise UserError(f"{source}, row {n}: no {what} id in column {shown(col)}; each "
                            f"row needs one.")
    raw = rows.get_column("user").unique(maintain_order=True)  # users in the file's order
    if time_col:
        rows = rows.with_columns(_times(rows.get_column("time"), time_col, source))
        rows = rows.with_row_index("order").sort(["time", "order"]).drop("order")
    given = rows.select(pl.col("user").cast(pl.String).alias("key"),
                        pl.col("item").cast(pl.String))
    keys = raw.cast(pl.String)
    if run.prepared.raw_users.dtype.is_integer() and raw.dtype == pl.String:
        as_int = raw.cast(pl.Int64, strict=False)
        if not as_int.null_count() and bool((as_int.cast(pl.String) == raw).all()):
            raw = as_int  # integer ids read as text: shown as the dataset's integers
    h = _build(run, given, pl.DataFrame({"key": keys, "raw_user": raw}), source, skip_unknown)
    h.order = (f"by column {shown(time_col)}" if time_col else
               f"in the order of the rows (no time column: {', '.join(TIME_COLUMNS[:4])}, ...)")
    return h


def read_histories(path: Path) -> pl.DataFrame:
    """A histories file as a frame (ids as text, times as read): CSV or TSV with a header,
    Parquet, or JSON lines."""
    path = Path(path)
    if not path.is_file():
        why = "does not exist" if not path.exists() else "is not a file"
        raise UserError(f"{quoted(path)} {why}; {FILE_HINT}.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pl.read_parquet(path)
        if suffix in (".jsonl", ".ndjson"):
            return pl.read_ndjson(path)
        first = path.open("rb").readline()
        sep = "\t" if b"\t" in first else ","
        return pl.read_csv(path, separator=sep, infer_schema=False)
    except Exception as e:  # noqa: BLE001 - Polars' parse errors: one sentence
        raise UserError(f"cannot read {quoted(path)} ({first_error_line(e, 160)}); "
                        f"{FILE_HINT}.") from None


def recommend_histories(run: LoadedRun, h: Histories, k: int,
                        titles: pl.DataFrame | None = None) -> pl.DataFrame:
    """raw_user, rank, raw_item, score (and title) for each history's top k unseen items."""
    from fastattrec.recommend import ranked_frame

    dev = run.data.device
    users = torch.as_tensor(h.users, device=dev)
    counts = torch.as_tensor(h.counts, device=dev)
    items = torch.as_tensor(h.items, device=dev)
    windows = windows_of(items, counts, run.model.cfg.maxlen)  # (B, L)
    seen, seen_counts = _seen(run, users, items, counts)
    top, scores = top_k_of(run, users, windows, seen, seen_counts, k)
    return ranked_frame(run, h.raw_users, top, scores, titles)


def windows_of(items: torch.Tensor, counts: torch.Tensor, maxlen: int) -> torch.Tensor:
    """(B, L) windows of each query's last L items, pre-padded with 0 (docs/spec.md §1.6)."""
    end = torch.cumsum(counts, 0)  # (B,) one past each query's last item
    slot = torch.arange(maxlen, device=items.device)  # (L,)
    idx = end[:, None] - maxlen + slot[None, :]  # (B, L)
    valid = slot[None, :] >= (maxlen - counts)[:, None]
    return torch.where(valid, items[idx.clamp(min=0)], 0)


def _seen(run: LoadedRun, users: torch.Tensor, items: torch.Tensor,
          counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's seen items: its dataset history (a known user) then the given one."""
    data = run.data
    known = torch.where(users > 0, data.lengths[users], 0)  # (B,)
    q_known = torch.repeat_interleave(torch.arange(users.shape[0], device=users.device), known)
    within = (torch.arange(int(known.sum()), device=users.device)
              - torch.repeat_interleave(torch.cumsum(known, 0) - known, known))
    old = data.items[data.offsets[users][q_known] + within]  # (S1,)
    q_new = torch.repeat_interleave(torch.arange(users.shape[0], device=users.device), counts)
    order = torch.argsort(torch.cat([q_known, q_new]), stable=True)
    return torch.cat([old, items])[order], known + counts


def _build(run: LoadedRun, given: pl.DataFrame, queries: pl.DataFrame, source: str,
           skip_unknown: bool) -> Histories:
    """given: key, item text rows (each key's in order); queries: key, raw_user per user."""
    prepared = run.prepared
    item = match_ids(prepared.raw_items, prepared.item_rows, given.get_column("item"))
    given = given.with_columns(pl.Series("row", item))
    unknown = given.filter(pl.col("row") == 0)
    if unknown.height and not skip_unknown:
        first = unknown.row(0, named=True)
        n = unknown.get_column("item").n_unique()
        more = f" (and {n - 1:,} other item{'s' if n > 2 else ''})" if n > 1 else ""
        raise UserError(f"item {shown(first['item'])}{more} in {source} is not an item of the "
                        f"run's dataset ({quoted(prepared.path)}), so the model has no "
                        f"embedding for it; check the ids, or leave such items out "
                        f"(--skip-unknown-items; skip_unknown=True in Python).")
    kept = given.filter(pl.col("row") > 0)
    per = queries.join(kept.group_by("key", maintain_order=True).agg(pl.len().alias("n")),
                       on="key", how="left", maintain_order="left")
    empty = per.filter(pl.col("n").is_null())
    if empty.height:
        who = empty.get_column("raw_user")[0]
        whose = "the history" if who is None else f"the history of user {shown(who)}"
        raise UserError(f"{whose} in {source} has no item the model knows, so there is no "
                        f"window to score; give at least one item of the run's dataset.")
    order = pl.DataFrame({"key": queries.get_column("key")}).with_row_index("q")
    kept = kept.join(order, on="key", how="left", maintain_order="left")
    kept = kept.with_row_index("pos").sort(["q", "pos"])
    users = match_ids(prepared.raw_users, np.arange(1, prepared.raw_users.len() + 1),
                      queries.get_column("key"))
    return Histories(queries.get_column("raw_user"), users,
                     kept.get_column("row").to_numpy().astype(np.int64),
                     per.get_column("n").to_numpy().astype(np.int64))


def _times(t: pl.Series, col: str, source: str) -> pl.Series:
    """A time column as numbers (as read, or text of numbers) or as dates (text parsed, a
    zone's offset converted to UTC), so that rows sort by time, not by text; a missing or
    unreadable time is refused naming its row."""
    if t.null_count():
        raise UserError(f"{source}, row {int(t.is_null().arg_max()) + 1}: no time in column "
                        f"{shown(col)}; give every row a time, or drop the column.")
    if t.dtype.is_numeric() or t.dtype.is_temporal():
        return t.cast(pl.Float64) if t.dtype.is_numeric() else t
    text = t.cast(pl.String).str.strip_chars()
    num = text.cast(pl.Float64, strict=False)
    if not num.null_count():
        return num
    for zone in (None, "UTC"):
        try:
            when = text.str.to_datetime(strict=False, time_unit="us", time_zone=zone)
        except Exception:  # noqa: BLE001 - a format Polars cannot infer: try the next
            continue
        if not when.null_count():
            return when.dt.epoch("us").cast(pl.Float64)
    bad = int(num.is_null().arg_max()) + 1
    raise UserError(f"{source}, row {bad}: time {shown(text[bad - 1])} in column "
                    f"{shown(col)} is neither a number nor a date; give numbers, or dates "
                    f"such as 2024-01-05 10:00:00 (with or without a zone, not mixed).")


def _typed_users(run: LoadedRun, keys: list) -> pl.Series:
    """The users as given, as one column: the dataset's integer type when every key is an
    integer, else text (None stays null: a new user without an id)."""
    if all(isinstance(k, int) and not isinstance(k, bool) or k is None for k in keys):
        return pl.Series("raw_user", keys, dtype=pl.Int64)
    return pl.Series("raw_user", [None if k is None else str(k) for k in keys],
                     dtype=pl.String)


def _column(cols: list[str], names: tuple[str, ...], what: str, source: str) -> str:
    found = next((c for c in names if c in cols), None)
    if found is None:
        lower = {c.lower(): c for c in cols}
        found = next((lower[n.lower()] for n in names if n.lower() in lower), None)
    if found is None:
        raise UserError(f"{source} has no {what} column (its columns are "
                        f"{shown(', '.join(cols) or 'none', 200)}; it needs one of "
                        f"{', '.join(names)}); {FILE_HINT}.")
    return found
