"""A new user's whole path on their own CSV (string ids, dates, a cold user and item):
filter and split by time, train, metrics that name their protocol, top-10 lists as CSV
and JSON, a history the model never saw, and an export; each checked against the CSV."""

import datetime
import json
import re

import polars as pl
import pytest

from helpers import cli, write

N_USERS, N_ITEMS = 30, 40


def log_csv() -> str:
    """user u00..u29 watches 12 films in a walk over m000..m039 (each user's own stride),
    one a day from a user-specific start in January 2024; u99 watched one film (cold:
    dropped), and m777 was watched once (dropped by the k-core)."""
    start = datetime.datetime(2024, 1, 1, 10)
    rows = ["user_id,movie_id,watched_at"]
    for u in range(N_USERS):
        for t in range(12):
            item = (u * 3 + t * (1 + u % 4)) % N_ITEMS
            when = start + datetime.timedelta(days=u % 10 + t, hours=u)
            rows.append(f"u{u:02d},m{item:03d},{when:%Y-%m-%d %H:%M:%S}")
    rows.append("u99,m001,2024-01-05 09:00:00")
    rows.append("u05,m777,2024-01-09 08:00:00")
    return "\n".join(rows) + "\n"


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    root = tmp_path_factory.mktemp("practitioner")
    write(root / "log.csv", log_csv())
    r = cli("prep", str(root / "log.csv"), "-o", str(root / "data"), "--time-col",
            "watched_at", "--min-item-interactions", "2", "--split", "time")
    assert r.exit_code == 0, r.output
    assert re.search(r"users dropped \(k-core\) +1\n", r.output)  # u99
    assert re.search(r"items dropped \(k-core\) +1\n", r.output)  # m777
    r = cli("train", str(root / "data"), "-o", str(root / "run"), "--epochs", "3", "--dim",
            "8", "--batch-size", "64", "--device", "cpu", "--no-compile")
    assert r.exit_code == 0, r.output
    return root


def seen_of(root):
    log = pl.read_csv(root / "log.csv")
    return {u: set(g["movie_id"]) for (u,), g in log.group_by("user_id")}


def test_time_split_metrics_name_their_protocol(path):
    # the test cut by hand: the last 10% of the 360 rows the k-core keeps, by time
    log = pl.read_csv(path / "log.csv").filter(
        ~pl.col("user_id").is_in(["u99"]) & ~pl.col("movie_id").is_in(["m777"]))
    assert log.height == 360
    cut = log["watched_at"].sort()[360 - 36]
    per_user = log.group_by("user_id").agg(
        (pl.col("watched_at") >= cut).any().alias("test"),
        (pl.col("watched_at") < cut).any().alias("before"))
    evaluated = per_user.filter(pl.col("test") & pl.col("before")).height
    r = cli("evaluate", str(path / "run"), "--json", "-k", "10")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"]
    assert set(res["AttRec"]) == {"full"}  # several targets a user: full ranking only
    m = res["AttRec"]["full"]
    assert m["users"] == evaluated
    assert 0 <= m["Recall@10"] <= m["HR@10"] <= 1 and 0 <= m["NDCG@10"] <= 1


def test_top10_lists_as_csv_and_json(path):
    seen = seen_of(path)
    r = cli("recommend", str(path / "run"), "--user", "u07", "-o", str(path / "u07.csv"))
    assert r.exit_code == 0, r.output
    top = pl.read_csv(path / "u07.csv")
    assert top["raw_user"].unique().to_list() == ["u07"] and top.height == 10
    assert not set(top["raw_item"]) & seen["u07"]
    r = cli("recommend", str(path / "run"), "--all-users", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 10 * N_USERS
    assert all(row["raw_item"] not in seen[row["raw_user"]] for row in rows)
    assert "u99" not in {row["raw_user"] for row in rows}  # the cold user was dropped
    assert "m777" not in {row["raw_item"] for row in rows}  # ... and the cold item


def test_a_history_the_model_never_saw(path):
    r = cli("recommend", str(path / "run"), "--history", "m003,m011,m999", "--json")
    assert r.exit_code != 0 and "item 'm999'" in r.output
    r = cli("recommend", str(path / "run"), "--history", "m003,m011,m999",
            "--skip-unknown-items", "--json")
    assert r.exit_code == 0, r.output
    items = [row["raw_item"] for row in json.loads(r.stdout)]
    assert len(items) == 10 and not {"m003", "m011"} & set(items)


def test_export(path):
    r = cli("export", str(path / "run"), "-o", str(path / "model.pt2"))
    assert r.exit_code == 0, r.output
    assert (path / "model.pt2").stat().st_size > 0
