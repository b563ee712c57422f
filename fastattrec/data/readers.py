"""Read a ratings log into one canonical lazy frame: user, item, [rating], time, _line.

Supported inputs: MovieLens-1M `ratings.dat` (`::`), MovieLens-100K `u.data` (tab),
MovieLens-20M/25M `ratings.csv` (header), RecBole atomic `.inter` files, any CSV, TSV or
Parquet file with named user/item/time (and optionally rating) columns, and two logs
without a time column, in file order: `sequence-pairs` (`user item` lines, whitespace
separated, as SASRec's data files) and `sequence-lines` (one line per user:
`user item1 item2 ...`). Compressed inputs are unpacked by `compressed.py` first.

Reading is lazy (`scan_*`) and typed, so the common case costs one parse. When Polars
refuses a file, a line-oriented pass finds the first bad line and explains it in one
sentence (`UserError`); a CSV whose column types change after the rows Polars looked at
(string ids or fractional times late in the file) is read again as text and typed from
the whole column. Ids stay integers when every value is one, else strings; times may be
integers, decimals or dates. Trailing blank lines are ignored; a blank line mid-file is
named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from fastattrec.atomic import is_write_failure
from fastattrec.data.compressed import compression_of
from fastattrec.errors import UserError, shown
from fastattrec.outputs import write_error

FORMATS = ("auto", "ml-1m", "ml-100k", "ml-20m", "recbole", "csv", "tsv", "parquet",
           "sequence-pairs", "sequence-lines")
MOVIELENS = ("ml-1m", "ml-100k", "ml-20m")
SEQUENCES = ("sequence-pairs", "sequence-lines")

# Column names tried, in order, when --user-col/--item-col/... are not given.
_GUESS = {
    "user": ("user_id", "userId", "UserID", "user", "user_id:token", "uid"),
    "item": ("item_id", "movieId", "MovieID", "item", "item_id:token", "iid", "movie_id"),
    "time": ("timestamp", "Timestamp", "time", "ts", "timestamp:float", "datetime", "date"),
    "rating": ("rating", "Rating", "label", "score", "rating:float"),
}
_STRAY = ("_s1", "_s2", "_s3")  # the empty fields between the two ':' of MovieLens-1M's '::'
_TEXT_SEP = "\x1f"  # a byte that never occurs in a text log: read each line as one field


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
    separator: str  # field separator as written in the file ("" for parquet/sequences)
    n_fields: int  # fields per line (0 for parquet/sequences)
    header_lines: int
    field_names: tuple[str, ...]  # canonical name of each field, "" for unused
    # The same columns read as text, for a second, fully typed pass (CSV family only).
    text_frame: pl.LazyFrame | None = None
    # How each canonical column is called in messages ("'timestamp' column", "time field").
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def sep_quotes(self) -> bool:
        """Fields may be quoted (the generic CSV/TSV/RecBole readers)."""
        return self.text_frame is not None

    def label(self, col: str) -> str:
        return self.labels.get(col, f"{col} field")

    @property
    def row_word(self) -> str:
        return "row" if self.fmt == "parquet" else "line"


def check_file(path: Path) -> None:
    """Fail with one sentence if `path` is missing, a folder, unreadable or empty."""
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path.")
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the ratings file inside it.")
    if not path.is_file():
        raise UserError(f"{path} is not a regular file (a pipe, FIFO or device); save the "
                        f"log to a file first and give that file.")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions.") from None
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; it needs one rating a line.")


def _first_line(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    return line.decode("utf-8", errors="replace")


def detect_format(path: Path) -> str:
    """Guess the format from the file name and its first line."""
    kind = compression_of(path)
    if kind is not None:
        raise UserError(f"{path} is {kind}-compressed; `fastattrec prep` reads it directly, "
                        f"or decompress it first.")
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
    hint = ""
    if len(line.split()) >= 2:
        hint = (" (for `user item` lines in time order use --format sequence-pairs; for one "
                "line per user, --format sequence-lines)")
    raise UserError(
        f"{path}: cannot tell the format from its first line {shown(line)}; "
        f"pass --format (one of {', '.join(FORMATS[1:])}){hint}."
    )


def _refuse_binary(path: Path, fmt: str) -> None:
    """A text format was asked for: refuse a Parquet or other binary file in one sentence
    (Polars would otherwise fail deep inside with a schema error)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.startswith(b"PAR1"):
        raise UserError(f"{path} is a Parquet file, not {fmt} text; pass --format parquet "
                        f"(or --format auto).")
    if b"\x00" in head:
        raise UserError(f"{path} is a binary file, not {fmt} text; check the path or "
                        f"--format.")


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


def _lines(path: Path, skip: int = 0) -> pl.LazyFrame:
    """Every line of a text file as one string column `text`, with its 1-based `_line`."""
    return pl.scan_csv(
        path, separator=_TEXT_SEP, has_header=False, quote_char=None,
        schema={"text": pl.String}, row_index_name="_line", row_index_offset=1,
        encoding="utf8-lossy", truncate_ragged_lines=True,
    ).slice(skip)


def _sequence_scan(path: Path, fmt: str) -> Scan:
    """`user item` lines, or `user item1 item2 ...` lines: time is the order in the file."""
    tokens = _lines(path).with_columns(
        pl.col("text").fill_null("").str.extract_all(r"\S+").alias("tok"),
        pl.col("text").fill_null("").str.contains("\ufffd", literal=True).alias("_enc"))
    if fmt == "sequence-pairs":
        lf = tokens.select(
            pl.col("tok").list.get(0, null_on_oob=True).alias("user"),
            pl.col("tok").list.get(1, null_on_oob=True).alias("item"),
            pl.col("_line").cast(pl.Int64).alias("time"),
            pl.col("_line"),
            pl.col("tok").list.len().alias("_n"),
            pl.col("_enc"),
        )
        labels = {"user": "first field (user)", "item": "second field (item)"}
    else:
        lf = tokens.select(
            pl.col("tok").list.get(0, null_on_oob=True).alias("user"),
            pl.col("tok").list.slice(1).alias("item"),
            pl.col("_line"),
            pl.col("tok").list.len().alias("_n"),
            pl.col("_enc"),
        ).with_columns(
            # A line with a user but no item keeps one null item: explained as a blank.
            pl.when(pl.col("item").list.len() == 0).then(pl.lit([None], pl.List(pl.String)))
            .otherwise(pl.col("item")).alias("item")
        ).explode("item").with_row_index("time").with_columns(pl.col("time").cast(pl.Int64))
        lf = lf.select("user", "item", "time", "_line", "_n", "_enc")
        labels = {"user": "first field (user)", "item": "item fields"}
    return Scan(lf, fmt, False, "", 0, 0, ("user", "item"), None, labels)


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
        except (pl.exceptions.PolarsError, OSError) as e:
            raise UserError(f"{path} is not a readable Parquet file ({_first(e)}); check that "
                            f"it is complete, or pass the right --format.") from None
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
    select = [pl.col(src).alias(name) for name, src in chosen.items()] + [pl.col("_line")]
    text = None
    if fmt == "parquet":
        lf = pl.scan_parquet(path, row_index_name="_line", row_index_offset=1).select(select)
    else:
        overrides = {rating: pl.Float64} if rating is not None else {}
        lf = pl.scan_csv(
            path, separator=sep, has_header=True, infer_schema_length=10000,
            schema_overrides=overrides, row_index_name="_line", row_index_offset=2,
        ).select(select)
        text = pl.scan_csv(
            path, separator=sep, has_header=True, infer_schema=False,
            row_index_name="_line", row_index_offset=2,
        ).select(select)
    field_names = tuple(
        {v: k for k, v in chosen.items()}.get(name, "") for name in available
    )
    labels = {name: f"column {src!r}" for name, src in chosen.items()}
    return Scan(lf, fmt, rating is not None, sep, len(available), header, field_names, text,
                labels)


def scan_ratings(path: Path, fmt: str = "auto", cols: ColumnNames | None = None) -> Scan:
    """Open `path` lazily as a typed frame of ratings (see module docstring)."""
    path = Path(path)
    check_file(path)
    cols = cols or ColumnNames()
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {shown(fmt)}; use one of {', '.join(FORMATS)}.")
    if fmt == "auto":
        fmt = detect_format(path)
    elif compression_of(path) is not None:
        detect_format(path)  # explains the compression
    if fmt != "parquet":
        _refuse_binary(path, fmt)
    fixed = MOVIELENS + SEQUENCES
    if fmt in fixed and any((cols.user, cols.item, cols.time, cols.rating)):
        raise UserError(
            f"--user-col/--item-col/--time-col/--rating-col apply to csv, tsv, recbole and "
            f"parquet input; {path} is read as {fmt}, whose columns are fixed."
        )
    if fmt in MOVIELENS:
        return _movielens_scan(path, fmt)
    if fmt in SEQUENCES:
        return _sequence_scan(path, fmt)
    return _table_scan(path, fmt, cols)


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _collect(lf: pl.LazyFrame, streaming: bool) -> pl.DataFrame:
    return lf.collect(engine="streaming") if streaming else lf.collect()


def _first_bad(lf: pl.LazyFrame, bad: pl.Expr, streaming: bool) -> dict | None:
    hit = _collect(lf.filter(bad).head(1), streaming)
    return hit.row(0, named=True) if hit.height else None


def tidy_rows(lf: pl.LazyFrame, scan: Scan, path: Path, streaming: bool = False
              ) -> pl.LazyFrame:
    """Drop the blank lines at the end of the file; explain the first blank line, missing
    field, stray separator or wrong token count anywhere else."""
    cols = lf.collect_schema().names()
    needed = ["user", "item", "time"] + (["rating"] if scan.has_rating else [])
    stray = [c for c in _STRAY if c in cols]
    if scan.fmt in SEQUENCES:
        blank = (pl.col("_n") == 0) & ~pl.col("_enc")
        want = 2 if scan.fmt == "sequence-pairs" else None
        wrong = (pl.col("_n") != want) if want else (pl.col("_n") == 1)
        bad_expr = blank | wrong | pl.col("_enc")
    else:
        blank = pl.all_horizontal(*[pl.col(c).is_null() for c in needed],
                                  *[pl.col(c).is_null() for c in stray])
        bad_expr = pl.any_horizontal(*[pl.col(c).is_null() for c in needed],
                                     *[pl.col(c).is_not_null() for c in stray])
    row = _first_bad(lf.with_columns(blank.alias("_blank")), bad_expr, streaming)
    if row is None:
        return lf
    line, word = row["_line"], scan.row_word
    if row.get("_enc"):
        raise UserError(f"{path}, line {line} is not UTF-8 text (Latin-1?); convert the file, "
                        f"e.g. `iconv -f latin1 -t utf-8`.")
    if row["_blank"]:
        later = _first_bad(lf, (pl.col("_line") > line) & ~blank, streaming)
        if later is None:  # only blank lines from here on: the file just ends with them
            return tidy_rows(lf.filter(pl.col("_line") < line), scan, path, streaming)
        raise UserError(f"{path}, {word} {line} is blank; remove it (blank lines are only "
                        f"allowed at the end of the file).")
    if scan.fmt == "sequence-pairs":
        raise UserError(f"{path}, line {line}: expected 2 fields (user item) but found "
                        f"{row['_n']}; fix the line or pass the right --format.")
    if scan.fmt == "sequence-lines":
        raise UserError(f"{path}, line {line}: a user id with no item; add the user's items "
                        f"or remove the line.")
    if any(row.get(c) is not None for c in stray):
        raise UserError(
            f"{path}, line {line}: fields must be separated by '::' (MovieLens-1M format); "
            f"fix the line or pass the right --format."
        )
    col = next(c for c in needed if row[c] is None)
    if scan.fmt in MOVIELENS:
        raise UserError(f"{path}, line {line}: the {scan.label(col)} is missing or empty "
                        f"(expected {scan.n_fields} fields a line); fix or remove that line.")
    raise UserError(f"{path}, {word} {line}: no value in the {scan.label(col)}; fill it in or "
                    f"remove that {word}.")


def _fits_int64(lf: pl.LazyFrame, col: str, dt: pl.DataType, streaming: bool) -> bool:
    if dt in (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32):
        return True
    lo, hi = _collect(lf.select(pl.col(col).min().cast(pl.String).alias("lo"),
                                pl.col(col).max().cast(pl.String).alias("hi")), streaming).row(0)
    return lo is None or (int(lo) >= -(2**63) and int(hi) < 2**63)


def _all_cast(lf: pl.LazyFrame, col: str, dtype: pl.DataType, streaming: bool) -> bool:
    """True when every non-null value of string column `col` casts to `dtype`."""
    v = pl.col(col).str.strip_chars()
    fails = v.cast(dtype, strict=False).is_null() & pl.col(col).is_not_null()
    return not _collect(lf.select(fails.any()), streaming).item()


def _explain_value(lf: pl.LazyFrame, scan: Scan, path: Path, col: str, bad: pl.Expr,
                   want: str, streaming: bool) -> UserError:
    row = _first_bad(lf, bad, streaming)
    where = f", {scan.row_word} {row['_line']}" if row else ""
    what = f": {shown(row[col])} is not {want}" if row else f" must hold {want}"
    return UserError(f"{path}{where}, {scan.label(col)}{what}; fix the value or check "
                     f"--format and the column options.")


def coerce_types(lf: pl.LazyFrame, scan: Scan, path: Path, streaming: bool = False
                 ) -> pl.LazyFrame:
    """Give the canonical columns their types, judging each from the whole column.

    user/item: Int64 when every value is an integer, else String (ids may be names);
    rating: Float64; time: Int64 or Float64 numbers, or dates (as microseconds)."""
    schema = lf.collect_schema()
    out = []
    for col in ("user", "item"):
        dt = schema[col]
        if dt.is_integer() and not _fits_int64(lf, col, dt, streaming):
            out.append(pl.col(col).cast(pl.String))  # ids beyond 64 bits stay exact as text
        elif dt.is_integer():
            out.append(pl.col(col).cast(pl.Int64))
        elif dt == pl.String:
            if _all_cast(lf, col, pl.Int64, streaming):
                out.append(pl.col(col).str.strip_chars().cast(pl.Int64))
            else:
                out.append(pl.col(col).str.strip_chars())
        elif dt.is_float():
            frac = pl.col(col).is_not_null() & (
                ~pl.col(col).is_finite() | (pl.col(col) != pl.col(col).round(0)))
            if _collect(lf.select(frac.any()), streaming).item():
                raise _explain_value(lf, scan, path, col, frac, "a whole number", streaming)
            out.append(pl.col(col).cast(pl.Int64))
        else:
            raise UserError(f"{path}: the {scan.label(col)} holds {dt} values; ids must be "
                            f"integers or strings (choose another --{col}-col).")
    if scan.has_rating:
        dt = schema["rating"]
        if dt.is_numeric():
            out.append(pl.col("rating").cast(pl.Float64))
        elif dt == pl.String:
            v = pl.col("rating").str.strip_chars().cast(pl.Float64, strict=False)
            bad = v.is_null() & pl.col("rating").is_not_null()
            if _collect(lf.select(bad.any()), streaming).item():
                raise _explain_value(lf, scan, path, "rating", bad, "a number", streaming)
            out.append(v.alias("rating"))
        else:
            raise UserError(f"{path}: the {scan.label('rating')} holds {dt} values; ratings "
                            f"must be numbers (choose another --rating-col).")
    out.append(_time_expr(lf, scan, path, schema["time"], streaming))
    return lf.with_columns(out)


def _time_expr(lf: pl.LazyFrame, scan: Scan, path: Path, dt: pl.DataType,
               streaming: bool) -> pl.Expr:
    t = pl.col("time")
    if dt.is_integer():
        return t.cast(pl.Int64)
    if dt.is_float():
        bad = t.is_not_null() & ~t.is_finite()
        if _collect(lf.select(bad.any()), streaming).item():
            raise _explain_value(lf, scan, path, "time", bad, "a finite number", streaming)
        return t
    if dt in (pl.Date,) or isinstance(dt, pl.Datetime):
        return t.cast(pl.Datetime("us")).dt.epoch("us")
    if dt == pl.String:
        v = t.str.strip_chars()
        if _all_cast(lf, "time", pl.Int64, streaming):
            return v.cast(pl.Int64)
        as_float = v.cast(pl.Float64, strict=False)
        first = _collect(lf.select(v.drop_nulls().first()), streaming).item()
        numeric = first is not None and _parses_as_float(first)
        if numeric:  # a column of numbers: the culprit is the first value that is not one
            bad = t.is_not_null() & ~as_float.is_finite().fill_null(False)
            if _collect(lf.select(bad.any()), streaming).item():
                raise _explain_value(lf, scan, path, "time", bad, "a finite number",
                                     streaming)
            return as_float
        parsed = v.str.to_datetime(strict=False, time_unit="us")
        bad = parsed.is_null() & t.is_not_null()
        if _collect(lf.select(bad.any()), streaming).item():
            raise _explain_value(lf, scan, path, "time", bad, "a date (the column's first "
                                 "value is one)", streaming)
        return parsed.dt.epoch("us")
    raise UserError(f"{path}: the {scan.label('time')} holds {dt} values; times must be "
                    f"numbers or dates (choose another --time-col).")


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bad_encoding(path: Path, scan: Scan) -> UserError | None:
    """The first line that is not UTF-8 (read lossily, it holds U+FFFD)."""
    if scan.fmt == "parquet":
        return None
    hit = _lines(path, scan.header_lines).filter(
        pl.col("text").str.contains("\ufffd", literal=True)).head(1).collect()
    if not hit.height:
        return None
    return UserError(f"{path}, line {hit.item(0, '_line')} is not UTF-8 text (Latin-1?); "
                     f"convert the file, e.g. `iconv -f latin1 -t utf-8`.")


def diagnose(path: Path, scan: Scan, error: BaseException) -> UserError | None:
    """Find the first line that the typed reader refused and explain it; None when no
    line is to blame (the caller then reads the file as text, or reports `error`)."""
    if scan.fmt == "parquet":
        return UserError(f"{path}: cannot read the Parquet file ({_first(error)}); check "
                         f"that it is complete.")
    enc = _bad_encoding(path, scan)
    if enc is not None:
        return enc
    if scan.fmt in SEQUENCES:
        return None
    lines = _lines(path, scan.header_lines)
    sep = scan.separator
    want = scan.n_fields
    counted = lines.with_columns(
        (pl.col("text").fill_null("").str.count_matches(sep, literal=True) + 1).alias("n")
    )
    text = pl.col("text").fill_null("").str.strip_chars()
    bad = counted.filter((pl.col("n") != want) & (text != "")).head(1).collect()
    if bad.height:
        line, text, n = bad.row(0)
        sep_shown = sep.replace("\t", "\\t")
        return UserError(
            f"{path}, line {line}: expected {want} fields separated by '{sep_shown}' but "
            f"found {n} in {shown(text or '', 80)}; fix the line or pass the right --format."
        )
    if scan.sep_quotes:
        odd = lines.filter(pl.col("text").fill_null("").str.count_matches('"', literal=True)
                           % 2 == 1).head(1).collect()
        if odd.height:
            return UserError(f"{path}, line {odd.item(0, '_line')}: a quote (\") is opened and "
                             f"never closed; fix the line.")
    if scan.text_frame is not None:
        return None  # typed by the whole column in a second pass
    parts = counted.with_columns(pl.col("text").str.split(sep).alias("f"))
    for i, name in enumerate(scan.field_names):
        if not name:
            continue
        value = pl.col("f").list.get(i, null_on_oob=True).str.strip_chars()
        dtype = pl.Float64 if name == "rating" else pl.Int64
        hit = parts.with_columns(value.alias("v")).filter(
            pl.col("v").cast(dtype, strict=False).is_null() & (pl.col("v") != "")
        ).head(1).collect()
        if hit.height:
            row = hit.row(0, named=True)
            kind = "a number" if name == "rating" else "an integer"
            return UserError(
                f"{path}, line {row['_line']}, {name} field: {shown(row['v'])} is not {kind}; "
                f"fix the value or check --format."
            )
    return None


def _typed(scan: Scan, path: Path, error: BaseException) -> pl.LazyFrame:
    """After the typed read failed: the text scan to type in a second pass, or the
    sentence that explains the bad line."""
    err = diagnose(path, scan, error)
    if err is not None:
        raise err
    if scan.text_frame is not None:
        return scan.text_frame
    raise UserError(f"{path}: cannot read it as {scan.fmt} ({_first(error)}); check --format.")


def read_ratings(
    path: Path, fmt: str = "auto", cols: ColumnNames | None = None
) -> tuple[pl.DataFrame, Scan]:
    """Read and validate the whole log: columns user, item, [rating], time, _line."""
    path = Path(path)
    scan = scan_ratings(path, fmt, cols)
    try:
        frame = scan.frame.collect()
    except pl.exceptions.PolarsError as e:
        try:
            frame = _typed(scan, path, e).collect()
        except pl.exceptions.PolarsError as e2:
            raise diagnose(path, scan, e2) or UserError(
                f"{path}: cannot read it as {scan.fmt} ({_first(e2)}); check --format."
            ) from None
    lf = tidy_rows(frame.lazy(), scan, path)
    frame = coerce_types(lf, scan, path).drop(
        [c for c in (*_STRAY, "_n", "_enc") if c in frame.columns]).collect()
    if frame.height == 0:
        raise UserError(f"{path} holds no ratings (only a header or blank lines).")
    return frame, scan


def _sink(lf: pl.LazyFrame, dest: Path) -> None:
    """sink_parquet, with a failure to write `dest` told apart from a bad input."""
    try:
        lf.sink_parquet(dest, engine="streaming")
    except (pl.exceptions.PolarsError, OSError) as e:
        if is_write_failure(e, (dest,)):
            raise write_error(dest.parent, e) from None
        raise


def sink_ratings(
    path: Path, dest: Path, fmt: str = "auto", cols: ColumnNames | None = None
) -> tuple[pl.LazyFrame, Scan]:
    """Like `read_ratings`, but streams the typed log into Parquet at `dest` and returns a
    lazy scan of it, so a log larger than memory never has to be held at once."""
    path, dest = Path(path), Path(dest)
    scan = scan_ratings(path, fmt, cols)
    try:
        _sink(scan.frame, dest)
    except pl.exceptions.PolarsError as e:
        try:
            _sink(_typed(scan, path, e), dest)
        except pl.exceptions.PolarsError as e2:
            raise diagnose(path, scan, e2) or UserError(
                f"{path}: cannot read it as {scan.fmt} ({_first(e2)}); check --format."
            ) from None
    lf = tidy_rows(pl.scan_parquet(dest), scan, path, streaming=True)
    names = lf.collect_schema().names()
    lf = coerce_types(lf, scan, path, streaming=True).drop(
        [c for c in (*_STRAY, "_n", "_enc") if c in names])
    if _collect(lf.select(pl.len()), True).item() == 0:
        raise UserError(f"{path} holds no ratings (only a header or blank lines).")
    return lf, scan
