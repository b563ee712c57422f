"""The iterated k-core filter of `prep` (--min-user-interactions, --min-item-interactions;
docs/spec.md §1.10) against a core worked out by hand, and against a plain Python
k-core on random logs."""

import json
import re

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattrec as fa
from fastattrec.data.dataset import load_prepared

from helpers import cli, write

# user,item,time. Worked by hand with --min-user-interactions 3 --min-item-interactions 2:
#   rows per user: 1: 10 20 30 (3) | 2: 10 20 60 (3) | 3: 10 20 40 50 (4) | 4: 60 20 (2)
#                  5: 30 40 10 (3)
#   rows per item: 10: 4 | 20: 4 | 30: 2 | 40: 2 | 50: 1 | 60: 2 (users 2 and 4)
# round 1: user 4 (2 < 3) and item 50 (1 < 2) go, with their rows; item 60 is left with
#   one row (user 2's), user 3 with 10 20 40.
# round 2: item 60 (1 < 2) goes; user 2 is left with 10 20 (2 < 3).
# round 3: user 2 goes; items 10 (3 rows), 20, 30, 40 (2 each) and users 1, 3, 5 (3 each)
#   all meet their minimums.
# round 4 drops nothing. The core: users 1, 3, 5 and items 10, 20, 30, 40, 9 of 15 rows,
# after 3 rounds that dropped something: 2 users, 2 items, 6 rows dropped. A single pass
# (no iteration) would have kept user 2 and item 60.
LOG = """\
user,item,time
1,10,1
1,20,2
1,30,3
2,10,1
2,20,2
2,60,3
3,10,1
3,20,2
3,40,3
3,50,4
4,60,1
4,20,2
5,30,3
5,40,1
5,10,2
"""
CORE = {(1, 10), (1, 20), (1, 30), (3, 10), (3, 20), (3, 40), (5, 30), (5, 40), (5, 10)}


def pairs_of(path):
    """The (raw user, raw item) pairs of a prepared dataset, and its sequences in raw ids."""
    p = load_prepared(path)
    raw_items = dict(zip(p.item_rows.tolist(), p.raw_items.to_list(), strict=True))
    seqs = {}
    for u, o, n in zip(p.raw_users.to_list(), p.offsets.tolist(), p.lengths.tolist(),
                       strict=True):
        seqs[u] = [raw_items[i] for i in p.items[o:o + n].tolist()]
    return {(u, i) for u, s in seqs.items() for i in s}, seqs


def test_kcore_iterates_to_the_core_worked_by_hand(tmp_path):
    src = write(tmp_path / "log.csv", LOG)
    data = fa.prepare(src, tmp_path / "out", min_user_interactions=3,
                      min_item_interactions=2, test_negatives=1)
    pairs, seqs = pairs_of(tmp_path / "out")
    assert pairs == CORE
    assert seqs == {1: [10, 20, 30], 3: [10, 20, 40], 5: [40, 10, 30]}  # in time order
    c = data.counts
    assert (c["users"], c["items"], c["interactions"]) == (3, 4, 9)
    assert (c["dropped_users"], c["dropped_items"], c["dropped_interactions"],
            c["kcore_rounds"]) == (2, 2, 6, 3)
    params = data.meta["params"]
    assert (params["min_user_interactions"], params["min_item_interactions"]) == (3, 2)


def test_the_users_minimum_alone_and_the_items_minimum_alone(tmp_path):
    src = write(tmp_path / "log.csv", LOG)
    # Users only (>= 3): user 4 goes in round 1; items need no minimum, so item 60 stays
    # (user 2's row) and nothing else drops.
    d = fa.prepare(src, tmp_path / "u", min_user_interactions=3, test_negatives=1)
    rows = {tuple(map(int, line.split(",")[:2])) for line in LOG.splitlines()[1:]}
    assert pairs_of(tmp_path / "u")[0] == rows - {(4, 60), (4, 20)}
    assert (d.counts["kcore_rounds"], d.counts["dropped_items"]) == (1, 0)
    # Items only (>= 2; users keep the usual minimum of 2): item 50 goes in round 1,
    # which leaves every user at least 2 rows and every other item at least 2.
    d = fa.prepare(src, tmp_path / "i", min_item_interactions=2, test_negatives=1)
    assert pairs_of(tmp_path / "i")[0] == rows - {(3, 50)}
    assert d.counts["kcore_rounds"] == 1 and d.counts["dropped_users"] == 0
    assert d.meta["params"]["min_user_interactions"] is None


def test_summary_reports_what_the_kcore_dropped(tmp_path):
    src = write(tmp_path / "log.csv", LOG)
    r = cli("prep", src, "-o", tmp_path / "out", "--test-negatives", "1",
            "--min-user-interactions", "3", "--min-item-interactions", "2")
    assert r.exit_code == 0, r.output
    for label, n in (("users dropped", 2), ("items dropped", 2), ("rows dropped", 6)):
        assert re.search(rf"^{label} \(k-core\) +{n}$", r.output, re.M), r.output
    assert re.search(r"^k-core rounds +3$", r.output, re.M)
    assert "users dropped (1 item)" not in r.output


def test_everything_filtered_is_one_line_and_leaves_nothing(tmp_path):
    src = write(tmp_path / "log.csv", LOG)
    out = tmp_path / "out"
    r = cli("prep", src, "-o", out, "--test-negatives", "1", "--min-user-interactions", "5")
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if not line.startswith("[")]  # no log
    assert len(errors) == 1 and errors[0].startswith("Error: "), r.output
    assert "no interactions are left after the k-core filter" in r.output
    assert "log.csv" in r.output and "lower --min-user-interactions" in r.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]  # no temporary folder


def test_bad_minimums_and_notebook_compat_are_refused(tmp_path):
    src = write(tmp_path / "log.csv", LOG)
    for args, words in (
            (["--min-user-interactions", "1"], "--min-user-interactions must be at least 2"),
            (["--min-item-interactions", "0"], "--min-item-interactions must be at least 1"),
            (["--min-item-interactions", "2", "--compat", "notebook"],
             "cannot be used with --compat notebook")):
        r = cli("prep", src, "-o", tmp_path / "out", *args)
        assert r.exit_code != 0 and words in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


def test_defaults_record_no_minimum_and_no_kcore_counts(tmp_path):
    src = write(tmp_path / "log.csv", LOG)
    d = fa.prepare(src, tmp_path / "out", test_negatives=1)
    assert d.meta["params"]["min_user_interactions"] is None
    assert d.meta["params"]["min_item_interactions"] is None
    assert "kcore_rounds" not in d.counts and d.counts["interactions"] == 15


def naive_core(rows, min_user, min_item):
    """Plain Python: drop any user or item below its minimum, one at a time, until none."""
    rows = list(rows)
    while True:
        users, items = {}, {}
        for u, i in rows:
            users[u] = users.get(u, 0) + 1
            items[i] = items.get(i, 0) + 1
        low = [(u, i) for u, i in rows if users[u] < min_user or items[i] < min_item]
        if not low:
            return set(rows)
        rows = [r for r in rows if r not in low]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 12)), min_size=1,
                     max_size=60),
       min_user=st.integers(2, 4), min_item=st.integers(1, 4))
def test_same_core_as_a_plain_python_kcore(tmp_path, rows, min_user, min_item):
    import uuid

    case = tmp_path / uuid.uuid4().hex
    text = "user,item,time\n" + "".join(f"{u},{i},{t}\n" for t, (u, i) in enumerate(rows))
    src = write(case / "log.csv", text)
    want = naive_core(rows, min_user, min_item)
    r = cli("prep", src, "-o", case / "out", "--test-negatives", "1",
            "--min-user-interactions", min_user, "--min-item-interactions", min_item)
    if r.exit_code != 0:  # nothing left, or a user who saw every item of the core
        assert not want or "every one of" in r.output or "distinct test" in r.output, r.output
        return
    got, _ = pairs_of(case / "out")
    assert got == want
    meta = json.loads((case / "out" / "meta.json").read_text())
    assert meta["counts"]["interactions"] == sum(1 for r in rows if r in want)
    assert pl.read_parquet(case / "out" / "users.parquet").height == len({u for u, _ in want})
