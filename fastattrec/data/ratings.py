"""Read a ratings log whole, typed and checked: `read_ratings` (in memory) and
`sink_ratings` (streamed to Parquet), from the lazy scan of `readers.py`.

Reading is typed, so the common case costs one parse. When Polars refuses a file, a
line-oriented pass finds the first bad line and explains it in one sentence
(`UserError`); a CSV whose column types change after the rows Polars looked at (string
ids or fractional times late in the file) is read again as text and typed from the whole
column. Ids are read as text and become integers only when every value's text is the
integer's own decimal form (so `01`, `1.0`, `+1` and ` 1` stay distinct strings); times may
be integers (within 64 bits), decimals or dates (a zoned date converted to UTC). Trailing
blank lines are ignored; a blank line mid-file is named.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import polars as pl

from fastattrec.atomic import is_write_failure
from fastattrec.data.readers import (
    MOVIELENS,
    SEQUENCES,
    STRAY,
    ColumnNames,
    Scan,
    scan_ratings,
    text_lines,
)
from fastattrec.errors import UserError, first_error_line, shown
from fastattrec.outputs import write_error


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
    stray = [c for c in STRAY if c in cols]
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


def _integer_text(lf: pl.LazyFrame, col: str, streaming: bool) -> bool:
    """True when every non-null value of string column `col` is exactly the decimal text of
    a 64-bit integer: no leading zeros, plus sign, spaces, decimals or exponents, so
    reading the column as integers merges no two distinct ids."""
    c = pl.col(col)
    same = (c.cast(pl.Int64, strict=False).cast(pl.String) == c).fill_null(False)
    return _collect(lf.select((same | c.is_null()).all()), streaming).item()


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
                 ) -> tuple[pl.LazyFrame, str | None]:
    """Give the canonical columns their types, judging each from the whole column; and
    what the times were (None numbers, "naive" dates without a zone, "UTC" zoned dates).

    user/item: Int64 when every value is an integer (its text exactly that integer's, for
    text columns), else String, the text unchanged (ids may be names or zero-padded codes);
    rating: Float64; time: Int64 or Float64 numbers, or dates (as microseconds, UTC)."""
    schema = lf.collect_schema()
    out = []
    for col in ("user", "item"):
        dt = schema[col]
        if dt.is_integer() and not _fits_int64(lf, col, dt, streaming):
            out.append(pl.col(col).cast(pl.String))  # ids beyond 64 bits stay exact as text
        elif dt.is_integer():
            out.append(pl.col(col).cast(pl.Int64))
        elif dt == pl.String:
            if _integer_text(lf, col, streaming):
                out.append(pl.col(col).cast(pl.Int64))
            else:
                out.append(pl.col(col))
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
    time, dates = _time_expr(lf, scan, path, schema["time"], streaming)
    return lf.with_columns(*out, time), dates


def _time_expr(lf: pl.LazyFrame, scan: Scan, path: Path, dt: pl.DataType,
               streaming: bool) -> tuple[pl.Expr, str | None]:
    t = pl.col("time")
    if dt.is_integer():
        if not _fits_int64(lf, "time", dt, streaming):
            raise _beyond_int64(lf, scan, path, t.cast(pl.Int64, strict=False).is_null()
                                & t.is_not_null(), streaming)
        return t.cast(pl.Int64), None
    if dt.is_float():
        bad = t.is_not_null() & ~t.is_finite()
        if _collect(lf.select(bad.any()), streaming).item():
            raise _explain_value(lf, scan, path, "time", bad, "a finite number", streaming)
        return t, None
    if dt in (pl.Date,) or isinstance(dt, pl.Datetime):
        zone = "UTC" if getattr(dt, "time_zone", None) else "naive"
        return t.cast(pl.Datetime("us")).dt.epoch("us"), zone
    if dt == pl.String:
        v = t.str.strip_chars()
        if _all_cast(lf, "time", pl.Int64, streaming):
            return v.cast(pl.Int64), None
        huge = v.str.contains(r"^[+-]?\d+$") & v.cast(pl.Int64, strict=False).is_null()
        if _collect(lf.select(huge.any()), streaming).item():
            raise _beyond_int64(lf, scan, path, huge, streaming)
        as_float = v.cast(pl.Float64, strict=False)
        first = _collect(lf.select(v.drop_nulls().first()), streaming).item()
        numeric = first is not None and _parses_as_float(first)
        if numeric:  # a column of numbers: the culprit is the first value that is not one
            bad = t.is_not_null() & ~as_float.is_finite().fill_null(False)
            if _collect(lf.select(bad.any()), streaming).item():
                raise _explain_value(lf, scan, path, "time", bad, "a finite number",
                                     streaming)
            return as_float, None
        zone = _zoned_times(lf, scan, path, v, streaming)
        if zone:  # one spelling of the zone (`+hh:mm` right after the time), as Polars infers
            v = v.str.replace(r"\s*[Zz]$", "+00:00").str.replace(
                r"\s+([+-]\d{2}(?::?\d{2})?)$", "${1}")
        parsed = v.str.to_datetime(strict=False, time_unit="us", time_zone=zone)
        bad = parsed.is_null() & t.is_not_null()
        if _collect(lf.select(bad.any()), streaming).item():
            raise _explain_value(lf, scan, path, "time", bad, "a date (the column's first "
                                 "value is one)", streaming)
        return parsed.dt.epoch("us"), zone or "naive"
    raise UserError(f"{path}: the {scan.label('time')} holds {dt} values; times must be "
                    f"numbers or dates (choose another --time-col).")


# A date-time ending in a zone: `Z` or an offset (+02:00, -0130, +05) after the seconds.
_ZONE = r":\d{2}(?:[.,]\d+)?\s*(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"


def _zoned_times(lf: pl.LazyFrame, scan: Scan, path: Path, v: pl.Expr, streaming: bool
                 ) -> str | None:
    """"UTC" when every date carries a zone (they are then converted to UTC), None when
    none does; a date with a zone next to one without is refused (the naive one's zone is
    unknown)."""
    zoned = v.str.contains(_ZONE)
    n_zoned, n = _collect(lf.select(zoned.sum().alias("z"), v.is_not_null().sum().alias("n")),
                          streaming).row(0)
    if not n_zoned:
        return None
    if n_zoned == n:
        return "UTC"
    naive = _first_bad(lf, v.is_not_null() & ~zoned, streaming)
    other = _first_bad(lf, zoned, streaming)
    raise UserError(
        f"{path}, {scan.row_word} {naive['_line']}, {scan.label('time')}: "
        f"{shown(naive['time'])} has no time zone, unlike {scan.row_word} {other['_line']}'s "
        f"{shown(other['time'])}; give every time a zone (Z or +hh:mm) or none.")


def _beyond_int64(lf: pl.LazyFrame, scan: Scan, path: Path, bad: pl.Expr, streaming: bool
                  ) -> UserError:
    """The first integer time outside 64 bits, refused (as a float it would lose order)."""
    row = _first_bad(lf, bad, streaming)
    return _huge_time(path, scan.row_word, row["_line"], scan.label("time"), row["time"])


def _huge_time(path: Path, word: str, line: int, label: str, value: object) -> UserError:
    return UserError(f"{path}, {word} {line}, {label}: {shown(str(value))} is beyond the "
                     f"64-bit integer range; rescale the times (e.g. to seconds) or fix "
                     f"the value.")


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
    hit = text_lines(path, scan.header_lines).filter(
        pl.col("text").str.contains("\ufffd", literal=True)).head(1).collect()
    if not hit.height:
        return None
    return UserError(f"{path}, line {hit.item(0, '_line')} is not UTF-8 text (Latin-1?); "
                     f"convert the file, e.g. `iconv -f latin1 -t utf-8`.")


def diagnose(path: Path, scan: Scan, error: BaseException) -> UserError | None:
    """Find the first line that the typed reader refused and explain it; None when no
    line is to blame (the caller then reads the file as text, or reports `error`)."""
    if scan.fmt == "parquet":
        return UserError(f"{path}: cannot read the Parquet file ({first_error_line(error)}); check "
                         f"that it is complete.")
    enc = _bad_encoding(path, scan)
    if enc is not None:
        return enc
    if scan.fmt in SEQUENCES:
        return None
    lines = text_lines(path, scan.header_lines)
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
        if name not in ("rating", "time"):
            continue  # ids are read as text, so they cannot fail the typed read
        value = pl.col("f").list.get(i, null_on_oob=True).str.strip_chars()
        dtype = pl.Float64 if name == "rating" else pl.Int64
        hit = parts.with_columns(value.alias("v")).filter(
            pl.col("v").cast(dtype, strict=False).is_null() & (pl.col("v") != "")
        ).head(1).collect()
        if hit.height:
            row = hit.row(0, named=True)
            if name == "time" and re.fullmatch(r"[+-]?\d+", row["v"]):
                return _huge_time(path, "line", row["_line"], "time field", row["v"])
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
    raise UserError(f"{path}: cannot read it as {scan.fmt} ({first_error_line(error)}); "
                    f"check --format.")


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
                f"{path}: cannot read it as {scan.fmt} ({first_error_line(e2)}); check --format."
            ) from None
    lf = tidy_rows(frame.lazy(), scan, path)
    lf, dates = coerce_types(lf, scan, path)
    frame = lf.drop([c for c in (*STRAY, "_n", "_enc") if c in frame.columns]).collect()
    if frame.height == 0:
        raise UserError(f"{path} holds no ratings (only a header or blank lines).")
    return frame, replace(scan, time_dates=dates)


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
    lazy scan of it (the later plans still hold several times the log's size in memory:
    about 4.5x over a whole `prep --streaming`)."""
    path, dest = Path(path), Path(dest)
    scan = scan_ratings(path, fmt, cols)
    try:
        _sink(scan.frame, dest)
    except pl.exceptions.PolarsError as e:
        try:
            _sink(_typed(scan, path, e), dest)
        except pl.exceptions.PolarsError as e2:
            raise diagnose(path, scan, e2) or UserError(
                f"{path}: cannot read it as {scan.fmt} ({first_error_line(e2)}); check --format."
            ) from None
    lf = tidy_rows(pl.scan_parquet(dest), scan, path, streaming=True)
    names = lf.collect_schema().names()
    lf, dates = coerce_types(lf, scan, path, streaming=True)
    lf = lf.drop([c for c in (*STRAY, "_n", "_enc") if c in names])
    if _collect(lf.select(pl.len()), True).item() == 0:
        raise UserError(f"{path} holds no ratings (only a header or blank lines).")
    return lf, replace(scan, time_dates=dates)
