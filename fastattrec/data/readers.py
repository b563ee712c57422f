"""Scan a ratings log lazily into one canonical frame: user, item, [rating], time, _line.

Supported inputs: MovieLens-1M `ratings.dat` (`::`), MovieLens-100K `u.data` (tab),
MovieLens-20M/25M `ratings.csv` (header), RecBole atomic `.inter` files, any CSV, TSV or
Parquet file with named user/item/time (and optionally rating) columns, and two logs
without a time column, in file order: `sequence-pairs` (`user item` lines, whitespace
separated, as SASRec's data files) and `sequence-lines` (one line per user:
`user item1 item2 ...`). Compressed inputs are unpacked by `compressed.py` first.

This module detects the format and builds the typed lazy scan (`scan_ratings`);
`ratings.py` reads it whole, types what the scan could not, and explains bad lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from fastattrec.data.compressed import compression_of
from fastattrec.errors import UserError, first_error_line, quoted, shown

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
STRAY = ("_s1", "_s2", "_s3")  # the empty fields between the two ':' of MovieLens-1M's '::'
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
    # What the times were: None numbers (or no times), "naive" dates without a zone, "UTC"
    # dates with one (converted to UTC); set when the time column is typed.
    time_dates: str | None = None

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
        raise UserError(f"{quoted(path)} does not exist; check the path.")
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
    """The fixed MovieLens layouts; ids are read as text (ratings.py types them from the
    whole column, so `01` and `1` stay two ids)."""
    if fmt == "ml-1m":
        # `::` is two one-byte separators with an empty field between them.
        names = ("user", "_s1", "item", "_s2", "rating", "_s3", "time")
        types = [pl.String, pl.String, pl.String, pl.String, pl.Float64, pl.String, pl.Int64]
        lf = pl.scan_csv(
            path, separator=":", has_header=False, quote_char=None,
            schema=dict(zip(names, types, strict=True)),
            row_index_name="_line", row_index_offset=1, encoding="utf8-lossy",
        )
        return Scan(lf, fmt, True, "::", 4, 0, ("user", "item", "rating", "time"))
    if fmt == "ml-100k":
        names = ("user", "item", "rating", "time")
        types = [pl.String, pl.String, pl.Float64, pl.Int64]
        lf = pl.scan_csv(
            path, separator="\t", has_header=False, quote_char=None,
            schema=dict(zip(names, types, strict=True)),
            row_index_name="_line", row_index_offset=1,
        )
        return Scan(lf, fmt, True, "\t", 4, 0, names)
    # ml-20m / ml-25m ratings.csv: userId,movieId,rating,timestamp with a header line.
    names = ("user", "item", "rating", "time")
    types = [pl.String, pl.String, pl.Float64, pl.Int64]
    lf = pl.scan_csv(
        path, separator=",", has_header=True, quote_char=None,
        new_columns=list(names), schema=dict(zip(names, types, strict=True)),
        row_index_name="_line", row_index_offset=2,
    )
    return Scan(lf, fmt, True, ",", 4, 1, names)


def text_lines(path: Path, skip: int = 0) -> pl.LazyFrame:
    """Every line of a text file as one string column `text`, with its 1-based `_line`."""
    return pl.scan_csv(
        path, separator=_TEXT_SEP, has_header=False, quote_char=None,
        schema={"text": pl.String}, row_index_name="_line", row_index_offset=1,
        encoding="utf8-lossy", truncate_ragged_lines=True,
    ).slice(skip)


def _sequence_scan(path: Path, fmt: str) -> Scan:
    """`user item` lines, or `user item1 item2 ...` lines: time is the order in the file."""
    tokens = text_lines(path).with_columns(
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
            raise UserError(f"{path} is not a readable Parquet file ({first_error_line(e)}); "
                            f"check that it is complete, or pass the right --format.") from None
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
            raise UserError(f"{path}: cannot read the header line "
                            f"({first_error_line(e)}).") from None
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
        # Ids as text: inferred as integers, `01` and `1` would become one id.
        overrides = {user: pl.String, item: pl.String}
        if rating is not None:
            overrides[rating] = pl.Float64
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
