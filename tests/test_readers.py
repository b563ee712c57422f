"""Every input format, and every bad input: one clear sentence, non-zero exit, nothing
left behind."""

import polars as pl
import pytest

from fastattrec.data.ratings import read_ratings
from fastattrec.data.readers import ColumnNames, detect_format
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


# ---- files that are valid but were refused, and refusals that were unclear -------------

@pytest.mark.parametrize("tail", ["\n", "\n\n\n", "\r\n"])
def test_trailing_blank_lines_are_accepted(tmp_path, tail):
    for name, text in (("r.dat", "1::10::5::100\n1::20::3::50\n2::10::4::10\n"),
                       ("u.data", "1\t10\t5\t100\n1\t20\t3\t50\n2\t10\t4\t10\n"),
                       ("log.csv", "user_id,item_id,rating,timestamp\n1,10,5,100\n1,20,3,50\n"
                                   "2,10,4,10\n")):
        frame, _ = read_ratings(write(tmp_path / name, text + tail))
        _check(frame)


def test_blank_line_mid_file_is_named(tmp_path):
    src = write(tmp_path / "r.dat", "1::10::5::100\n\n1::20::3::50\n2::10::4::10\n")
    msg = prep_fails(tmp_path, src)
    assert "line 2 is blank" in msg


@pytest.mark.parametrize("kind", ["gzip", "bz2", "xz", "zstd"])
def test_compressed_inputs_are_read(tmp_path, kind):
    import bz2
    import gzip
    import lzma

    raw = b"1::10::5::100\n1::20::3::50\n2::10::4::10\n2::30::4::11\n"
    if kind == "zstd":
        zstandard = pytest.importorskip("zstandard")
        data, suffix = zstandard.ZstdCompressor().compress(raw), ".zst"
    else:
        mod = {"gzip": gzip, "bz2": bz2, "xz": lzma}[kind]
        data, suffix = mod.compress(raw), {"gzip": ".gz", "bz2": ".bz2", "xz": ".xz"}[kind]
    src = tmp_path / f"ratings.dat{suffix}"
    src.write_bytes(data)
    r = cli("prep", src, "-o", tmp_path / "out", "--test-negatives", "1")
    assert r.exit_code == 0, r.output
    from fastattrec.data.dataset import load_prepared

    p = load_prepared(tmp_path / "out")
    assert p.items.tolist() == [2, 1, 1, 3]  # user 1: 20 (t=50), 10; user 2: 10, 30
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == [
        "items.parquet", "meta.json", "sequences.parquet", "test_negatives.parquet",
        "users.parquet"]


def test_bad_line_in_a_compressed_file_names_the_compressed_file(tmp_path):
    import gzip

    src = tmp_path / "ratings.dat.gz"
    src.write_bytes(gzip.compress(b"1::10::5::100\n1::20::3::x\n"))
    msg = prep_fails(tmp_path, src)
    assert "ratings.dat.gz, line 2" in msg and "_input_" not in msg


def test_truncated_gzip_is_one_sentence(tmp_path):
    import gzip

    src = tmp_path / "ratings.dat.gz"
    src.write_bytes(gzip.compress(b"1::10::5::100\n" * 1000)[:-30])
    msg = prep_fails(tmp_path, src)
    assert msg.endswith("ratings.dat.gz is truncated (the gzip stream ends mid-member); "
                        "download it again.")


def test_types_are_judged_from_the_whole_column(tmp_path):
    head = "".join(f"{u},{i},{u * 100 + i}\n" for u in range(1, 401) for i in range(1, 31))
    late = "alice,7,5\nalice,8,6.5\n"
    src = write(tmp_path / "log.csv", "user,item,time\n" + head + late)
    frame, _ = read_ratings(src)
    assert frame.schema["user"] == pl.String and frame.height == 12002
    assert frame.schema["time"] == pl.Float64
    assert frame.filter(pl.col("user") == "alice").get_column("time").to_list() == [5.0, 6.5]
    # The same with the bad value being truly bad: named with its line.
    src = write(tmp_path / "log2.csv", "user,item,time\n" + head + "1,2,soon\n")
    msg = prep_fails(tmp_path, src)
    assert "line 12002" in msg and "'soon'" in msg


def test_latin1_line_is_named(tmp_path):
    src = tmp_path / "log.csv"
    src.write_bytes("user,item,time\nann,x,1\nren\xe9,y,2\n".encode("latin-1"))
    msg = prep_fails(tmp_path, src)
    assert "line 3" in msg and "UTF-8" in msg


@pytest.mark.parametrize("col,values,expect", [
    ("t", ["3", "2", "1", "1", "2", "3"], None),
    ("t", ["2020-01-03", "2020-01-02", "2020-01-01", "2020-01-01", "2020-01-02",
           "2020-01-03"], None),
    ("t", ["3", "2", "x", "1", "2", "3"], "row 3"),
    ("r", ["5", "4", "bad", "3", "2", "1"], "row 3"),
    ("u", [[1], [1], [1], [2], [2], [2]], "List"),
])
def test_parquet_column_types(tmp_path, col, values, expect):
    cols = {"u": [5, 5, 5, 6, 6, 6], "i": [1, 2, 3, 3, 1, 4], "t": [3, 2, 1, 1, 2, 3],
            "r": [5.0, 4.0, 3.0, 3.0, 2.0, 1.0]}
    cols[col] = values
    pl.DataFrame(cols).write_parquet(tmp_path / "x.parquet")
    args = ("--user-col", "u", "--item-col", "i", "--time-col", "t", "--rating-col", "r")
    if expect is None:
        r = cli("prep", tmp_path / "x.parquet", "-o", tmp_path / "out", "--test-negatives",
                "1", *args)
        assert r.exit_code == 0, r.output
    else:
        msg = prep_fails(tmp_path, tmp_path / "x.parquet", *args)
        assert expect in msg and "x.parquet" in msg


def test_sequence_pairs_in_file_order(tmp_path):
    src = write(tmp_path / "seq.txt", "1 10\n2 30\n1  20\n1\t10\n2 40\n\n")
    frame, scan = read_ratings(src, "sequence-pairs")
    assert frame.select("user", "item").rows() == [(1, 10), (2, 30), (1, 20), (1, 10), (2, 40)]
    assert frame.get_column("time").to_list() == [1, 2, 3, 4, 5]
    assert not scan.has_rating
    bad = write(tmp_path / "bad.txt", "1 10\n1 20 30\n")
    msg = prep_fails(tmp_path, bad, "--format", "sequence-pairs")
    assert "line 2" in msg and "expected 2 fields" in msg


def test_sequence_lines_one_user_a_line(tmp_path):
    src = write(tmp_path / "seq.txt", "u1 a b c\nu2 c a e\nu1 d\n")
    frame, _ = read_ratings(src, "sequence-lines")
    assert frame.select("user", "item", "_line").rows() == [
        ("u1", "a", 1), ("u1", "b", 1), ("u1", "c", 1), ("u2", "c", 2), ("u2", "a", 2),
        ("u2", "e", 2), ("u1", "d", 3)]
    r = cli("prep", src, "-o", tmp_path / "out", "--format", "sequence-lines",
            "--test-negatives", "1")
    assert r.exit_code == 0, r.output
    from fastattrec.data.dataset import load_prepared

    p = load_prepared(tmp_path / "out")
    # items a, b, c, d, e -> 1..5; u1: a b c d; u2: c a e
    assert p.items.tolist() == [1, 2, 3, 4, 3, 1, 5]
    (tmp_path / "f").mkdir()
    msg = prep_fails(tmp_path / "f", write(tmp_path / "b.txt", "u1 a b\nu2\nu3 a b\n"),
                     "--format", "sequence-lines")
    assert "line 2" in msg and "no item" in msg


def test_unknown_whitespace_format_points_to_sequence_formats(tmp_path):
    msg = prep_fails(tmp_path, write(tmp_path / "seq.txt", "1 10\n1 20\n"))
    assert "sequence-pairs" in msg


def test_cli_format_choices_match_the_reader():
    from fastattrec.cli import PREP_FORMATS
    from fastattrec.data.readers import FORMATS

    assert tuple(PREP_FORMATS) == FORMATS


def test_ids_beyond_64_bits_stay_exact_as_text(tmp_path):
    big = 10**21
    src = write(tmp_path / "log.csv", "user,item,time\n" + "".join(
        f"{big + u},{i},{u * 10 + i}\n" for u in (1, 2) for i in (1, 2, 3)))
    frame, _ = read_ratings(src)
    assert frame.schema["user"] == pl.String
    assert sorted(set(frame.get_column("user"))) == [str(big + 1), str(big + 2)]


def test_latin1_in_a_sequence_format_is_named(tmp_path):
    src = tmp_path / "seq.txt"
    src.write_bytes("ann a\nann b\njos\xe9 caf\xe9\n".encode("latin-1"))
    msg = prep_fails(tmp_path, src, "--format", "sequence-pairs")
    assert "line 3 is not UTF-8" in msg


def test_empty_value_and_unbalanced_quote_are_named(tmp_path):
    src = write(tmp_path / "log.csv", "user,item,rating,time\n1,2,5,1\n1,3,,2\n2,2,4,1\n")
    msg = prep_fails(tmp_path, src, "--trans-score", "1")
    assert "line 3: no value in the column 'rating'" in msg
    src = write(tmp_path / "q.csv", 'user,item,time\n1,2,1\n"1,3,2\n2,2,1\n')
    msg = prep_fails(tmp_path, src)
    assert "line 3" in msg and "quote" in msg


def test_huge_values_are_shortened_in_messages(tmp_path):
    src = write(tmp_path / "r.dat", "1::10::5::100\n1::20::5::" + "9" * 100_000 + "x\n")
    msg = prep_fails(tmp_path, src)
    assert "line 2" in msg and len(msg) < 400
