"""The split of `prep` (docs/spec.md §1.11): how many of each user's last interactions are
validation and test targets.

- leave-one-out (the default, §1.5): the last item is test, the one before validation.
- time: one global cut for the whole log. Interactions at or after the test cut are
  test, those from the validation cut up to the test cut validation, earlier ones train.
- ratio: per user, in time order, the last fraction of the user's interactions test and
  the fraction before them validation.

A user's targets are always the end of their time-ordered sequence, so the split is two
counts per user (`n_val`, `n_test`), computed here in Polars without a loop over users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import polars as pl

from fastattrec.errors import UserError, shown

SPLITS = ("leave-one-out", "time", "ratio")
LEAVE_ONE_OUT = "leave-one-out"
DEFAULT_FRACTION = 0.1  # --val-fraction and --test-fraction


@dataclass(frozen=True)
class SplitOptions:
    """The split and its parameters, as given (None: not given)."""

    split: str = LEAVE_ONE_OUT
    val_fraction: float | None = None
    test_fraction: float | None = None
    val_from: float | int | str | None = None  # a time in the log's units, or a date
    test_from: float | int | str | None = None

    def fractions(self) -> tuple[float, float]:
        """(validation, test) fractions, the defaults filled in."""
        return (DEFAULT_FRACTION if self.val_fraction is None else self.val_fraction,
                DEFAULT_FRACTION if self.test_fraction is None else self.test_fraction)


def check_split(opts: SplitOptions, fmt: str, sequence_formats: tuple[str, ...]) -> None:
    """Refuse a split's impossible or contradictory options before any work."""
    if opts.split not in SPLITS:
        raise UserError(f"unknown --split {shown(opts.split)}; use one of {', '.join(SPLITS)}.")
    fractions = [f for f in (opts.val_fraction, opts.test_fraction) if f is not None]
    cuts = [c for c in (opts.val_from, opts.test_from) if c is not None]
    if opts.split == LEAVE_ONE_OUT and (fractions or cuts):
        raise UserError("--val-fraction, --test-fraction, --val-from and --test-from set the "
                        "time and ratio splits; add --split time or --split ratio, or drop "
                        "them for leave-one-out.")
    if opts.split == "ratio" and cuts:
        raise UserError("--val-from and --test-from cut the whole log at one time, which is "
                        "--split time; --split ratio takes --val-fraction and "
                        "--test-fraction of each user's interactions.")
    if opts.split == "time":
        if fmt in sequence_formats:
            raise UserError(f"--format {fmt} has no times (only the order of the lines), so "
                            f"--split time cannot cut it; use --split ratio or "
                            f"leave-one-out, or a log with a time column.")
        if len(cuts) == 1:
            raise UserError("give both --val-from and --test-from (the validation and test "
                            "cuts), or neither to cut by --val-fraction and --test-fraction.")
        if cuts and fractions:
            raise UserError("give the time split's cuts either as times (--val-from, "
                            "--test-from) or as fractions (--val-fraction, --test-fraction), "
                            "not both.")
        if cuts:
            val, test = parse_time(opts.val_from, "--val-from"), parse_time(
                opts.test_from, "--test-from")
            if not val[0] < test[0]:
                raise UserError(f"--val-from {shown(opts.val_from)} must be earlier than "
                                f"--test-from {shown(opts.test_from)} (validation comes "
                                f"before test).")
    for flag, f in (("--val-fraction", opts.val_fraction),
                    ("--test-fraction", opts.test_fraction)):
        if f is not None and not (math.isfinite(f) and 0 < f < 1):
            raise UserError(f"{flag} must be a number between 0 and 1 (exclusive), got "
                            f"{shown(f)}; 0.1 is the last tenth.")
    if opts.split != LEAVE_ONE_OUT and sum(opts.fractions()) >= 1:
        val, test = opts.fractions()
        raise UserError(f"--val-fraction {val:g} and --test-fraction {test:g} add up to 1 or "
                        f"more, which leaves nothing to train on; lower them.")


def parse_time(value: Any, flag: str) -> tuple[int | float, bool]:
    """A cut as the log's times are stored: (a number, whether it was given as a date).
    Numbers are in the log's own units; a date (2003-01-01, 2003-01-01T10:00:00+02:00)
    becomes microseconds since 1970 (UTC for a zoned date), as prep reads dates."""
    if isinstance(value, bool):
        raise UserError(f"{flag} must be a time (a number or a date), got {shown(value)}.")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite time, got {shown(value)}.")
        return value, False
    text = str(value).strip()
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        if math.isfinite(number):
            return number, False
    zoned = _zoned(text)
    try:
        parsed = pl.Series([text]).str.to_datetime(strict=False, time_unit="us",
                                                   time_zone="UTC" if zoned else None)
        micros = parsed.dt.epoch("us").item()
    except (pl.exceptions.PolarsError, ValueError):
        micros = None
    if micros is None:
        raise UserError(f"{flag} {shown(value)} is neither a number nor a date such as "
                        f"2003-01-01 or 2003-01-01T10:00:00; give the time in the log's own "
                        f"units or as a date.")
    return int(micros), True


def _zoned(text: str) -> bool:
    """Whether a date given as text carries a zone (Z, +hh:mm or -hh:mm after the day)."""
    return text.endswith(("Z", "z")) or (len(text) > 10 and ("+" in text[10:]
                                                             or "-" in text[10:]))


def _half_up(fraction: float, n: pl.Expr | int) -> pl.Expr | int:
    """⌊fraction·n + ½⌋ in integer arithmetic (the fraction taken to six decimals, so 0.1
    is exactly 1/10: no float rounding decides a count)."""
    f = Fraction(repr(float(fraction))).limit_denominator(10**6)
    return (2 * f.numerator * n + f.denominator) // (2 * f.denominator)


def ratio_counts(users: pl.DataFrame, opts: SplitOptions) -> pl.DataFrame:
    """(user, n_val, n_test) of --split ratio: of a user's n interactions, the last
    n_test = ⌊f_test·n + ½⌋ clipped to [1, max(n − 2, 1)] are test and the
    n_val = ⌊f_val·n + ½⌋ clipped to [1, max(n − n_test − 1, 1)] before them validation,
    so a user of n >= 3 keeps at least one train item (n = 2: one of each, no train)."""
    f_val, f_test = opts.fractions()
    n = pl.col("length").cast(pl.Int64)
    n_test = _half_up(f_test, n).clip(1, pl.max_horizontal(n - 2, 1))
    n_val = _half_up(f_val, n).clip(1, pl.max_horizontal(n - n_test - 1, 1))
    return users.select("user", n_val.cast(pl.Int32).alias("n_val"),
                        n_test.cast(pl.Int32).alias("n_test"))


@dataclass
class TimeCuts:
    """The two cuts of --split time, in the log's time units, and the log's time range."""

    val: int | float
    test: int | float
    first: int | float  # the earliest and latest time of the rows kept
    last: int | float
    dates: bool  # the cuts were given as dates (messages show dates)

    def shown(self, t: int | float) -> str:
        """A time for a message: as a date when the cuts were given as dates."""
        if self.dates:
            return str(pl.Series([int(t)]).cast(pl.Datetime("us")).item())
        return _number(t)


def time_cuts(times: pl.Series, opts: SplitOptions, source: Path,
              log_dates: str | None = None) -> TimeCuts:
    """The cuts of --split time: the given times, or from the fractions, over the R rows'
    times sorted t_0 <= ... <= t_{R-1}: the test cut is t_{R - n_t} with
    n_t = max(1, ⌊f_test·R + ½⌋), the validation cut t_{max(0, R - n_t - n_v)} with n_v
    likewise. Every row at or after a cut is on its side, ties included. Refuses cuts that
    leave no train, validation or test row, and cuts of another kind than the log's times
    (`log_dates`: None numbers, "naive" dates without a zone, "UTC" zoned dates)."""
    srt = times.sort()
    r = srt.len()
    first, last = srt[0], srt[r - 1]
    if opts.val_from is not None:
        given = [(flag, value, *parse_time(value, flag))
                 for flag, value in (("--val-from", opts.val_from),
                                     ("--test-from", opts.test_from))]
        _same_kind(given, log_dates, source, first, last)
        (_, _, val, _), (_, _, test, _) = given
        how = "--val-from and --test-from"
    else:
        f_val, f_test = opts.fractions()
        n_t = max(1, _half_up(f_test, r))
        i_test = r - n_t
        i_val = max(0, i_test - max(1, _half_up(f_val, r)))
        val, test = srt[i_val], srt[i_test]
        how = "--val-fraction and --test-fraction"
    cuts = TimeCuts(val, test, first, last, log_dates is not None)
    span = f"(its times run from {cuts.shown(first)} to {cuts.shown(last)})"
    if not last >= test:
        raise UserError(f"{source}: --test-from {cuts.shown(test)} leaves no test "
                        f"interactions {span}; give a time at most {cuts.shown(last)}.")
    if not first < val:
        raise UserError(f"{source}: the validation cut {cuts.shown(val)} leaves no "
                        f"interaction before it to train on {span}; give a later "
                        f"--val-from, or a lower --val-fraction or --test-fraction.")
    if not (srt.to_frame("t").filter((pl.col("t") >= val) & (pl.col("t") < test)).height):
        raise UserError(f"{source}: no interaction falls between the validation cut "
                        f"{cuts.shown(val)} and the test cut {cuts.shown(test)} {span}, "
                        f"so there is nothing to validate on; move the cuts apart with {how}.")
    return cuts


def _same_kind(given: list[tuple[str, Any, int | float, bool]], log_dates: str | None,
               source: Path, first: int | float, last: int | float) -> None:
    """Refuse cuts (flag, value as given, parse_time's number and whether it was a date)
    of another kind than the log's times: a date against numbers (their unit is unknown),
    a number against dates, or a zoned date against dates without a zone (their zone is
    unknown). A date without a zone against zoned dates is read as UTC, as they are."""
    for flag, value, number, is_date in given:
        if is_date and log_dates is None:
            raise UserError(f"{source}: its times are numbers ({_number(first)} to "
                            f"{_number(last)}), not dates, so {flag} must be a number in the "
                            f"same units, not {shown(value)} (as Unix seconds that date is "
                            f"{number // 1_000_000}).")
        if not is_date and log_dates is not None:
            raise UserError(f"{source}: its times are dates, so {flag} must be a date "
                            f"(2003-01-01 or 2003-01-01T10:00:00), not the number "
                            f"{shown(value)}.")
        if is_date and log_dates == "naive" and _zoned(str(value).strip()):
            raise UserError(f"{source}: its dates have no time zone, so {flag} "
                            f"{shown(value)} cannot be placed among them; give it without "
                            f"a zone, in the log's own local time.")


def _number(t: int | float) -> str:
    """A time in the log's own units, for a message."""
    return f"{t:g}" if isinstance(t, float) else str(t)


def time_counts(seq: pl.DataFrame, cuts: TimeCuts) -> pl.DataFrame:
    """(user, n_val, n_test) of --split time from the time-ordered rows (user, time)."""
    t = pl.col("time")
    return (seq.lazy().group_by("user").agg(
        ((t >= cuts.val) & (t < cuts.test)).sum().cast(pl.Int32).alias("n_val"),
        (t >= cuts.test).sum().cast(pl.Int32).alias("n_test"))
        .sort("user").collect())


def split_counts(users: pl.DataFrame) -> dict[str, int]:
    """Samples of each phase from the users table (length, n_val, n_test): a user's first
    length − n_val − n_test items are train, then n_val validation and n_test test items.
    Train targets are the train items but the first; a phase evaluates a user who has a
    target in it and at least one earlier item (docs/spec.md §1.11)."""
    a = pl.col("length") - pl.col("n_val") - pl.col("n_test")  # train items
    before_test = a + pl.col("n_val")
    row = users.select(
        (a - 1).clip(lower_bound=0).sum().alias("train_samples"),
        pl.col("n_val").filter(a >= 1).sum().alias("val_samples"),
        pl.col("n_test").filter(before_test >= 1).sum().alias("test_samples"),
        ((pl.col("n_val") >= 1) & (a >= 1)).sum().alias("val_users"),
        ((pl.col("n_test") >= 1) & (before_test >= 1)).sum().alias("test_users"),
        ((pl.col("n_val") >= 1) & (a < 1)).sum().alias("val_users_without_history"),
        ((pl.col("n_test") >= 1) & (before_test < 1)).sum().alias("test_users_without_history"),
    ).row(0, named=True)
    return {k: int(v or 0) for k, v in row.items()}


def split_users(seq: pl.DataFrame, users: pl.DataFrame, source: Path, opts: SplitOptions,
                log_dates: str | None = None) -> tuple[pl.DataFrame, TimeCuts | None]:
    """The users table with each user's validation and test counts (n_val, n_test; one
    and one for leave-one-out), and the cuts of a time split; `seq` holds the
    time-ordered rows (user, item[, time]), `log_dates` what its times were (time_cuts).
    A time split that leaves no user to validate or to test is refused."""
    if opts.split == LEAVE_ONE_OUT:
        return users.with_columns(pl.lit(1, pl.Int32).alias("n_val"),
                                  pl.lit(1, pl.Int32).alias("n_test")), None
    if opts.split == "ratio":
        return users.join(ratio_counts(users, opts), on="user").sort("user"), None
    cuts = time_cuts(seq.get_column("time"), opts, source, log_dates)
    users = users.join(time_counts(seq, cuts), on="user").sort("user")
    phases = split_counts(users)
    shown = f"validation from {cuts.shown(cuts.val)}, test from {cuts.shown(cuts.test)}"
    if phases["test_users"] == 0:
        raise UserError(f"{source}: no user with a test interaction ({shown}) has an earlier "
                        f"one to predict it from, so nothing can be tested; move the cuts "
                        f"earlier.")
    if phases["val_users"] == 0:
        raise UserError(f"{source}: no user with a validation interaction ({shown}) has an "
                        f"earlier one to predict it from, so nothing can be validated; move "
                        f"the validation cut later.")
    return users, cuts
