"""Read a ratings log into one canonical lazy frame: user, item, rating, time, _line.

Supported inputs: MovieLens-1M `ratings.dat` (`::`), MovieLens-100K `u.data` (tab),
MovieLens-20M/25M `ratings.csv` (header), RecBole atomic `.inter` files, and any CSV, TSV
or Parquet file with named user/item/time (and optionally rating) columns.

Reading is lazy (`scan_*`) and typed, so the common case costs one parse. When Polars
refuses the file, a second, line-oriented pass finds the first bad line and explains it in
one sentence (`UserError`) instead of a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from fastattrec.errors import UserError

FORMATS = ("auto", "ml-1m", "ml-100k", "ml-20m", "recbole", "csv", "tsv", "parquet")

# Column names tried, in order, when --user-col/--item-col/... are not given.
_GUESS = {
    "user": ("user_id", "userId", "UserID", "user", "user_id:token", "uid"),
    "item": ("item_id", "movieId", "MovieID", "item", "item_id:token", "iid", "movie_id"),
    "time": ("timestamp", "Timestamp", "time", "ts", "timestamp:float", "datetime", "date"),
    "rating": ("rating", "Rating", "label", "score", "rating:float"),
}


@dataclass(frozen=True)
class ColumnNames:
    """Which input columns hold the user, item, time and (optional) rating."""

    user: str | None = None
    item: str | None = None
    time: str | None = None
    rating: str | None = None


@dataclass(frozen=True)
class Scan:
    """A typed lazy scan plus what is needed to explain a bad line."""

    frame: pl.LazyFrame  # columns: user, item, [rating], time, _line (1-based line in file)
    fmt: str
    has_rating: bool
    separator: str  # field separator as written in the file ("" for parquet)
    n_fields: int  # fields per line (0 for parquet)
    header_lines: int
    field_names: tuple[str, ...]  # canonical name of each field, "" for unused


def check_file(path: Path) -> None:
    """Fail with one sentence if `path` is missing, a folder or empty."""
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path.")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the ratings file inside it.")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; it needs one rating a line.")


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    return line.decode("utf-8", errors="replace")


def detect_format(path: Path) -> str:
    """Guess the format from the file name and its first line."""
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    line = _first_line(path)
    if "::" in line:
        return "ml-1m"
    if path.suffix.lower() == ".inter" or (":token" in line or ":float" in line):
        return "recbole"
    if line.strip().lower() == "userid,movieid,rating,timestamp":
        return "ml-20m"
    tab = line.split("\t")
    if len(tab) == 4 and all(f.strip().lstrip("-").isdigit() for f in tab):
        return "ml-100k"
    if "\t" in line:
        return "tsv"
    if "," in line:
        return "csv"
    raise UserError(
        f"{path}: cannot tell the format from its first line {line[:60]!r}; "
        f"pass --format (one of {', '.join(FORMATS[1:])})."
    )


def _movielens_scan(path: Path, fmt: str) -> Scan:
    if fmt == "ml-1m":
        # `::` is two one-byte separators with an empty field between them.
        names = ("user", "_s1", "item", "_s2", "rating", "_s3", "time")
        types = [pl.Int64, pl.String, pl.Int64, pl.String, pl.Float64, pl.String, pl.Int64]
        lf = pl.scan_csv(
            path, separator=":", has_header=False, quote_char=None,
            schema=dict(zip(names, types, strict=True)),
            row_index_name="_line", row_index_offset=1, encoding="utf8-lossy",
        )
        return Scan(lf, fmt, True, "::", 4, 0, ("user", "item", "rating", "time"))
    if fmt == "ml-100k":
        names = ("user", "item", "rating", "time")
        types = [pl.Int64, pl.Int64, pl.Float64, pl.Int64]
        lf = pl.scan_csv(
            path, separator="\t", has_header=False, quote_char=None,
            schema=dict(zip(names, types, strict=True)),
            row_index_name="_line", row_index_offset=1,
        )
        return Scan(lf, fmt, True, "\t", 4, 0, names)
    # ml-20m / ml-25m ratings.csv: userId,movieId,rating,timestamp with a header line.
    names = ("user", "item", "rating", "time")
    types = [pl.Int64, pl.Int64, pl.Float64, pl.Int64]
    lf = pl.scan_csv(
        path, separator=",", has_header=True, quote_char=None,
        new_columns=list(names), schema=dict(zip(names, types, strict=True)),
        row_index_name="_line", row_index_offset=2,
    )
    return Scan(lf, fmt, True, ",", 4, 1, names)


def _pick(kind: str, given: str | None, available: list[str], path: Path, required: bool):
    if given is not None:
        if given not in available:
            raise UserError(
                f"{path} has no column {given!r} (it has: {', '.join(available)}); "
                f"fix --{kind}-col."
            )
        return given
    for name in _GUESS[kind]:
        if name in available:
            return name
    if required:
        raise UserError(
            f"{path}: no {kind} column found among {', '.join(available)}; "
            f"name it with --{kind}-col."
        )
    return None


def _table_scan(path: Path, fmt: str, cols: ColumnNames) -> Scan:
    if fmt == "parquet":
        try:
            lf = pl.scan_parquet(path)
            available = list(lf.collect_schema().names())
        except pl.exceptions.PolarsError as e:
            raise UserError(f"{path} is not a readable Parquet file ({_first(e)}).") from None
        sep, header = "", 0
    else:
        sep = "\t" if fmt in ("tsv", "recbole") else ","
        header = 1
        try:
            available = list(
                pl.scan_csv(path, separator=sep, has_header=True, infer_schema=False)
                .collect_schema()
                .names()
            )
        except pl.exceptions.PolarsError as e:
            raise UserError(f"{path}: cannot read the header line ({_first(e)}).") from None
        if len(available) < 3:
            raise UserError(
                f"{path}, line 1: found {len(available)} column(s) separated by {sep!r}; "
                f"expected a header with user, item and time columns (wrong --format?)."
            )
    user = _pick("user", cols.user, available, path, True)
    item = _pick("item", cols.item, available, path, True)
    time = _pick("time", cols.time, available, path, True)
    rating = _pick("rating", cols.rating, available, path, False)
    chosen = {"user": user, "item": item, "time": time}
    if rating is not None:
        chosen["rating"] = rating
    if len(set(chosen.values())) != len(chosen):
        raise UserError(f"{path}: the same column is named for two roles ({chosen}).")
    if fmt == "parquet":
        lf = pl.scan_parquet(path, row_index_name="_line", row_index_offset=1)
    else:
        overrides = {}
        if rating is not None:
            overrides[rating] = pl.Float64
        lf = pl.scan_csv(
            path, separator=sep, has_header=True, infer_schema_length=10000,
            schema_overrides=overrides, row_index_name="_line", row_index_offset=2,
        )
    lf = lf.select(
        pl.col(user).alias("user"),
        pl.col(item).alias("item"),
        *([pl.col(rating).alias("rating")] if rating is not None else []),
        pl.col(time).alias("time"),
        pl.col("_line"),
    )
    field_names = tuple(
        {v: k for k, v in chosen.items()}.get(name, "") for name in available
    )
    return Scan(lf, fmt, rating is not None, sep, len(available), header, field_names)


def scan_ratings(path: Path, fmt: str = "auto", cols: ColumnNames | None = None) -> Scan:
    """Open `path` lazily as a typed frame of ratings (see module docstring)."""
    path = Path(path)
    check_file(path)
    cols = cols or ColumnNames()
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}.")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in ("ml-1m", "ml-100k", "ml-20m") and any(
        (cols.user, cols.item, cols.time, cols.rating)
    ):
        raise UserError(
            f"--user-col/--item-col/--time-col/--rating-col apply to csv, tsv, recbole and "
            f"parquet input; {path} is read as {fmt}, whose columns are fixed."
        )
    if fmt in ("ml-1m", "ml-100k", "ml-20m"):
        return _movielens_scan(path, fmt)
    return _table_scan(path, fmt, cols)


def _first(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def normalise_time(frame: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Make `time` sortable: numbers stay, dates and date strings become integers."""
    dtype = frame.schema["time"]
    if dtype.is_numeric():
        return frame
    if dtype == pl.String:
        parsed = frame.get_column("time").str.to_datetime(strict=False)
        bad = parsed.is_null() & frame.get_column("time").is_not_null()
        if bad.any():
            row = frame.filter(bad).row(0, named=True)
            raise UserError(
                f"{path}, line {row['_line']}, column 'time': {row['time']!r} is neither a "
                f"number nor a date; fix the value or choose another --time-col."
            )
        return frame.with_columns(parsed.dt.epoch("us").alias("time"))
    if dtype in (pl.Date,) or isinstance(dtype, pl.Datetime):
        return frame.with_columns(pl.col("time").cast(pl.Datetime("us")).dt.epoch("us"))
    raise UserError(f"{path}: the time column has type {dtype}; it must be numbers or dates.")


def check_values(frame: pl.DataFrame, scan: Scan, path: Path) -> None:
    """Explain the first missing value or stray separator field with its line number."""
    stray = [c for c in ("_s1", "_s2", "_s3") if c in frame.columns]
    if stray:
        bad = frame.filter(pl.any_horizontal(pl.col(c).is_not_null() for c in stray))
        if bad.height:
            raise UserError(
                f"{path}, line {bad.item(0, '_line')}: fields must be separated by '::' "
                f"(MovieLens-1M format); fix the line or pass the right --format."
            )
    needed = ["user", "item", "time"] + (["rating"] if scan.has_rating else [])
    nulls = frame.select(pl.any_horizontal(pl.col(c).is_null() for c in needed).alias("bad"))
    if nulls.get_column("bad").any():
        row = frame.filter(nulls.get_column("bad")).row(0, named=True)
        col = next(c for c in needed if row[c] is None)
        raise UserError(
            f"{path}, line {row['_line']}: the {col} field is missing (expected "
            f"{scan.n_fields or len(needed)} fields a line); fix or remove that line."
        )


def diagnose(path: Path, scan: Scan, error: Exception) -> UserError:
    """Find the first line that the typed reader refused and explain it."""
    if scan.fmt == "parquet":
        return UserError(f"{path}: cannot read the Parquet file ({_first(error)}).")
    lines = pl.scan_csv(
        path, separator="\x1f", has_header=False, quote_char=None,
        schema={"text": pl.String}, row_index_name="_line", row_index_offset=1,
        encoding="utf8-lossy",
    ).slice(scan.header_lines)
    sep = scan.separator
    want = scan.n_fields
    counted = lines.with_columns(
        (pl.col("text").fill_null("").str.count_matches(sep, literal=True) + 1).alias("n")
    )
    bad = counted.filter(pl.col("n") != want).head(1).collect()
    if bad.height:
        line, text, n = bad.row(0)
        shown = sep.replace("\t", "\\t")
        return UserError(
            f"{path}, line {line}: expected {want} fields separated by '{shown}' but found "
            f"{n} in {(text or '')[:80]!r}; fix the line or pass the right --format."
        )
    numeric = {"user": False, "item": False, "rating": True, "time": True}
    if scan.fmt in ("ml-1m", "ml-100k", "ml-20m"):
        numeric.update(user=True, item=True)
    parts = counted.with_columns(pl.col("text").str.split(sep).alias("f"))
    for i, name in enumerate(scan.field_names):
        if not name or not numeric.get(name):
            continue
        field = pl.col("f").list.get(i).str.strip_chars()
        probe = parts.with_columns(field.alias("v")).filter(
            pl.col("v").cast(pl.Float64, strict=False).is_null() & (pl.col("v") != "")
        )
        if name in ("user", "item") or (name == "time" and scan.fmt != "recbole"):
            probe = parts.with_columns(field.alias("v")).filter(
                pl.col("v").cast(pl.Int64, strict=False).is_null() & (pl.col("v") != "")
            )
        hit = probe.head(1).collect()
        if hit.height:
            row = hit.row(0, named=True)
            kind = "an integer" if name in ("user", "item", "time") else "a number"
            return UserError(
                f"{path}, line {row['_line']}, {name} field: {row['v']!r} is not {kind}; "
                f"fix the value or check --format."
            )
    return UserError(f"{path}: cannot read it as {scan.fmt} ({_first(error)}).")


def read_ratings(
    path: Path, fmt: str = "auto", cols: ColumnNames | None = None
) -> tuple[pl.DataFrame, Scan]:
    """Read and validate the whole log: columns user, item, [rating], time, _line."""
    path = Path(path)
    scan = scan_ratings(path, fmt, cols)
    try:
        frame = scan.frame.collect()
    except pl.exceptions.PolarsError as e:
        raise diagnose(path, scan, e) from None
    if frame.height == 0:
        raise UserError(f"{path} holds no ratings (only a header or blank lines).")
    check_values(frame, scan, path)
    frame = frame.drop([c for c in ("_s1", "_s2", "_s3") if c in frame.columns])
    return normalise_time(frame, path), scan


def _bad_rows(lf: pl.LazyFrame, scan: Scan) -> pl.Expr:
    cols = lf.collect_schema().names()
    needed = ["user", "item", "time"] + (["rating"] if scan.has_rating else [])
    stray = [c for c in ("_s1", "_s2", "_s3") if c in cols]
    return pl.any_horizontal(
        *[pl.col(c).is_null() for c in needed], *[pl.col(c).is_not_null() for c in stray]
    )


def sink_ratings(
    path: Path, dest: Path, fmt: str = "auto", cols: ColumnNames | None = None
) -> tuple[pl.LazyFrame, Scan]:
    """Like `read_ratings`, but streams the typed log into Parquet at `dest` and returns a
    lazy scan of it, so a log larger than memory never has to be held at once."""
    path = Path(path)
    scan = scan_ratings(path, fmt, cols)
    try:
        scan.frame.sink_parquet(dest, engine="streaming")
    except pl.exceptions.PolarsError as e:
        raise diagnose(path, scan, e) from None
    lf = pl.scan_parquet(dest)
    first_bad = lf.filter(_bad_rows(lf, scan)).head(1).collect(engine="streaming")
    if first_bad.height:
        check_values(first_bad, scan, path)
    if lf.select(pl.len()).collect(engine="streaming").item() == 0:
        raise UserError(f"{path} holds no ratings (only a header or blank lines).")
    lf = lf.drop([c for c in ("_s1", "_s2", "_s3") if c in lf.collect_schema().names()])
    if not lf.collect_schema()["time"].is_numeric():
        # Date strings: parse them in memory (only this rare case is not streamed).
        lf = normalise_time(lf.collect(engine="streaming"), path).lazy()
    return lf, scan
