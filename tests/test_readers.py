"""Every input format, and every bad input: one clear sentence, non-zero exit, nothing
left behind."""

import polars as pl
import pytest

from fastattrec.data.readers import ColumnNames, detect_format, read_ratings
from fastattrec.errors import UserError

from helpers import cli, write

ROWS = [(1, 10, 5.0, 100), (1, 20, 3.0, 50), (2, 10, 4.0, 10)]


def _check(frame):
    assert frame.select("user", "item", "rating", "time").rows() == ROWS


@pytest.mark.parametrize("name,text,fmt", [
    ("ratings.dat", "1::10::5::100\n1::20::3::50\n2::10::4::10\n", "ml-1m"),
    ("u.data", "1\t10\t5\t100\n1\t20\t3\t50\n2\t10\t4\t10\n", "ml-100k"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,100\n1,20,3.0,50\n2,10,4.0,10\n",
     "ml-20m"),
    ("ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                 "1\t10\t5\t100\n1\t20\t3\t50\n2\t10\t4\t10\n", "recbole"),
    ("log.csv", "user_id,item_id,rating,timestamp\n1,10,5,100\n1,20,3,50\n2,10,4,10\n", "csv"),
    ("log.tsv", "user_id\titem_id\trating\ttimestamp\n1\t10\t5\t100\n1\t20\t3\t50\n2\t10\t4\t10\n",
     "tsv"),
])
def test_each_format_is_detected_and_read(tmp_path, name, text, fmt):
    path = write(tmp_path / name, text)
    assert detect_format(path) == fmt
    frame, scan = read_ratings(path)
    assert scan.fmt == fmt
    _check(frame)
    assert frame.get_column("_line").to_list() == (
        [1, 2, 3] if fmt in ("ml-1m", "ml-100k") else [2, 3, 4])


def test_parquet_with_named_columns(tmp_path):
    pl.DataFrame({"u": [1, 1, 2], "i": [10, 20, 10], "r": [5.0, 3.0, 4.0],
                  "t": [100, 50, 10]}).write_parquet(tmp_path / "x.parquet")
    frame, scan = read_ratings(tmp_path / "x.parquet", "auto", ColumnNames("u", "i", "t", "r"))
    assert scan.fmt == "parquet"
    _check(frame)


def prep_fails(tmp_path, src, *extra):
    out = tmp_path / "out"
    r = cli("prep", src, "-o", out, "--test-negatives", "1", *extra)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    return r.output.strip().splitlines()[-1]


def test_missing_file(tmp_path):
    msg = prep_fails(tmp_path, tmp_path / "nope.dat")
    assert "nope.dat does not exist" in msg


def test_empty_file(tmp_path):
    msg = prep_fails(tmp_path, write(tmp_path / "r.dat", ""))
    assert "r.dat is empty" in msg


def test_unknown_format(tmp_path):
    msg = prep_fails(tmp_path, write(tmp_path / "r.txt", "hello world\n"))
    assert "cannot tell the format" in msg and "--format" in msg


def test_wrong_separator(tmp_path):
    src = write(tmp_path / "r.dat", "1\t10\t5\t100\n2\t10\t4\t10\n")
    msg = prep_fails(tmp_path, src, "--format", "ml-1m")
    assert "line 1" in msg and "'::'" in msg


def test_wrong_number_of_fields(tmp_path):
    src = write(tmp_path / "r.dat", "1::10::5::100\n1::20::3::50\n2::10::4\n2::30::4::11\n")
    msg = prep_fails(tmp_path, src)
    assert "r.dat, line 3" in msg and "expected 4 fields" in msg


def test_too_many_fields(tmp_path):
    src = write(tmp_path / "u.data", "1\t10\t5\t100\n1\t20\t3\t50\t9\n")
    msg = prep_fails(tmp_path, src, "--format", "ml-100k")
    assert "line 2" in msg and "found 5" in msg


def test_non_numeric_timestamp(tmp_path):
    src = write(tmp_path / "r.dat", "1::10::5::100\n1::20::3::5O\n2::10::4::10\n")
    msg = prep_fails(tmp_path, src)
    assert "line 2" in msg and "time" in msg and "'5O'" in msg


def test_non_numeric_rating(tmp_path):
    src = write(tmp_path / "u.data", "1\t10\t5\t100\n1\t20\tgood\t50\n")
    msg = prep_fails(tmp_path, src)
    assert "line 2" in msg and "rating" in msg and "'good'" in msg


def test_no_rows_after_trans_score(tmp_path):
    src = write(tmp_path / "r.dat", "1::10::1::100\n1::20::2::50\n")
    msg = prep_fails(tmp_path, src, "--trans-score", "4")
    assert "no rows left after --trans-score 4" in msg


def test_user_who_saw_too_many_items(tmp_path):
    src = write(tmp_path / "r.dat", "1::1::5::1\n1::2::5::2\n1::3::5::3\n2::4::5::1\n2::1::5::2\n")
    out = tmp_path / "out"
    r = cli("prep", src, "-o", out, "--test-negatives", "2")
    assert r.exit_code != 0 and not out.exists()
    assert "user 1 has seen 3 of the 4 items" in r.output
    assert "--test-negatives to at most 1" in r.output


def test_bad_column_name(tmp_path):
    src = write(tmp_path / "log.csv", "a,b,c\n1,2,3\n")
    msg = prep_fails(tmp_path, src, "--user-col", "user")
    assert "no column 'user'" in msg


def test_bad_date(tmp_path):
    src = write(tmp_path / "log.csv", "user,item,time\n1,2,2020-01-01\n1,3,yesterday\n")
    msg = prep_fails(tmp_path, src)
    assert "line 3" in msg and "'yesterday'" in msg


def test_trans_score_without_rating_column(tmp_path):
    src = write(tmp_path / "log.csv", "user,item,time\n1,2,1\n1,3,2\n2,2,1\n")
    msg = prep_fails(tmp_path, src, "--trans-score", "2")
    assert "no rating column" in msg


def test_compat_needs_integer_items(tmp_path):
    src = write(tmp_path / "log.csv", "user,item,time\n1,a,1\n1,b,2\n2,a,1\n")
    msg = prep_fails(tmp_path, src, "--compat", "notebook")
    assert "integers" in msg


def test_user_error_type():
    with pytest.raises(UserError):
        read_ratings("/nonexistent/file.dat")
