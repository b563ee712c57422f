"""Loading a prepared dataset checks every column of every file against meta.json and the
other files: an edited or damaged file is one sentence naming it and the fix, never a
traceback and never a run on wrong data (issue 20, D8 and D9)."""

import json

import polars as pl
import pytest

import fastattrec as fa
from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.errors import UserError

from helpers import TINY_ML1M, cli, write

ARGS = ("--epochs", "1", "--dim", "4", "--device", "cpu", "--no-compile")


@pytest.fixture
def ds(tmp_path):
    """TINY_ML1M prepared with 2 test negatives: users 1, 2, 4 (lengths 4, 3, 2), 7 items."""
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    prepare(src, tmp_path / "ds", PrepOptions(test_negatives=2))
    return tmp_path / "ds"


def refused(ds, tmp_path):
    """The one line `train` prints for the dataset; nothing of a run is left."""
    r = cli("train", ds, "-o", tmp_path / "run", *ARGS)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    lines = r.output.strip().splitlines()
    assert len(lines) == 1, r.output
    return lines[0]


def edit(path, **columns):
    frame = pl.read_parquet(path)
    frame.with_columns(**columns).write_parquet(path)


def test_a_null_item_names_the_file_the_column_and_the_row(ds, tmp_path):
    edit(ds / "sequences.parquet",
         item=pl.when(pl.int_range(pl.len()) == 2).then(None).otherwise(pl.col("item")))
    msg = refused(ds, tmp_path)
    assert "sequences.parquet has 1 empty (null) value(s) in column item" in msg
    assert "the first in row 3" in msg and f"fastattrec prep INPUT -o {ds} --force" in msg


def test_a_null_raw_user_is_refused(ds, tmp_path):
    edit(ds / "users.parquet",
         raw_user=pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col("raw_user")))
    assert "users.parquet has 1 empty (null) value(s) in column raw_user" in refused(ds, tmp_path)


def test_lengths_that_are_not_whole_numbers_are_refused(ds, tmp_path):
    # 4.5, 3.5, 2.5: cut to 4, 3, 2 they would pass every other check, silently.
    edit(ds / "users.parquet", length=pl.col("length").cast(pl.Float64) + 0.5)
    msg = refused(ds, tmp_path)
    assert "users.parquet column length holds Float64, not whole numbers" in msg


def test_an_items_file_missing_an_item_disagrees_with_meta_json(ds, tmp_path):
    items = pl.read_parquet(ds / "items.parquet")
    items.head(items.height - 1).write_parquet(ds / "items.parquet")
    msg = refused(ds, tmp_path)
    assert "items.parquet has 6 rows but meta.json counts 7 items" in msg


def test_test_negatives_listed_under_the_wrong_users_are_refused(ds, tmp_path):
    edit(ds / "test_negatives.parquet", user=pl.col("user").reverse())
    msg = refused(ds, tmp_path)
    assert "test_negatives.parquet" in msg and "users in id order" in msg


def test_zero_test_negatives_per_user_is_refused_at_load(ds, tmp_path):
    """meta.json saying 0 test negatives, with an empty test_negatives.parquet, would rank
    every test target first: HR@10 1.0000."""
    meta = json.loads((ds / "meta.json").read_text())
    meta["params"]["test_negatives_per_user"] = 0
    (ds / "meta.json").write_text(json.dumps(meta))
    test = pl.read_parquet(ds / "test_negatives.parquet")
    test.head(0).write_parquet(ds / "test_negatives.parquet")
    msg = refused(ds, tmp_path)
    assert "meta.json gives params.test_negatives_per_user as 0" in msg
    assert "--test-negatives" in msg
    with pytest.raises(UserError, match="test_negatives_per_user as 0"):
        fa.load_dataset(ds)


@pytest.mark.parametrize("key", ["users", "items", "interactions", "item_rows"])
def test_counts_of_zero_are_refused(ds, tmp_path, key):
    meta = json.loads((ds / "meta.json").read_text())
    meta["counts"][key] = 0
    (ds / "meta.json").write_text(json.dumps(meta))
    assert f"meta.json gives counts.{key} as 0" in refused(ds, tmp_path)


def test_a_file_that_cannot_be_read_is_not_called_damaged(ds, tmp_path, monkeypatch):
    """Polars reports a file it may not open as PermissionError('Permission denied (os
    error 13): PATH'), without an errno (seen as an unprivileged user; these tests may run
    as root, for whom chmod 000 denies nothing)."""
    real = pl.read_parquet

    def denied(source, *a, **k):
        if str(source).endswith("sequences.parquet"):
            raise PermissionError(f"Permission denied (os error 13): {source}")
        return real(source, *a, **k)

    monkeypatch.setattr(pl, "read_parquet", denied)
    msg = refused(ds, tmp_path)
    assert f"cannot read {ds / 'sequences.parquet'} (permission denied)" in msg
    assert "damaged" not in msg
