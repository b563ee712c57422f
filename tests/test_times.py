"""Times with a time zone are ordered by their UTC instant; a zoned time next to a naive
one, and an integer time beyond 64 bits, are refused in one sentence naming the line."""

import datetime as dt

import polars as pl
import pytest

from fastattrec.data.ratings import read_ratings

from helpers import cli, write


def micros(*args):
    """Microseconds since 1970 of a UTC date-time, computed by the standard library."""
    stamp = dt.datetime(*args, tzinfo=dt.timezone.utc)
    return round((stamp - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)).total_seconds()
                 * 1_000_000)


# By the wall clock the order would be 10, 20, 30, 40; by the UTC instant it is
# 30 (04:00Z), 20 (05:00Z), 40 (05:30Z), 10 (06:00Z).
ZONED = [("10", "2001-09-18T06:00:00Z", micros(2001, 9, 18, 6)),
         ("20", "2001-09-18T07:00:00+02:00", micros(2001, 9, 18, 5)),
         ("30", "2001-09-18 09:30:00.000+0530", micros(2001, 9, 18, 4)),
         ("40", "2001-09-18T00:30:00 -05:00", micros(2001, 9, 18, 5, 30))]


def prep_fails(tmp_path, src):
    out = tmp_path / "out"
    r = cli("prep", src, "-o", out, "--test-negatives", "1")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert not out.exists()
    return r.output.strip().splitlines()[-1]


@pytest.mark.parametrize("sep", [",", "\t"])
def test_zoned_iso_times_are_converted_to_utc(tmp_path, sep):
    text = f"user{sep}item{sep}timestamp\n" + "".join(
        f"u{sep}{item}{sep}{stamp}\n" for item, stamp, _ in ZONED) + (
        f"v{sep}10{sep}{ZONED[0][1]}\nv{sep}50{sep}{ZONED[1][1]}\n")
    frame, _ = read_ratings(write(tmp_path / "log.txt", text), "csv" if sep == "," else "tsv")
    assert frame.get_column("time").to_list() == [t for _, _, t in ZONED] + [
        ZONED[0][2], ZONED[1][2]]
    r = cli("prep", tmp_path / "log.txt", "-o", tmp_path / "out", "--test-negatives", "1",
            "--format", "csv" if sep == "," else "tsv")
    assert r.exit_code == 0, r.output
    users = pl.read_parquet(tmp_path / "out" / "users.parquet")
    seq = pl.read_parquet(tmp_path / "out" / "sequences.parquet")["item"].to_list()
    items = pl.read_parquet(tmp_path / "out" / "items.parquet")["raw_item"].to_list()
    u = users.row(0, named=True)
    assert [items[i - 1] for i in seq[u["offset"]:u["offset"] + u["length"]]] == [
        30, 20, 40, 10]


def test_zoned_parquet_datetimes_are_utc(tmp_path):
    paris = [dt.datetime(2001, 1, 1, 12), dt.datetime(2001, 7, 1, 12)]  # CET, then CEST
    pl.DataFrame({"user": [1, 1], "item": [1, 2],
                  "time": pl.Series(paris).dt.replace_time_zone("Europe/Paris")}
                 ).write_parquet(tmp_path / "x.parquet")
    frame, _ = read_ratings(tmp_path / "x.parquet")
    assert frame.get_column("time").to_list() == [micros(2001, 1, 1, 11),
                                                  micros(2001, 7, 1, 10)]


def test_zoned_and_naive_times_together_are_refused(tmp_path):
    src = write(tmp_path / "log.csv", "user,item,timestamp\n1,10,2001-09-18T06:00:00Z\n"
                "1,20,2001-09-18T07:00:00\n2,10,2001-09-18T05:00:00+02:00\n")
    msg = prep_fails(tmp_path, src)
    assert msg == (f"Error: {src}, line 3, column 'timestamp': '2001-09-18T07:00:00' has no "
                   f"time zone, unlike line 2's '2001-09-18T06:00:00Z'; give every time a "
                   f"zone (Z or +hh:mm) or none.")


@pytest.mark.parametrize("value", ["99999999999999999999", "-9223372036854775809",
                                   "9223372036854775808"])
def test_integer_times_beyond_64_bits_are_refused(tmp_path, value):
    for name, text, label in (
        ("log.csv", f"user,item,time\n1,10,5\n1,20,{value}\n2,10,3\n", "column 'time'"),
        ("ratings.dat", f"1::10::5::5\n1::20::5::{value}\n2::10::5::3\n", "time field"),
    ):
        src = write(tmp_path / name, text)
        line = 3 if name == "log.csv" else 2
        assert prep_fails(tmp_path, src) == (
            f"Error: {src}, line {line}, {label}: '{value}' is beyond the 64-bit integer "
            f"range; rescale the times (e.g. to seconds) or fix the value.")


def test_a_late_huge_integer_time_is_refused(tmp_path):
    """After the 10,000 rows Polars infers the column type from: read as text."""
    head = "".join(f"{u},{i},{u * 100 + i}\n" for u in range(1, 401) for i in range(1, 31))
    src = write(tmp_path / "log.csv", "user,item,time\n" + head + "1,2,99999999999999999999\n")
    assert prep_fails(tmp_path, src) == (
        f"Error: {src}, line 12002, column 'time': '99999999999999999999' is beyond the "
        f"64-bit integer range; rescale the times (e.g. to seconds) or fix the value.")


def test_unsigned_parquet_times_beyond_int64_are_refused(tmp_path):
    pl.DataFrame({"user": [1, 1], "item": [1, 2],
                  "time": pl.Series([1, 2**63], dtype=pl.UInt64)}
                 ).write_parquet(tmp_path / "x.parquet")
    assert prep_fails(tmp_path, tmp_path / "x.parquet") == (
        f"Error: {tmp_path / 'x.parquet'}, row 2, column 'time': '{2**63}' is beyond the "
        f"64-bit integer range; rescale the times (e.g. to seconds) or fix the value.")
