"""Top-K recommendations from each user's latest window, seen items excluded."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import torch

from fastattrec.errors import UserError, first_error_line, quoted, shown
from fastattrec.runs import LoadedRun


@torch.no_grad()
def top_k(run: LoadedRun, users: torch.Tensor, k: int,
          chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) item rows and goodness for dense `users` (B,) from their latest window,
    excluding the items of their history."""
    data = run.data
    n = data.lengths[users]  # (B,)
    start = torch.repeat_interleave(data.offsets[users] - (torch.cumsum(n, 0) - n), n)
    seen = data.items[start + torch.arange(int(n.sum()), device=n.device)]  # (S,) by user
    return top_k_of(run, users, data.latest_windows(users, run.model.cfg.maxlen), seen, n,
                    k, chunk)


@torch.no_grad()
def top_k_of(run: LoadedRun, users: torch.Tensor, windows: torch.Tensor, seen: torch.Tensor,
             counts: torch.Tensor, k: int,
             chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) item rows and goodness for queries of user rows `users` (B,; 0: a new user,
    scored with the mean user, `AttRec.user_rows`) with windows (B, L), excluding each
    query's seen items: `seen` (S,) item rows, `counts[b]` (B,) of them for query b."""
    data, model = run.data, run.model
    k = min(k, int(data.item_valid.sum()))
    ends = torch.cumsum(counts, 0)  # (B,)
    items, scores = [], []
    for lo in range(0, users.shape[0], chunk):
        hi = min(lo + chunk, users.shape[0])
        u, w = users[lo:hi], windows[lo:hi]
        g = model.goodness_of_rows(model.user_rows(u), model.short_term(w))  # (b, I)
        if not bool(torch.isfinite(g[:, data.item_valid]).all()):
            raise UserError(f"the model's scores are not finite numbers (its weights overflow "
                            f"when combined) in {quoted(run.run_dir)}; this checkpoint cannot rank "
                            f"items — train again with a lower --lr.")
        g[:, ~data.item_valid] = -math.inf
        first = int(ends[lo - 1]) if lo else 0
        row = torch.repeat_interleave(torch.arange(hi - lo, device=u.device), counts[lo:hi])
        g[row, seen[first:int(ends[hi - 1])]] = -math.inf
        s, i = torch.topk(g, k, dim=1)
        items.append(i)
        scores.append(s)
    return torch.cat(items), torch.cat(scores)


def match_ids(raw: pl.Series, rows: np.ndarray, given: pl.Series) -> np.ndarray:
    """The row (`rows[j]` for `raw[j]`) of each given id as text (G,), 0 where the dataset
    has no such id. Integer ids match by their exact decimal text ('10', never '1_0' or
    ' 10'); text ids by their text."""
    texts = given.cast(pl.String)
    if raw.dtype.is_integer():
        query = (pl.when(texts.str.contains(r"^(0|-?[1-9][0-9]{0,18})$"))
                 .then(texts).otherwise(None))
        query = pl.select(query.cast(pl.Int64, strict=False)).to_series()
    else:
        query = texts
    table = pl.DataFrame({"raw": raw.cast(query.dtype), "row": rows.astype(np.int64)})
    found = pl.DataFrame({"raw": query}).join(table, on="raw", how="left",
                                               maintain_order="left", nulls_equal=False)
    return found.get_column("row").fill_null(0).to_numpy().astype(np.int64)


def whole_ids(ids: pl.Series) -> pl.Series:
    """Ids stored as floats (1.0, as a table with missing values often holds them) as text,
    whole numbers written as the integers they are ('1'), so they match the dataset's
    integer ids; a series of another type unchanged."""
    if not ids.dtype.is_float():
        return ids
    whole = ids.is_finite() & (ids % 1 == 0)
    return pl.select(pl.when(whole).then(ids.cast(pl.Int64, strict=False).cast(pl.String))
                     .otherwise(ids.cast(pl.String)).alias(ids.name)).to_series()


def id_texts(values: list) -> pl.Series:
    """Ids given in Python or on the command line as text (a bool is no id: '')."""
    return pl.Series([("" if isinstance(v, bool) or v is None else str(v)) for v in values],
                     dtype=pl.String)


def dense_users(run: LoadedRun, raw_ids: list) -> np.ndarray:
    """Dense ids of raw user ids (as given on the command line or in Python), each user
    once, in the order first given ('42' and 42 are one user when the dataset's ids are
    integers); an id not in the dataset is refused in one sentence naming it."""
    raw = run.prepared.raw_users
    texts = id_texts(raw_ids)
    if raw.dtype.is_integer():
        for v, text in zip(raw_ids, texts, strict=True):
            if not _DECIMAL.fullmatch(text):
                raise UserError(f"user ids in this dataset are integers; {shown(v)} is not "
                                f"one.")
    dense = match_ids(raw, np.arange(1, raw.len() + 1), texts)
    missing = [v for v, d in zip(raw_ids, dense, strict=True) if d == 0]
    if missing:
        more = len(set(map(str, missing))) - 1
        others = f" (and {more:,} other given user{'s' if more > 1 else ''})" if more else ""
        raise UserError(f"user {shown(missing[0])}{others} is not in the prepared data "
                        f"({quoted(run.prepared.path)}); users with one interaction are dropped.")
    _, first = np.unique(dense, return_index=True)
    return dense[np.sort(first)]  # one list per user, in the order first given


_DECIMAL = re.compile(r"0|-?[1-9][0-9]*")  # an integer as it is written: not 007, not -0


def item_lookup(run: LoadedRun) -> pl.DataFrame:
    """item row -> raw item id."""
    return pl.DataFrame({"item": run.prepared.item_rows, "raw_item": run.prepared.raw_items})


# ---- item titles: the item file a dataset came with, checked against the run's dataset ----

# Column names taken as the item id and the title in a CSV, TSV, Parquet or RecBole file,
# in order of preference (a RecBole name is compared without its `:type` suffix).
ID_COLUMNS = ("raw_item", "item_id", "item", "movieId", "movie_id", "MovieID", "iid")
TITLE_COLUMNS = ("title", "movie_title", "Title", "item_name", "name")
ITEMS_HINT = ("give the dataset's item file with --items: MovieLens movies.dat "
              "(MovieID::Title::Genres), ML-100K u.item (id|title|...), a RecBole .item file, "
              "or a CSV, TSV or Parquet file with an id column (raw_item, item_id, item or "
              "movieId) and a title column")


def read_titles(path: Path) -> pl.DataFrame:
    """An item file -> raw_item (the id as written, text), title. The format is told from
    the name and first line: MovieLens movies.dat (`::`), ML-100K u.item (`|`), RecBole
    `.item` (tab, typed header), CSV/TSV with a header, Parquet. Text is read as UTF-8, or
    as Latin-1 (MovieLens' encoding) when it is not UTF-8."""
    path = Path(path)
    why = ("does not exist" if not path.exists() else "is a folder" if path.is_dir()
           else None if path.is_file() else "is not a regular file (a pipe or device)")
    if why:
        raise UserError(f"{quoted(path)} {why}; {ITEMS_HINT}.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {quoted(path)} ({e.strerror}); {ITEMS_HINT}.") from None
    if data[:4] == b"PAR1" or path.suffix.lower() in (".parquet", ".pq"):
        return _from_columns(path, _read_parquet(path), "row", 1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), None)
    if first is None:
        raise UserError(f"{quoted(path)} holds no titles; {ITEMS_HINT}.")
    if "::" in first:
        return _from_lines(path, lines, "::", "expected 'MovieID::Title::Genres'", "MovieID",
                           exact=3)
    head = first.split("|")
    if len(head) >= 2 and _DECIMAL.fullmatch(head[0].strip()):  # u.item is also `.item`
        return _from_lines(path, lines, "|", "expected ML-100K's 'movie id|movie title|...'",
                           "movie id")
    if path.suffix.lower() == ".item" or re.search(r":(token|token_seq|float)\b", first):
        return _recbole(path, lines)
    if "\t" in first or "," in first:
        return _from_columns(path, _read_csv(path, text, "\t" if "\t" in first else ","),
                             "line", 2)
    raise UserError(f"{quoted(path)}: cannot tell the format from its first line "
                    f"{shown(first)}; {ITEMS_HINT}.")


def _from_lines(path: Path, lines: list[str], sep: str, shape: str, id_name: str,
                exact: int | None = None) -> pl.DataFrame:
    """MovieLens' item files: one item a line, integer id first, title second."""
    ids, titles, first = [], [], {}
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.split(sep)
        bad = len(parts) != exact if exact else len(parts) < 2
        if bad or not _DECIMAL.fullmatch(parts[0].strip()):
            raise UserError(f"{quoted(path)}, line {n}: {shape} but found "
                            f"{shown(line.replace(chr(9), ' '))}; {ITEMS_HINT}.")
        item = str(int(parts[0]))
        if item in first:
            raise UserError(f"{quoted(path)}, line {n}: {id_name} {item} already appeared on "
                            f"line {first[item]}; each item needs one line.")
        first[item] = n
        ids.append(item)
        titles.append(parts[1])
    return pl.DataFrame({"raw_item": ids, "title": titles}, schema=_TITLES_SCHEMA)


def _recbole(path: Path, lines: list[str]) -> pl.DataFrame:
    """A RecBole atomic `.item` file: tab-separated, header `name:type` per column."""
    start = next(i for i, line in enumerate(lines) if line.strip())
    names = [f.strip() for f in lines[start].split("\t")]
    bare = [f.split(":", 1)[0] for f in names]
    id_col, title_col = _pick(path, bare, ", ".join(names), f"line {start + 1}")
    need = max(id_col, title_col) + 1
    ids, titles, first = [], [], {}
    for n, line in enumerate(lines[start + 1:], start=start + 2):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < need or not parts[id_col].strip():
            raise UserError(f"{quoted(path)}, line {n}: expected {len(names)} tab-separated "
                            f"fields as its header names ({', '.join(names)}) but found "
                            f"{len(parts)}{' and no item id' if len(parts) >= need else ''}.")
        item = parts[id_col].strip()
        if item in first:
            raise UserError(f"{quoted(path)}, line {n}: item id {shown(item)} already appeared "
                            f"on line {first[item]}; each item needs one line.")
        first[item] = n
        ids.append(item)
        titles.append(parts[title_col])
    return pl.DataFrame({"raw_item": ids, "title": titles}, schema=_TITLES_SCHEMA)


_TITLES_SCHEMA = {"raw_item": pl.String, "title": pl.String}


def _pick(path: Path, names: list[str], listed: str, where: str) -> tuple[int, int]:
    """Positions of the id and title columns among `names` (exact name first, then any
    case); one sentence naming the columns found when either is missing."""
    found = []
    for wanted, what in ((ID_COLUMNS, "item id"), (TITLE_COLUMNS, "title")):
        pos = next((names.index(w) for w in wanted if w in names), None)
        if pos is None:
            lower = [n.lower() for n in names]
            pos = next((lower.index(w.lower()) for w in wanted if w.lower() in lower), None)
        if pos is None:
            raise UserError(f"{quoted(path)} has no {what} column ({where} names "
                            f"{shown(listed or 'none', 200)}; it needs one of "
                            f"{', '.join(wanted)}); {ITEMS_HINT}.")
        found.append(pos)
    return found[0], found[1]


def _read_csv(path: Path, text: str, sep: str) -> pl.DataFrame:
    try:
        return pl.read_csv(text.encode("utf-8"), separator=sep, infer_schema=False)
    except Exception as e:  # noqa: BLE001 - Polars' parse errors: one sentence
        first = first_error_line(e, 160)
        raise UserError(f"cannot read {quoted(path)} as a {'TSV' if sep == chr(9) else 'CSV'} "
                        f"file with a header ({first}); {ITEMS_HINT}.") from None


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        return pl.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - damaged or not Parquet: one sentence
        first = first_error_line(e, 160)
        raise UserError(f"cannot read {quoted(path)} as Parquet ({first}); "
                        f"{ITEMS_HINT}.") from None


def _from_columns(path: Path, frame: pl.DataFrame, word: str, first_row: int) -> pl.DataFrame:
    """A CSV, TSV or Parquet item table: its id and title columns, ids as text."""
    id_col, title_col = _pick(path, frame.columns, ", ".join(frame.columns), "its header")
    ids = whole_ids(frame.to_series(id_col))
    out = pl.DataFrame({"raw_item": ids.cast(pl.String).str.strip_chars(),
                        "title": frame.to_series(title_col).cast(pl.String)})
    col = frame.columns[id_col]
    if out.get_column("raw_item").null_count():
        n = int(out.get_column("raw_item").is_null().arg_max()) + first_row
        raise UserError(f"{quoted(path)}, {word} {n}: no item id in column {shown(col)}; "
                        f"each line needs one.")
    dup = out.get_column("raw_item").is_duplicated()
    if dup.any():
        rows = dup.arg_true()
        item = out.get_column("raw_item")[int(rows[0])]
        again = [int(r) for r in rows if out.get_column("raw_item")[int(r)] == item]
        raise UserError(f"{quoted(path)}, {word} {again[1] + first_row}: item id {shown(item)} "
                        f"already appeared on {word} {again[0] + first_row}; each item needs "
                        f"one {word}.")
    return out


def check_titles(titles: pl.DataFrame) -> None:
    """A titles frame given in Python: one row per raw_item, with a title column."""
    missing = [c for c in ("raw_item", "title") if c not in titles.columns]
    if missing:
        raise UserError(f"titles lacks column(s) {', '.join(missing)} (it has "
                        f"{shown(', '.join(titles.columns) or 'none')}); give a frame of "
                        f"raw_item and title, or the path of the dataset's item file.")
    if titles.get_column("raw_item").is_duplicated().any():
        first = titles.filter(pl.col("raw_item").is_duplicated()).get_column("raw_item")[0]
        raise UserError(f"titles has raw_item {shown(first)} more than once; give each item "
                        f"one title.")


def match_titles(run: LoadedRun, titles: pl.DataFrame, source: str,
                 allow_missing: bool = False) -> pl.DataFrame:
    """raw_item (the dataset's type) -> title for every item of the run's dataset, ids
    compared as text. Refused in one sentence: a file sharing no id with the dataset, and
    unless `allow_missing`, one lacking any of the dataset's items or one that plainly
    belongs to another dataset (most of its ids are not the dataset's, or most of the
    dataset's are not in it). With `allow_missing` a missing title is null."""
    raw = run.prepared.raw_items
    ours = pl.DataFrame({"raw_item": raw, "key": raw.cast(pl.String)})
    theirs = pl.DataFrame({"key": titles.get_column("raw_item").cast(pl.String),
                           "title": titles.get_column("title").cast(pl.String)})
    joined = ours.join(theirs, on="key", how="left", maintain_order="left")
    has = joined.get_column("key").is_in(theirs.get_column("key").implode())
    n_ours, n_theirs = ours.height, theirs.height
    missing = n_ours - int(has.sum())
    foreign = n_theirs - int(theirs.get_column("key").is_in(ours.get_column("key").implode())
                             .sum())
    data = quoted(run.prepared.path)
    if missing == n_ours:
        raise UserError(f"none of the {n_theirs:,} ids in {source} is an item of the run's "
                        f"dataset ({data}: its first item is {shown(ours['key'][0])}, the "
                        f"file's first id {shown(theirs['key'][0])}); it belongs to another "
                        f"dataset — give the item file of the data the run was prepared from.")
    if not allow_missing and (2 * missing > n_ours or 2 * foreign > n_theirs):
        raise UserError(f"{source} looks like another dataset's item file: {missing:,} of the "
                        f"{n_ours:,} items of the run's dataset ({data}) are not in it and "
                        f"{foreign:,} of its {n_theirs:,} ids are not the dataset's; give the "
                        f"item file of the data the run was prepared from, or pass "
                        f"--allow-missing to use this one anyway (titles it lacks are left "
                        f"empty).")
    if not allow_missing and missing:
        first = joined.filter(~has).get_column("key")[0]
        raise UserError(f"{source} has no title for {missing:,} of the {n_ours:,} items of "
                        f"the run's dataset ({data}), item {shown(first)} the first; give the "
                        f"item file of the data the run was prepared from, or pass "
                        f"--allow-missing to leave those titles empty.")
    return joined.select("raw_item", "title")

def recommend_frame(run: LoadedRun, users: torch.Tensor, k: int,
                    titles: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per (user, rank) for dense `users` (B,) from their latest window: raw user,
    rank 1..k, raw item, score (and title, from `match_titles`)."""
    items, scores = top_k(run, users, k)
    raw = run.prepared.raw_users.gather(pl.Series(users.cpu().numpy() - 1))
    return ranked_frame(run, raw, items, scores, titles)


def ranked_frame(run: LoadedRun, raw_users: pl.Series, items: torch.Tensor,
                 scores: torch.Tensor, titles: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per (query, rank) from top-k item rows and scores (B, k) of the queries
    whose users are `raw_users` (B,): raw_user, rank, raw_item, score (and title)."""
    b, kk = items.shape
    frame = pl.DataFrame({
        "query": np.repeat(np.arange(b), kk),
        "rank": np.tile(np.arange(1, kk + 1), b),
        "item": items.cpu().numpy().ravel().astype(np.int32),
        "score": scores.cpu().numpy().ravel(),
    })
    # A user with fewer than k unseen items: the rest of the top k are seen (or padding)
    # items at -inf, which are not recommendations.
    frame = frame.filter(pl.col("score") > -math.inf)
    queries = pl.DataFrame({"query": np.arange(b), "raw_user": raw_users})
    frame = (frame.join(queries, on="query", how="left", maintain_order="left")
             .join(item_lookup(run), on="item", how="left", maintain_order="left"))
    if titles is not None:  # from match_titles: raw_item has the dataset's type
        frame = frame.join(titles, on="raw_item", how="left", maintain_order="left")
    cols = ["raw_user", "rank", "raw_item", "score"] + (["title"] if titles is not None else [])
    return frame.select(cols)
