"""Histories the model was not trained on, scored without retraining (docs/spec.md §4.10):
the scores are recomputed here in float64 numpy from the trained tables, the window is the
history's last L known items, seen items are the dataset history plus the given one, a new
user gets the mean trained user, and every mistake is one sentence."""

import json
import math

import numpy as np
import polars as pl
import pytest

import fastattrec as fa
from fastattrec.errors import UserError

from helpers import cli, trained_on_histories, write

# user::item::rating::time over items 101..108; prep numbers users 1..6 and items 101..108
# as rows 1..8 in sorted order (docs/spec.md §1.3).
HISTORY = {1: [101, 102, 103, 104], 2: [102, 103, 105], 3: [101, 106, 107, 108],
           4: [104, 105, 106], 5: [107, 108, 101], 6: [103, 104, 105, 106]}
ITEMS = list(range(101, 109))
L = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hist")
    return fa.load_run(trained_on_histories(root, HISTORY, maxlen=L))


def tables(run):
    """The trained tables in float64: U (users+1, d), E, E2 (items+1, d), W (d, d), w."""
    m = run.model
    f = lambda t: t.detach().double().numpy()  # noqa: E731
    return f(m.user_emb), f(m.item_emb), f(m.item2_emb), f(m.proj), m.cfg.w


def expected(run, user_row, history):
    """{raw item: goodness} of every item outside the seen ones, from the formulas of
    docs/spec.md §2.3-2.4 (mode inner) in float64: the window is the last L items of the
    history, left-padded; user row 0 is the mean of rows 1.."""
    U, E, E2, W, w = tables(run)
    d = E.shape[1]
    rows = [i - 100 for i in history][-L:]
    window = [0] * (L - len(rows)) + rows
    pos = np.array([[math.sin(p / 10000 ** (2 * (c // 2) / d)) if c % 2 == 0 else
                     math.cos(p / 10000 ** (2 * (c // 2) / d)) for c in range(d)]
                    for p in range(L)])
    x = E[window]  # (L, d)
    q = np.maximum((x + pos) @ W, 0)
    s = q @ q.T / math.sqrt(d)
    s[:, [j for j in range(L) if window[j] == 0]] = -(2.0 ** 32) + 1
    a = np.exp(s - s.max(1, keepdims=True))
    short = ((a / a.sum(1, keepdims=True)) @ x).mean(0)
    u = U[1:].mean(0) if user_row == 0 else U[user_row]
    seen = set(history) | set(HISTORY.get(user_row, []))
    return {i: w * u @ E2[i - 100] + (1 - w) * short @ E[i - 100]
            for i in ITEMS if i not in seen}


def check(frame, want, k):
    """The frame's items are the k best of `want` in order, with their scores."""
    best = sorted(want, key=want.get, reverse=True)[:k]
    assert frame.get_column("raw_item").to_list() == best
    assert frame.get_column("rank").to_list() == list(range(1, len(best) + 1))
    np.testing.assert_allclose(frame.get_column("score").to_numpy(),
                               [want[i] for i in best], rtol=1e-5, atol=1e-6)


def test_known_user_keeps_long_term_row_and_seen_items(run):
    # user 1 saw 101..104; the new history adds 105: only 106..108 are left
    frame = run.recommend(histories={1: [103, 105]}, k=5)
    assert set(frame.get_column("raw_user").to_list()) == {1}
    check(frame, expected(run, 1, [103, 105]), 5)
    assert frame.height == 3


def test_new_user_gets_the_mean_user_and_the_last_l_items(run):
    history = [108, 107, 101, 102, 106]  # longer than L = 3: the window is 101, 102, 106
    frame = run.recommend(histories={None: history}, k=2)
    assert frame.get_column("raw_user").to_list() == [None, None]
    check(frame, expected(run, 0, history), 2)
    # an unknown id is a new user too, shown as given
    other = run.recommend(histories={"guest": history}, k=2)
    assert other.get_column("raw_user").to_list() == ["guest", "guest"]
    assert run.new_users == ["guest"]
    assert other.get_column("raw_item").to_list() == frame.get_column("raw_item").to_list()


def test_several_histories_in_order_given(run):
    frame = run.recommend(histories={4: [101], None: [102, 103], 2: [104]}, k=8)
    assert frame.get_column("raw_user").unique(maintain_order=True).to_list() == [4, None, 2]
    for user, history in ((4, [101]), (None, [102, 103]), (2, [104])):
        part = frame.filter(pl.col("raw_user").eq_missing(user))
        check(part, expected(run, user or 0, history), 8)


def test_unknown_items_refused_or_skipped(run):
    with pytest.raises(UserError, match=r"item '999' \(and 1 other item\) in histories is "
                                         r"not an item of the run's dataset"):
        run.recommend(histories={None: [999, 101, 998]}, k=3)
    skipped = run.recommend(histories={None: [999, 101, 998, 102]}, k=3, skip_unknown=True)
    check(skipped, expected(run, 0, [101, 102]), 3)
    with pytest.raises(UserError, match="has no item the model knows"):
        run.recommend(histories={None: [999]}, k=3, skip_unknown=True)


def test_mapping_mistakes_are_one_sentence(run):
    with pytest.raises(UserError, match="given twice"):
        run.recommend(histories={1: [101], "1": [102]})
    with pytest.raises(UserError, match="is empty"):
        run.recommend(histories={1: []})
    with pytest.raises(UserError, match="must be a list of item ids"):
        run.recommend(histories={1: "101"})
    with pytest.raises(UserError, match="not both"):
        run.recommend(users=[1], histories={1: [101]})


def test_frame_rows_are_put_in_time_order(run):
    rows = pl.DataFrame({"user": ["3", "9", "3", "9"], "item": ["102", "105", "104", "101"],
                         "time": [20, 7, 10, 5]})
    frame = run.recommend(histories=rows, k=8)
    assert frame.get_column("raw_user").unique(maintain_order=True).to_list() == [3, 9]
    check(frame.filter(pl.col("raw_user") == 3), expected(run, 3, [104, 102]), 8)
    check(frame.filter(pl.col("raw_user") == 9), expected(run, 0, [101, 105]), 8)


def test_ids_stored_as_floats_are_the_integers_they_hold(run, tmp_path):
    """A Parquet file whose id columns are floats (1.0, as pandas writes integer columns
    with missing values) names the dataset's users and items; 7.5 is no dataset user."""
    rows = pl.DataFrame({"user": [3.0, 3.0, 7.5], "item": [102.0, 104.0, 101.0]})
    rows.write_parquet(tmp_path / "h.parquet")
    frame = run.recommend(histories=tmp_path / "h.parquet", k=8)
    assert frame.get_column("raw_user").unique(maintain_order=True).to_list() == ["3", "7.5"]
    check(frame.filter(pl.col("raw_user") == "3"), expected(run, 3, [102, 104]), 8)
    check(frame.filter(pl.col("raw_user") == "7.5"), expected(run, 0, [101]), 8)
    frame = run.recommend(histories=rows.head(2), k=8)
    assert frame.get_column("raw_user").unique().to_list() == [3]


def test_item_embeddings_give_the_scores(run):
    emb = run.item_embeddings()
    assert emb.get_column("raw_item").to_list() == ITEMS
    E = np.stack(emb.get_column("E").to_numpy()).astype(np.float64)
    E2 = np.stack(emb.get_column("E2").to_numpy()).astype(np.float64)
    _, E_t, E2_t, _, _ = tables(run)
    np.testing.assert_array_equal(E, E_t[1:])  # rows 1..8 are items 101..108
    np.testing.assert_array_equal(E2, E2_t[1:])


def test_cli_history_and_histories_file(run, tmp_path):
    r = cli("recommend", str(run.path), "--history", "103,105", "--user", "1", "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    want = expected(run, 1, [103, 105])
    assert [x["raw_item"] for x in rows] == sorted(want, key=want.get, reverse=True)
    r = cli("recommend", str(run.path), "--history", "101", "--user", "77", "-k", "2")
    assert "user 77 is not in the run's dataset: scored with the mean trained user" in r.output
    r = cli("recommend", str(run.path), "--history", "101,102,106", "-k", "2")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0] == "top 2 for a new user with history 101,102,106:"
    src = write(tmp_path / "h.csv", "user_id,item_id,timestamp\nx,104,2\nx,102,1\n")
    r = cli("recommend", str(run.path), "--histories", str(src), "-o",
            str(tmp_path / "out.csv"))
    assert r.exit_code == 0, r.output
    assert "taken oldest first by column 'timestamp'" in r.output
    out = pl.read_csv(tmp_path / "out.csv")
    check(out.filter(pl.col("raw_user") == "x"), expected(run, 0, [102, 104]), 10)


@pytest.mark.parametrize(("args", "says"), [
    (["--history", "101,,102"], "has an empty item"),
    (["--history", "555"], "item '555' in --history is not an item of the run's dataset"),
    (["--history", "0101"], "item '0101' in --history is not an item"),  # 101 is written 101
    (["--user", "01"], "user ids in this dataset are integers; '01' is not one"),
    (["--history", "101", "--all-users"], "drop --all-users"),
    (["--skip-unknown-items", "--user", "1"], "--skip-unknown-items is for --history"),
    (["--histories", "nowhere.csv", "--json"], "does not exist"),
])
def test_cli_mistakes_are_one_line(run, args, says):
    r = cli("recommend", str(run.path), *args)
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output
    assert says in r.output.strip().splitlines()[-1]


def test_file_times_sort_as_numbers_and_dates(run, tmp_path):
    # as text "10" < "100" < "9"; as numbers 9 < 10 < 100: the window is 103, 101, 102
    src = write(tmp_path / "n.csv", "user,item,time\nz,103,9\nz,101,10\nz,102,100\n")
    frame = run.recommend(histories=src, k=8)
    check(frame, expected(run, 0, [103, 101, 102]), 8)
    src = write(tmp_path / "d.csv", "user,item,time\nz,102,2024-01-10T00:00:00+02:00\n"
                                    "z,101,2024-01-09T23:30:00Z\n")  # 22:00 UTC, then 23:30
    check(run.recommend(histories=src, k=8), expected(run, 0, [102, 101]), 8)
    bad = write(tmp_path / "b.csv", "user,item,time\nz,102,5\nz,101,soon\n")
    with pytest.raises(UserError, match=r"b.csv.*row 2: time 'soon' in column 'time' is "
                                         r"neither a number nor a date"):
        run.recommend(histories=bad)


def test_histories_file_without_output_is_refused(run, tmp_path):
    src = write(tmp_path / "h.csv", "user,item\nx,101\n")
    r = cli("recommend", str(run.path), "--histories", str(src))
    assert r.exit_code != 0
    assert "--histories writes a table" in r.output
