"""Ids that look numeric but are written differently (`01`, `1`, `001`; `1.0`, `1.00`; `+1`,
` 1`) are distinct ids, kept as text; an id column becomes integers only when every
value is written as its integer is. Each format, with hand-worked dense ids, and the
choice shown in the prep summary and meta.json."""

import json
import re

import polars as pl
import pytest

from helpers import cli, write

# Seven item texts that an integer reading would merge into item 1. Sorted as strings
# (byte order: space < '+' < '0' < '1' < '.'), they get dense ids 1..7:
#   ' 1' -> 1, '+1' -> 2, '001' -> 3, '01' -> 4, '1' -> 5, '1.0' -> 6, '1.00' -> 7
ITEM_TEXTS = [" 1", "+1", "001", "01", "1", "1.0", "1.00"]
# user a, times 1..4: 01, 1, 001, 1.0; user b, times 1..4: 1.00, +1, ' 1', 1
ROWS = [("a", "01", 1), ("a", "1", 2), ("a", "001", 3), ("a", "1.0", 4),
        ("b", "1.00", 1), ("b", "+1", 2), ("b", " 1", 3), ("b", "1", 4)]
SEQUENCES = [4, 5, 3, 6, 7, 2, 1, 5]


def prep(tmp_path, src, *extra):
    out = tmp_path / "out"
    r = cli("prep", src, "-o", out, "--test-negatives", "1", *extra)
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "meta.json").read_text())
    tables = {n: pl.read_parquet(out / f"{n}.parquet") for n in ("sequences", "users", "items")}
    return r.output, meta, tables


def summary_types(output):
    """The (user, item) id types of prep's summary line."""
    m = re.search(r"^ids read as \(user, item\) +(\w+), (\w+)$", output, re.M)
    assert m, output
    return m.groups()


@pytest.mark.parametrize("name,sep", [("log.csv", ","), ("log.tsv", "\t")])
def test_csv_and_tsv_keep_each_spelling_as_its_own_item(tmp_path, name, sep):
    text = sep.join(("user", "item", "time")) + "\n" + "".join(
        sep.join((u, i, str(t))) + "\n" for u, i, t in ROWS)
    out, meta, t = prep(tmp_path, write(tmp_path / name, text))
    assert t["items"].to_dict(as_series=False) == {"item": [1, 2, 3, 4, 5, 6, 7],
                                                   "raw_item": ITEM_TEXTS}
    assert t["sequences"]["item"].to_list() == SEQUENCES
    assert meta["counts"]["items"] == 7
    assert meta["source"]["id_types"] == {"user": "string", "item": "string"}
    assert summary_types(out) == ("string", "string")


def test_movielens_dat_keeps_zero_padded_users_apart(tmp_path):
    # Users 01, 1 and 001 are three users (sorted: 001, 01, 1); items are plain integers.
    log = "01::10::5::1\n1::10::4::1\n001::20::3::1\n01::20::5::2\n1::30::4::2\n001::10::3::2\n"
    out, meta, t = prep(tmp_path, write(tmp_path / "ratings.dat", log))
    assert t["users"].to_dict(as_series=False) == {
        "user": [1, 2, 3], "raw_user": ["001", "01", "1"], "offset": [0, 2, 4],
        "length": [2, 2, 2]}
    assert t["items"]["raw_item"].to_list() == [10, 20, 30]
    assert t["items"].schema["raw_item"] == pl.Int64
    # 001: 20 then 10; 01: 10 then 20; 1: 10 then 30 (items 10, 20, 30 -> 1, 2, 3)
    assert t["sequences"]["item"].to_list() == [2, 1, 1, 2, 1, 3]
    assert meta["source"]["id_types"] == {"user": "string", "item": "integer"}
    assert summary_types(out) == ("string", "integer")


def test_parquet_string_column_keeps_its_text(tmp_path):
    pl.DataFrame({"user_id": ["a", "a", "a", "b", "b", "b"],
                  "item_id": ["007", "7", "07", "7", "007", "8"],
                  "timestamp": [1, 2, 3, 1, 2, 3]}).write_parquet(tmp_path / "x.parquet")
    out, meta, t = prep(tmp_path, tmp_path / "x.parquet")
    assert t["items"]["raw_item"].to_list() == ["007", "07", "7", "8"]
    assert t["sequences"]["item"].to_list() == [1, 3, 2, 3, 1, 4]
    assert summary_types(out) == ("string", "string")


def test_sequence_formats_keep_zero_padded_items(tmp_path):
    src = write(tmp_path / "seq.txt", "u1 01\nu1 1\nu2 1\nu2 02\n")
    out, meta, t = prep(tmp_path, src, "--format", "sequence-pairs")
    assert t["items"]["raw_item"].to_list() == ["01", "02", "1"]
    assert t["sequences"]["item"].to_list() == [1, 3, 3, 2]


def test_integers_written_as_integers_stay_integers(tmp_path):
    """The contrast: negative numbers and 0 are written exactly as their integers, so the
    column is read as integers and sorted as numbers (-5 < 0 < 9 < 10)."""
    src = write(tmp_path / "log.csv", "user,item,time\n7,10,1\n7,-5,2\n8,0,1\n8,9,2\n")
    out, meta, t = prep(tmp_path, src)
    assert t["items"].schema["raw_item"] == pl.Int64
    assert t["items"]["raw_item"].to_list() == [-5, 0, 9, 10]
    assert t["sequences"]["item"].to_list() == [4, 1, 2, 3]
    assert meta["source"]["id_types"] == {"user": "integer", "item": "integer"}
    assert summary_types(out) == ("integer", "integer")


def test_compat_notebook_refuses_zero_padded_items(tmp_path):
    """--compat notebook uses raw item ids as table rows: `01` is not a row number."""
    src = write(tmp_path / "ratings.dat", "1::01::5::1\n1::2::5::2\n2::2::5::1\n2::3::5::2\n")
    r = cli("prep", src, "-o", tmp_path / "out", "--compat", "notebook")
    assert r.exit_code != 0 and "must be integers" in r.output
    assert not (tmp_path / "out").exists()


def test_streaming_reads_the_same_ids(tmp_path):
    text = "user,item,time\n" + "".join(f"{u},{i},{t}\n" for u, i, t in ROWS)
    src = write(tmp_path / "log.csv", text)
    outs = []
    for extra in ((), ("--streaming",)):
        out = tmp_path / f"out{len(extra)}"
        r = cli("prep", src, "-o", out, "--test-negatives", "1", *extra)
        assert r.exit_code == 0, r.output
        outs.append(out)
    assert pl.read_parquet(outs[1] / "items.parquet")["raw_item"].to_list() == ITEM_TEXTS
    for name in ("sequences", "users", "items", "test_negatives"):
        assert (outs[0] / f"{name}.parquet").read_bytes() == (
            outs[1] / f"{name}.parquet").read_bytes()
