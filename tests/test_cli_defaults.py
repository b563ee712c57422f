"""`fastattrec prep`'s defaults, at the command line, against hand-worked values: every
row is kept whatever its rating (no --trans-score), users with one item are dropped,
ties keep file order, the leave-one-out split (last item test, the one before
validation), dense ids in raw-id order (no --compat), 100 distinct unseen test negatives,
seed 0, and the format and columns recognised without options (docs/spec.md §1,
docs/formats.md §1)."""

import json
import re

import polars as pl
import pytest

from helpers import cli, write

# MovieLens-1M lines user::item::rating::time, in a shuffled file order. Ratings are only
# 1, 2 and 3. By hand:
#   user 5: times 1..6 give items 200, 300, 100, 500, 400, 600 (n = 6: 3 train, val, test)
#   user 2: 700 at t=5, then 300 and 100 tied at t=10 (300 first in the file): 700, 300, 100
#   user 9: one item (800, seen by nobody else): dropped with its row
#   user 7: 100, 200 (n = 2: a test sample only)
LOG = """\
5::100::1::3
2::300::2::10
5::200::2::1
9::800::1::7
7::100::3::1
5::300::3::2
2::100::1::10
5::400::1::5
7::200::2::2
5::500::2::4
2::700::3::5
5::600::3::6
"""
# Dense ids: users in raw order 2 -> 1, 5 -> 2, 7 -> 3; items 100..700 -> 1..7.
SEQUENCES = [7, 3, 1, 2, 3, 1, 5, 4, 6, 1, 2]
USERS = {"user": [1, 2, 3], "raw_user": [2, 5, 7], "offset": [0, 3, 9], "length": [3, 6, 2]}
ITEMS = {"item": [1, 2, 3, 4, 5, 6, 7], "raw_item": [100, 200, 300, 400, 500, 600, 700]}
COUNTS = {"rows_read": 12, "rows_after_trans_score": 12, "users": 3, "items": 7,
          "item_rows": 8, "interactions": 11, "train_samples": 3, "val_samples": 2,
          "test_samples": 3, "dropped_users": 1, "dropped_interactions": 1}
SEEN = {1: {7, 3, 1}, 2: {2, 3, 1, 5, 4, 6}, 3: {1, 2}}


def prep(*args):
    r = cli("prep", *args)
    assert r.exit_code == 0, r.output
    return r


def read(out):
    meta = json.loads((out / "meta.json").read_text())
    tables = {name: pl.read_parquet(out / f"{name}.parquet")
              for name in ("sequences", "users", "items", "test_negatives")}
    return meta, tables


def test_without_trans_score_every_row_is_kept_whatever_its_rating(tmp_path):
    src = write(tmp_path / "ratings.dat", LOG)
    out = tmp_path / "data"
    r = prep(src, "-o", out, "--test-negatives", "1")
    meta, t = read(out)
    assert meta["counts"] == COUNTS
    assert meta["params"]["trans_score"] is None
    assert re.search(r"^rows below --trans-score +0$", r.output, re.M)
    assert re.search(r"^ids read as \(user, item\) +integer, integer$", r.output, re.M)
    assert t["sequences"]["item"].to_list() == SEQUENCES
    assert t["users"].to_dict(as_series=False) == USERS
    assert t["items"].to_dict(as_series=False) == ITEMS


def test_trans_score_given_is_the_only_filter(tmp_path):
    """The contrast: --trans-score 2 drops the five 1-star rows (user 5 keeps 200, 300,
    500, 600; user 2 keeps 300, 700; user 7 keeps 100, 200; user 9 has none)."""
    src = write(tmp_path / "ratings.dat", LOG)
    out = tmp_path / "data"
    prep(src, "-o", out, "--test-negatives", "1", "--trans-score", "2")
    meta, t = read(out)
    assert meta["params"]["trans_score"] == 2
    assert meta["counts"]["rows_after_trans_score"] == 8
    assert meta["counts"]["dropped_users"] == 0
    # items 100, 200, 300, 500, 600, 700 -> 1..6; user 2: 700, 300; 5: 200, 300, 500, 600
    assert t["sequences"]["item"].to_list() == [6, 3, 2, 3, 4, 5, 1, 2]


def test_split_ties_drops_and_negatives_by_hand(tmp_path):
    src = write(tmp_path / "ratings.dat", LOG)
    out = tmp_path / "data"
    prep(src, "-o", out, "--test-negatives", "1")
    meta, t = read(out)
    assert meta["params"]["compat"] == "none"
    assert meta["params"]["negative_universe"] == [1, 7]
    assert meta["source"]["format"] == "ml-1m"  # recognised by --format auto
    items = t["sequences"]["item"].to_list()
    negs = t["sequences"]["neg"].to_list()
    # Leave-one-out by row position: test = last row, validation = the one before.
    test_targets = [items[o + n - 1] for o, n in zip(USERS["offset"], USERS["length"],
                                                      strict=True)]
    val_targets = [items[o + n - 2] for o, n in zip(USERS["offset"], USERS["length"],
                                                     strict=True) if n >= 3]
    assert test_targets == [1, 6, 2]  # raw 100 (tie: file order), 600, 200
    assert val_targets == [3, 4]  # raw 300, 400
    # Every negative (drawn for every row) is an item the user never saw; user 5 (dense
    # 2) saw every item but 700, so all its negatives are 7.
    for user, o, n in zip(USERS["user"], USERS["offset"], USERS["length"], strict=True):
        for neg in negs[o:o + n]:
            assert 1 <= neg <= 7 and neg not in SEEN[user]
    assert negs[3:9] == [7] * 6
    tn = t["test_negatives"]
    assert tn["user"].to_list() == [1, 2, 3]
    assert tn["neg"][1] == 7
    assert all(n not in SEEN[u] for u, n in zip(tn["user"], tn["neg"], strict=True))


def test_columns_of_a_csv_are_guessed_and_nothing_is_filtered(tmp_path):
    """The same log as a CSV with a header in another column order: the columns are
    found without options, and the guessed rating column filters nothing."""
    lines = ["timestamp,rating,item_id,user_id"]
    for line in LOG.splitlines():
        u, i, rating, time = line.split("::")
        lines.append(f"{time},{rating},{i},{u}")
    src = write(tmp_path / "log.csv", "\n".join(lines) + "\n")
    prep(src, "-o", tmp_path / "csv", "--test-negatives", "1")
    meta, t = read(tmp_path / "csv")
    assert meta["counts"] == COUNTS
    assert t["sequences"]["item"].to_list() == SEQUENCES
    assert t["users"].to_dict(as_series=False) == USERS


# Users 1..50 see two items each (items 1001..1100, pairs); user 51 sees the 20 items
# 1101..1120, so the universe is 120 items and user 51 has exactly 100 unseen ones (items
# 1001..1100, dense 1..100): its 100 distinct test negatives must be exactly those.
def big_log(extra=""):
    lines = [f"{u}::{1000 + 2 * u - k}::1::{10 * u + k}" for u in range(1, 51) for k in (1, 0)]
    lines += [f"51::{1100 + j}::2::{1000 + j}" for j in range(1, 21)]
    return "\n".join(lines) + "\n" + extra


def test_default_test_negatives_are_100_distinct_unseen_items(tmp_path):
    src = write(tmp_path / "ratings.dat", big_log())
    out = tmp_path / "data"
    prep(src, "-o", out)
    meta, t = read(out)
    assert meta["params"]["test_negatives_per_user"] == 100
    assert meta["params"]["test_negatives_distinct"] is True
    assert meta["counts"]["rows_after_trans_score"] == 120  # all 1- and 2-star rows kept
    assert meta["counts"]["items"] == 120 and meta["counts"]["users"] == 51
    tn = t["test_negatives"]
    assert tn.height == 51 * 100
    assert tn["user"].to_list() == [u for u in range(1, 52) for _ in range(100)]
    by_user = tn.group_by("user", maintain_order=True).agg(pl.col("neg"))
    for user, negs in by_user.iter_rows():
        seen = {2 * user - 1, 2 * user} if user <= 50 else set(range(101, 121))
        assert len(set(negs)) == 100, user
        assert all(1 <= n <= 120 and n not in seen for n in negs), user
    assert sorted(by_user["neg"][-1].to_list()) == list(range(1, 101))


def test_default_100_needs_100_unseen_items(tmp_path):
    """User 51 also sees item 1001: 99 unseen items, fewer than the default 100."""
    src = write(tmp_path / "ratings.dat", big_log("51::1001::2::2000\n"))
    r = cli("prep", src, "-o", tmp_path / "data")
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    assert "user 51" in r.output and "100 distinct test negatives" in r.output
    assert "--test-negatives to at most 99" in r.output
    assert not (tmp_path / "data").exists()


def test_default_seed_is_0(tmp_path):
    src = write(tmp_path / "ratings.dat", big_log())
    prep(src, "-o", tmp_path / "a")
    prep(src, "-o", tmp_path / "b", "--seed", "0")
    prep(src, "-o", tmp_path / "c", "--seed", "1")
    for name in ("sequences.parquet", "test_negatives.parquet", "meta.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert ((tmp_path / "a" / "test_negatives.parquet").read_bytes()
            != (tmp_path / "c" / "test_negatives.parquet").read_bytes())


@pytest.mark.parametrize("flag", ["--trans-score", "--test-negatives", "--seed", "--compat"])
def test_help_states_the_defaults(flag):
    r = cli("prep", "--help")
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    want = {"--trans-score": "Default: keep every row, whatever its rating",
            "--test-negatives": "default: 100",
            "--seed": "default: 0",
            "--compat": "default: none"}[flag]
    assert want in text


def test_command_defaults_are_the_option_classes_defaults():
    """The commands' defaults are not a second copy: `prep` and `train` defaults equal
    PrepOptions' and TrainConfig's, and every command takes one seed range."""
    from dataclasses import fields

    import click

    from fastattrec.cli import prep, synth, train
    from fastattrec.config import SEED_MAX, TrainConfig
    from fastattrec.data.prepare import PrepOptions

    prep_opts = {p.name: p for p in prep.params if isinstance(p, click.Option)}
    ctx = click.Context(prep)
    checked = 0
    for f in fields(PrepOptions):
        if f.name in prep_opts and f.default is not dataclasses_missing():
            assert prep_opts[f.name].get_default(ctx) == f.default, f.name
            checked += 1
    assert checked >= 5  # trans_score, test_negatives, compat, seed, streaming
    train_opts = {p.name: p for p in train.params if isinstance(p, click.Option)}
    ctx = click.Context(train)
    for f in fields(TrainConfig):
        if f.metadata.get("cli"):
            assert train_opts[f.name].get_default(ctx) == f.default, f.name
    for cmd in (prep, synth, train):
        seed = next(p for p in cmd.params if p.name == "seed")
        if isinstance(seed.type, click.IntRange):
            assert (seed.type.min, seed.type.max) == (0, SEED_MAX), cmd.name
        else:  # train: checked by TrainConfig
            assert next(f for f in fields(TrainConfig) if f.name == "seed").metadata[
                "high"] == SEED_MAX


def dataclasses_missing():
    from dataclasses import MISSING

    return MISSING
