"""`fastattrec prep`: the split, the order, the ids and the files, checked against values
worked out by hand, plus properties on random logs (hypothesis)."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastattrec.data.dataset import load_prepared
from fastattrec.data.prepare import PrepOptions, prepare

from helpers import TINY_ML1M, cli, write


def test_hand_worked_split(tmp_path):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    s = prepare(src, tmp_path / "out", PrepOptions(test_negatives=2))
    p = load_prepared(tmp_path / "out")
    # Raw items sorted: 10, 20, 30, 40, 50, 60, 70 -> dense 1..7. Kept users 1, 2, 4 -> 1..3.
    # user 1 by time (tie at t=100 in file order): 20, 10, 30, 40 -> 2, 1, 3, 4
    # user 2: 10, 50, 60 -> 1, 5, 6;  user 4: 70, 10 -> 7, 1
    assert p.items.tolist() == [2, 1, 3, 4, 1, 5, 6, 7, 1]
    assert p.offsets.tolist() == [0, 4, 7]
    assert p.lengths.tolist() == [4, 3, 2]
    assert p.raw_users.to_list() == [1, 2, 4]
    assert p.raw_items.to_list() == [10, 20, 30, 40, 50, 60, 70]
    assert s.counts == {
        "rows_read": 10, "rows_after_trans_score": 10, "users": 3, "items": 7,
        "item_rows": 8, "interactions": 9, "train_samples": 1, "val_samples": 2,
        "test_samples": 3, "dropped_users": 1, "dropped_interactions": 1,
    }
    assert p.test_negs.shape == (3, 2)


def test_trans_score_filters_before_split(tmp_path):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    s = prepare(src, tmp_path / "out", PrepOptions(trans_score=3, test_negatives=2))
    p = load_prepared(tmp_path / "out")
    # Rows with rating < 3 go first: 1::40 (1) and 2::50 (2). Items left: 10,20,30,60,70.
    assert s.counts["rows_after_trans_score"] == 8
    assert p.raw_items.to_list() == [10, 20, 30, 60, 70]
    # user 1: 20, 10, 30 -> 2, 1, 3; user 2: 10, 60 -> 1, 4; user 4: 70, 10 -> 5, 1
    assert p.items.tolist() == [2, 1, 3, 1, 4, 5, 1]
    assert s.counts["train_samples"] == 0 and s.counts["val_samples"] == 1


def test_meta_records_parameters_and_source(tmp_path):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    prepare(src, tmp_path / "out", PrepOptions(test_negatives=3, seed=7))
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["format_version"] == 1
    assert meta["params"]["seed"] == 7 and meta["params"]["test_negatives_per_user"] == 3
    assert meta["source"]["size"] == src.stat().st_size
    import hashlib

    assert meta["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["source"]["format"] == "ml-1m"


def test_notebook_compat_keeps_raw_ids_and_draws_101_with_repeats(tmp_path):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    s = prepare(src, tmp_path / "out", PrepOptions(compat="notebook"))
    p = load_prepared(tmp_path / "out")
    assert p.items.tolist() == [20, 10, 30, 40, 10, 50, 60, 70, 10]  # raw ids are rows
    assert s.counts["item_rows"] == 71  # max raw id + 1, as the notebook's item_num
    assert p.test_negs.shape == (3, 101)
    # Negatives come from 1..70 minus the user's own items; with 101 draws from ~66 ids,
    # repeats must occur.
    assert p.test_negs.min() >= 1 and p.test_negs.max() <= 70
    assert any(len(set(row)) < 101 for row in p.test_negs.tolist())
    seen = {0: {20, 10, 30, 40}, 1: {10, 50, 60}, 2: {70, 10}}
    for u, row in enumerate(p.test_negs.tolist()):
        assert not seen[u] & set(row)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        prepare(src, tmp_path / name, PrepOptions(test_negatives=2, seed=seed))
    files = ["sequences.parquet", "users.parquet", "items.parquet", "test_negatives.parquet",
             "meta.json"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "test_negatives.parquet").read_bytes() != (
        tmp_path / "c" / "test_negatives.parquet").read_bytes()


def test_refuses_existing_output_unless_force(tmp_path):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    out = tmp_path / "out"
    assert cli("prep", src, "-o", out, "--test-negatives", "2").exit_code == 0
    again = cli("prep", src, "-o", out, "--test-negatives", "2")
    assert again.exit_code != 0 and "already exists" in again.output
    forced = cli("prep", src, "-o", out, "--test-negatives", "3", "--force")
    assert forced.exit_code == 0
    assert load_prepared(out).test_negs.shape == (3, 3)


def test_interrupted_prep_leaves_nothing(tmp_path, monkeypatch):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    import fastattrec.data.prepare as prep_mod

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep_mod, "distinct_test_draws", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, tmp_path / "out", PrepOptions(test_negatives=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.dat"]


def test_summary_table_printed(tmp_path):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    r = cli("prep", src, "-o", tmp_path / "out", "--test-negatives", "2")
    assert r.exit_code == 0
    for label in ("users", "items", "interactions", "train samples", "test samples",
                  "users dropped", "time"):
        assert label in r.output


# ---- properties on random logs ---------------------------------------------------------

def random_log(draw):
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(8, 40))
    rows = []
    for u in range(1, n_users + 1):
        k = draw(st.integers(1, 7))
        items = draw(st.lists(st.integers(1, n_items), min_size=k, max_size=k))
        times = draw(st.lists(st.integers(0, 4), min_size=k, max_size=k))  # many ties
        rows += [(u, i, 3, t) for i, t in zip(items, times, strict=True)]
    order = draw(st.permutations(range(len(rows))))
    return [rows[j] for j in order]


@st.composite
def logs(draw):
    return random_log(draw)


def expected_sequences(rows):
    """Independent computation: group by user, stable sort by time (file order on ties)."""
    by_user = {}
    for u, i, _, t in rows:
        by_user.setdefault(u, []).append((t, i))
    return {u: [i for _, i in sorted(v, key=lambda x: x[0])] for u, v in by_user.items()}


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=logs(), seed=st.integers(0, 3))
def test_properties_on_random_logs(tmp_path, rows, seed):
    import uuid

    case = tmp_path / uuid.uuid4().hex  # hypothesis reuses tmp_path across examples
    src = write(case / "log.dat", "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    out = case / "out"
    want = expected_sequences(rows)
    kept = {u: s for u, s in want.items() if len(s) >= 2}
    items_kept = sorted({i for s in kept.values() for i in s})
    n_neg = 3
    if not kept or any(len(items_kept) - len(set(s)) < n_neg for s in kept.values()):
        r = cli("prep", src, "-o", out, "--test-negatives", n_neg, "--seed", seed)
        assert r.exit_code != 0 and not out.exists()
        assert sorted(x.name for x in case.iterdir()) == ["log.dat"]  # no temp folder left
        return
    prepare(src, out, PrepOptions(test_negatives=n_neg, seed=seed))
    p = load_prepared(out)
    dense_item = {raw: k + 1 for k, raw in enumerate(items_kept)}
    users = sorted(kept)
    # Sequences: time order, ties in file order, dense ids.
    got = np.split(p.items, np.cumsum(p.lengths)[:-1])
    assert [g.tolist() for g in got] == [[dense_item[i] for i in kept[u]] for u in users]
    # Counts follow the formula.
    lengths = np.array([len(kept[u]) for u in users])
    meta = json.loads((out / "meta.json").read_text())["counts"]
    assert meta["train_samples"] == int(np.maximum(lengths - 3, 0).sum())
    assert meta["val_samples"] == int((lengths >= 3).sum())
    assert meta["test_samples"] == len(users)
    # Negatives: never the user's own items, inside the universe; test ones distinct.
    for k, u in enumerate(users):
        own = {dense_item[i] for i in kept[u]}
        negs = p.negs[p.offsets[k]:p.offsets[k] + p.lengths[k]].tolist()
        assert not own & set(negs)
        assert all(1 <= n <= len(items_kept) for n in negs)
        test = p.test_negs[k].tolist()
        assert len(set(test)) == n_neg and not own & set(test)


def test_negatives_cover_the_unseen_items_uniformly(tmp_path):
    """User 1 saw items {2, 3, 7} of 1..10 (700 times, repeats allowed): each of the 7
    unseen items is drawn with probability 1/7, and never a seen one."""
    lines = [f"1::{(2, 3, 7)[k % 3]}::3::{k}" for k in range(700)]
    lines += [f"2::{i}::3::{k}" for k, i in enumerate((1, 4, 5, 6, 8, 9, 10))]
    src = write(tmp_path / "r.dat", "\n".join(lines) + "\n")
    prepare(src, tmp_path / "out", PrepOptions(test_negatives=3, seed=1))
    p = load_prepared(tmp_path / "out")
    negs = p.negs[: p.lengths[0]]
    counts = np.bincount(negs, minlength=11)
    assert counts[[0, 2, 3, 7]].sum() == 0
    share = counts[[1, 4, 5, 6, 8, 9, 10]] / negs.size
    assert (np.abs(share - 1 / 7) < 0.045).all(), share
    assert set(p.test_negs[1].tolist()) == {2, 3, 7}  # user 2 has exactly 3 unseen


def test_string_ids_and_named_columns(tmp_path):
    csv = "who,what,when,stars\nann,x,2020-01-02,4\nann,y,2020-01-01,5\nbob,x,2020-01-01,3\n" \
          "bob,z,2020-01-03,2\nbob,y,2020-01-02,1\nann,w,2020-01-03,3\n"
    src = write(tmp_path / "log.csv", csv)
    r = cli("prep", src, "-o", tmp_path / "out", "--user-col", "who", "--item-col", "what",
            "--time-col", "when", "--rating-col", "stars", "--test-negatives", "1")
    assert r.exit_code == 0, r.output
    p = load_prepared(tmp_path / "out")
    assert p.raw_users.to_list() == ["ann", "bob"]
    assert p.raw_items.to_list() == ["w", "x", "y", "z"]
    # ann: y (01-01), x (01-02), w (01-03) -> 3, 2, 1; bob: x, y, z by date -> 2, 3, 4
    assert p.items.tolist() == [3, 2, 1, 2, 3, 4]


def test_parquet_input(tmp_path):
    pl.DataFrame({"user_id": [5, 5, 5, 6, 6, 6], "item_id": [1, 2, 3, 3, 1, 4],
                  "timestamp": [3, 2, 1, 1, 2, 3]}).write_parquet(tmp_path / "log.parquet")
    prepare(tmp_path / "log.parquet", tmp_path / "out", PrepOptions(test_negatives=1))
    p = load_prepared(tmp_path / "out")
    assert p.items.tolist() == [3, 2, 1, 3, 1, 4]
    assert json.loads(Path(tmp_path / "out" / "meta.json").read_text())["params"][
        "trans_score"] is None


# ---- the rating filter, byte-identical output, damaged datasets -------------------------

def test_default_keeps_every_rating_even_zero_and_half_stars(tmp_path):
    src = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"
                                          "1,10,0.5,1\n1,20,0.0,2\n1,30,4.5,3\n2,10,0.5,1\n"
                                          "2,40,1.0,2\n")
    prepare(src, tmp_path / "out", PrepOptions(test_negatives=1))
    p = load_prepared(tmp_path / "out")
    assert p.meta["counts"]["interactions"] == 5
    assert p.meta["params"]["trans_score"] is None
    prepare(src, tmp_path / "f", PrepOptions(test_negatives=1, trans_score=0.5))
    assert load_prepared(tmp_path / "f").meta["counts"]["interactions"] == 4


def test_nan_ratings_and_nan_trans_score_are_refused(tmp_path):
    src = write(tmp_path / "log.csv", "user,item,rating,time\n1,10,5,1\n1,20,NaN,2\n"
                                      "2,10,4,1\n2,30,3,2\n")
    r = cli("prep", src, "-o", tmp_path / "out", "--test-negatives", "1", "--trans-score", "3")
    assert r.exit_code != 0 and "line 3" in r.output and "NaN" in r.output
    assert not (tmp_path / "out").exists()
    r = cli("prep", src, "-o", tmp_path / "out", "--test-negatives", "1", "--trans-score", "nan")
    assert r.exit_code != 0 and "--trans-score must be a finite number" in r.output
    # Without a filter the rating is not used, so the file prepares.
    assert cli("prep", src, "-o", tmp_path / "out", "--test-negatives", "1").exit_code == 0


def test_same_bytes_at_a_size_where_polars_splits_the_work(tmp_path):
    from fastattrec.data.synth import synthesize

    synthesize(tmp_path / "r.dat", 6040, 3706, 1_000_209, seed=0)
    for name in ("a", "b"):
        prepare(tmp_path / "r.dat", tmp_path / name, PrepOptions())
    for f in ("sequences.parquet", "users.parquet", "items.parquet", "test_negatives.parquet",
              "meta.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


@pytest.mark.parametrize("meta,expect", [
    ("[]", "JSON list"), ("{}", "format None"),
    ('{"format_version": "1"}', "format_version as '1'"),
    ('{"format_version": 1}', "lacks or garbles"), ("{oops", "unreadable"),
])
def test_damaged_meta_json_is_one_sentence(tmp_path, meta, expect):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    prepare(src, tmp_path / "out", PrepOptions(test_negatives=2))
    (tmp_path / "out" / "meta.json").write_text(meta)
    r = cli("train", tmp_path / "out", "-o", tmp_path / "run")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert expect in r.output and "meta.json" in r.output


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_parquet_in_a_dataset_is_one_sentence(tmp_path, damage):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    prepare(src, tmp_path / "out", PrepOptions(test_negatives=2))
    f = tmp_path / "out" / "sequences.parquet"
    f.write_bytes(b"" if damage == "empty" else f.read_bytes()[:40])
    r = cli("train", tmp_path / "out", "-o", tmp_path / "run")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "damaged Parquet" in r.output
