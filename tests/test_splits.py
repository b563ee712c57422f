"""`prep --split leave-one-out|time|ratio` (docs/spec.md §1.11) and the evaluation that
follows it (§4.9): the train/validation/test assignment of a hand-written log worked out
by hand, metrics with several targets against a brute-force numpy ranking, the
reduction to one target, an end-to-end run, and one-sentence errors."""

import json
import math

import numpy as np
import pytest
import torch

import fastattrec as fa
from fastattrec.batches import DeviceData
from fastattrec.data.dataset import load_prepared
from fastattrec.evaluate import evaluate, metrics_from_ranks, target_ranks

from helpers import cli, write

# user,item,time (file order). Dense ids: items 10..80 -> 1..8, users 1..4.
#   user 1: 10@1 20@2 30@3 40@7 50@9
#   user 2: 20@2 30@7 60@8 10@10
#   user 3: 40@1 50@5 20@6
#   user 4: 60@8 70@9 80@11 70@12      (70 twice)
LOG = """\
user,item,time
1,10,1
2,20,2
1,20,2
3,40,1
1,30,3
2,30,7
3,50,5
1,40,7
2,60,8
4,60,8
3,20,6
1,50,9
4,70,9
2,10,10
4,80,11
4,70,12
"""
# --split time --val-from 7 --test-from 9: test = time >= 9, validation = 7 <= time < 9.
#   user 1: train 10 20 30 | val 40      | test 50
#   user 2: train 20       | val 30 60   | test 10
#   user 3: train 40 50 20 | (no val)    | (no test)
#   user 4: train -        | val 60      | test 70 80 70
# The same cuts from --val-fraction 0.25 --test-fraction 0.25: the 16 times sorted are
#   1 1 2 2 3 5 6 7 7 8 8 9 9 10 11 12; n_test = floor(0.25*16 + 1/2) = 4, so the test
#   cut is t_(16-4) = t_12 = 9 (five rows are >= 9: ties go with the cut); n_val = 4, so
#   the validation cut is t_(12-4) = t_8 = 7.
TIME = {1: (3, 1, 1), 2: (1, 2, 1), 3: (3, 0, 0), 4: (0, 1, 3)}  # (train, n_val, n_test)
# --split ratio --val-fraction 0.4 --test-fraction 0.4, per user of n interactions:
#   n_test = floor(0.4 n + 1/2) clipped to [1, n - 2], n_val = floor(0.4 n + 1/2) clipped
#   to [1, n - n_test - 1] (a user of n >= 3 keeps a train item):
#   n = 5: floor(2.5) = 2 test, 2 val (5 - 2 - 1 = 2), 1 train;
#   n = 4: floor(2.1) = 2 test, val 2 clipped to 4 - 2 - 1 = 1, 1 train;
#   n = 3: floor(1.7) = 1 test, 1 val, 1 train.
#   user 1: train 10 | val 20 30 | test 40 50
#   user 2: train 20 | val 30    | test 60 10
#   user 3: train 40 | val 50    | test 20
#   user 4: train 60 | val 70    | test 80 70
RATIO = {1: (1, 2, 2), 2: (1, 1, 2), 3: (1, 1, 1), 4: (1, 1, 2)}
SEQ = {1: [10, 20, 30, 40, 50], 2: [20, 30, 60, 10], 3: [40, 50, 20], 4: [60, 70, 80, 70]}


def prepared(tmp_path, name="out", **options):
    src = write(tmp_path / "log.csv", LOG)
    return fa.prepare(src, tmp_path / name, **options)


def assignment(path):
    """{raw user: (train items, validation items, test items)} in raw ids."""
    p = load_prepared(path)
    raw = dict(zip(p.item_rows.tolist(), p.raw_items.to_list(), strict=True))
    n_val = np.ones(p.n_users, int) if p.n_val is None else p.n_val
    n_test = np.ones(p.n_users, int) if p.n_test is None else p.n_test
    out = {}
    for k, u in enumerate(p.raw_users.to_list()):
        s = [raw[i] for i in p.items[p.offsets[k]:p.offsets[k] + p.lengths[k]].tolist()]
        a, v = len(s) - n_val[k] - n_test[k], n_val[k]
        out[u] = (s[:a], s[a:a + v], s[a + v:])
    return out


def expect(table):
    """The hand-worked (train, val, test) items of each user from counts per user."""
    out = {}
    for u, (a, v, t) in table.items():
        s = SEQ[u]
        assert a + v + t == len(s)
        out[u] = (s[:a], s[a:a + v], s[a + v:])
    return out


def test_time_split_by_hand_with_cuts_and_with_fractions(tmp_path):
    d = prepared(tmp_path, split="time", val_from=7, test_from=9)
    assert assignment(tmp_path / "out") == expect(TIME)
    assert d.meta["params"]["split"] == "time" and d.meta["params"]["time_cuts"] == [7, 9]
    f = prepared(tmp_path, "frac", split="time", val_fraction=0.25, test_fraction=0.25)
    assert f.meta["params"]["time_cuts"] == [7, 9]
    assert assignment(tmp_path / "frac") == expect(TIME)
    c = d.counts
    # train targets: user 1's 20, 30 and user 3's 50, 20 (a user's first item never is);
    # validation: users 1 (40) and 2 (30, 60) evaluated, user 4 has no earlier item;
    # test: users 1, 2 and 4 (70, 80, 70 from the window [60]).
    assert (c["train_samples"], c["val_samples"], c["test_samples"]) == (4, 3, 5)
    assert (c["val_users"], c["val_users_without_history"]) == (2, 1)
    assert (c["test_users"], c["test_users_without_history"]) == (3, 0)
    assert d.meta["params"]["test_negatives_per_user"] == 0


def test_ratio_split_by_hand(tmp_path):
    d = prepared(tmp_path, split="ratio", val_fraction=0.4, test_fraction=0.4)
    assert assignment(tmp_path / "out") == expect(RATIO)
    c = d.counts
    # train targets: none (every user has one train item, never a target);
    # validation: every user (2 + 1 + 1 + 1 rows); test: every user (2 + 2 + 1 + 2 rows).
    assert (c["train_samples"], c["val_samples"], c["test_samples"]) == (0, 5, 7)
    assert (c["val_users"], c["val_users_without_history"]) == (4, 0)
    assert c["test_users"] == 4


def test_ratio_with_default_fractions_is_leave_one_out_here(tmp_path):
    """With 0.1 and 0.1, a user of n <= 14 interactions gets one test and one validation
    item (floor(0.1 n + 1/2) = 1), so this log splits as leave-one-out does."""
    prepared(tmp_path, "loo", test_negatives=2)
    prepared(tmp_path, "ratio", split="ratio")
    want = {u: (s[:-2], s[-2:-1], s[-1:]) for u, s in SEQ.items()}
    assert assignment(tmp_path / "loo") == want
    assert assignment(tmp_path / "ratio") == want


def test_leave_one_out_writes_what_it_always_wrote(tmp_path):
    """The default split writes no n_val / n_test columns and keeps its test negatives."""
    d = prepared(tmp_path, test_negatives=2)
    import polars as pl

    assert pl.read_parquet(tmp_path / "out" / "users.parquet").columns == [
        "user", "raw_user", "offset", "length"]
    assert d.meta["params"]["split"] == "leave-one-out"
    assert "val_users" not in d.counts
    assert load_prepared(tmp_path / "out").test_negs.shape == (4, 2)


# ---- metrics with several targets ------------------------------------------------------

# Goodness of item rows 0..8 (0 is padding and must never count).
G = torch.tensor([100.0, 0.1, 0.9, 0.5, 0.6, 0.6, 0.7, 0.2, 0.8], dtype=torch.float64)


class FixedRanker:
    def goodness(self, users, windows, items):
        return G[items]

    def goodness_all(self, users, windows):
        return G[None, :].expand(users.shape[0], -1)


def brute_force(history, targets, k, base=2.0):
    """Independent numpy: rank every candidate (real items not in the history, plus the
    targets) by goodness, a non-target before a target it ties; then the metrics."""
    g = G.numpy()
    targets = set(targets)
    cands = [i for i in range(1, 9) if i not in history or i in targets]
    order = sorted(cands, key=lambda i: (-g[i], i in targets))  # ties: non-target first
    pos = [p for p, i in enumerate(order) if i in targets]
    dcg = sum(1 / (math.log(p + 2) / math.log(base)) for p in pos if p < k)
    idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(targets))))
    return {"HR": float(pos[0] < k), "Recall": sum(p < k for p in pos) / len(targets),
            "NDCG": dcg / idcg, "MRR": 1 / (pos[0] + 1)}


def test_multi_target_metrics_against_a_brute_force_ranking(tmp_path):
    prepared(tmp_path, split="time", val_from=7, test_from=9)
    data = DeviceData.from_prepared(load_prepared(tmp_path / "out"), "cpu")
    # Test queries (dense ids): user 1 history {1, 2, 3, 4}, target {5};
    # user 2 history {2, 3, 6}, target {1}; user 4 history {6}, targets {7, 8} (7 twice).
    # By hand for user 4: candidates 1..5, 7, 8 ranked 2 (.9), 8 (.8), 4, 5 (.6), 3 (.5),
    # 7 (.2), 1 (.1): targets at positions 1 and 5. So at K = 2: HR 1, Recall 1/2,
    # NDCG (1/log2 3) / (1 + 1/log2 3) = 0.3869, MRR 1/2.
    ranks = target_ranks(FixedRanker(), data, data.test, 3)
    assert ranks.tolist() == [2, 4, 1, 5]
    cases = [({1, 2, 3, 4}, {5}), ({2, 3, 6}, {1}), ({6}, {7, 8})]
    for k in (1, 2, 5, 6, 10):
        for base, log in (("2", 2.0), ("e", math.e)):
            want = [brute_force(h, t, k, log) for h, t in cases]
            got = evaluate(FixedRanker(), data, 3, "both", (k,), base)
            assert set(got) == {"full"}  # no sampled protocol for a time split
            m = got["full"]
            assert m["users"] == 3
            for name in ("HR", "Recall", "NDCG"):
                assert m[f"{name}@{k}"] == pytest.approx(
                    np.mean([w[name] for w in want]), abs=1e-12), (name, k, base)
            assert m["MRR"] == pytest.approx(np.mean([w["MRR"] for w in want]), abs=1e-12)
    m2 = evaluate(FixedRanker(), data, 3, "full", (2,))["full"]
    assert m2["NDCG@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)) / 3)
    assert m2["Recall@2"] == pytest.approx(0.5 / 3)


def test_validation_queries_and_a_target_seen_before(tmp_path):
    prepared(tmp_path, split="time", val_from=7, test_from=9)
    data = DeviceData.from_prepared(load_prepared(tmp_path / "out"), "cpu")
    # Validation: user 1 history {1, 2, 3}, target 4 (.6): 5 (tie), 6, 8 beat it -> 3;
    # user 2 history {2}, targets 3 (.5), 6 (.7): 8 beats 6 (r 1), 4, 5, 8 beat 3 (r 3),
    # so positions 1 and 3 + 1 = 4. User 4 has no earlier item: not a query.
    assert data.val.users.tolist() == [1, 2] and data.val.skipped == 1
    assert target_ranks(FixedRanker(), data, data.val, 3).tolist() == [3, 1, 4]
    # Ratio 0.4/0.4: user 4's test targets 80, 70 follow the window [60, 70]: item 70 is
    # in the history but, as a target, stays a candidate. Candidates 1..5, 7, 8:
    # 8 (.8) is beaten by 2 (.9) only -> position 1; 7 (.2) by 2, 3, 4, 5 -> 4 + 1 = 5.
    prepared(tmp_path, "ratio", split="ratio", val_fraction=0.4, test_fraction=0.4)
    ratio = DeviceData.from_prepared(load_prepared(tmp_path / "ratio"), "cpu")
    assert ratio.test.users.tolist() == [1, 2, 3, 4]
    assert target_ranks(FixedRanker(), ratio, ratio.test, 3).tolist()[-2:] == [1, 5]


def test_one_target_reduces_to_the_single_target_metrics_exactly():
    ranks = torch.tensor([2, 1, 5, 0, 17])
    single = metrics_from_ranks(ranks, (1, 5, 10), "2")
    multi = metrics_from_ranks(ranks, (1, 5, 10), "2", owner=torch.arange(5), recall=True)
    for k in (1, 5, 10):
        assert multi[f"HR@{k}"] == single[f"HR@{k}"] == multi[f"Recall@{k}"]
        assert multi[f"NDCG@{k}"] == single[f"NDCG@{k}"]
    assert multi["MRR"] == single["MRR"] and multi["users"] == single["users"] == 5
    # The hand values (spec §4.4): HR@5 = 3/5, MRR = (1/3 + 1/2 + 1/6 + 1 + 1/18) / 5.
    assert single["HR@5"] == pytest.approx(3 / 5)
    assert single["MRR"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 6 + 1 + 1 / 18) / 5)


def test_several_targets_hand_worked_metrics():
    """Two queries: positions [0, 3, 4] (3 relevant) and [2] (1 relevant), K = 3.
    Query a: HR 1; Recall 1/3; DCG 1; ideal 1 + 1/log2 3 + 1/2; MRR 1.
    Query b: HR 1; Recall 1; DCG 1/log2 4 = 1/2; ideal 1; MRR 1/3."""
    m = metrics_from_ranks(torch.tensor([0, 3, 4, 2]), (3,), "2",
                           owner=torch.tensor([0, 0, 0, 1]), recall=True)
    assert m["users"] == 2 and m["HR@3"] == 1.0
    assert m["Recall@3"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["NDCG@3"] == pytest.approx((1 / (1 + 1 / math.log2(3) + 0.5) + 0.5) / 2)
    assert m["MRR"] == pytest.approx((1 + 1 / 3) / 2)


# ---- end to end, and errors ----------------------------------------------------------

def test_time_split_end_to_end(tmp_path):
    fa.synthesize(tmp_path / "r.dat", users=60, items=120, interactions=3000, seed=2)
    r = cli("prep", tmp_path / "r.dat", "-o", tmp_path / "data", "--split", "time")
    assert r.exit_code == 0, r.output
    assert "split" in r.output and "test users" in r.output
    r = cli("train", tmp_path / "data", "-o", tmp_path / "run", "--epochs", "1", "--dim",
            "8", "--batch-size", "128", "--device", "cpu", "--no-compile")
    assert r.exit_code == 0, r.output
    r = cli("evaluate", tmp_path / "run", "-k", "10", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])["results"]
    for model in ("AttRec", "popularity"):
        assert set(res[model]) == {"full"}
        for name in ("HR@10", "NDCG@10", "Recall@10", "MRR"):
            assert 0.0 <= res[model]["full"][name] <= 1.0, (model, name)
        assert res[model]["full"]["users"] > 0
    r = cli("evaluate", tmp_path / "run", "--protocol", "sampled")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "only the leave-one-out split has" in r.output
    history = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert set(history[-1]["test"]) == {"full"} and 0 <= history[-1]["val_metric"] <= 1


@pytest.mark.parametrize("args,words", [
    (["--split", "time", "--val-from", "7", "--test-from", "13"],
     "--test-from 13 leaves no test interactions (its times run from 1 to 12)"),
    (["--split", "time", "--val-from", "1", "--test-from", "9"],
     "leaves no interaction before it to train on"),
    (["--split", "time", "--val-from", "9"], "give both --val-from and --test-from"),
    (["--split", "time", "--val-from", "9", "--test-from", "7"], "must be earlier than"),
    (["--split", "time", "--val-from", "soon", "--test-from", "9"],
     "is neither a number nor a date"),
    (["--split", "time", "--val-from", "7", "--test-from", "9", "--val-fraction", "0.1"],
     "not both"),
    (["--split", "ratio", "--test-fraction", "1.5"], "--test-fraction must be a number"),
    (["--split", "ratio", "--val-fraction", "0.5", "--test-fraction", "0.5"],
     "add up to 1 or more"),
    (["--split", "ratio", "--val-from", "7"], "--split ratio takes --val-fraction"),
    (["--val-fraction", "0.2"], "add --split time or --split ratio"),
    (["--split", "time", "--test-negatives", "5"], "drop --test-negatives"),
    (["--split", "ratio", "--compat", "notebook"], "cannot be used with --split ratio"),
])
def test_bad_split_options_are_one_sentence(tmp_path, args, words):
    src = write(tmp_path / "log.csv", LOG)
    r = cli("prep", src, "-o", tmp_path / "out", *args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if not line.startswith("[")]
    assert len(errors) == 1 and errors[0].startswith("Error: "), r.output
    assert words in errors[0], errors[0]
    assert not (tmp_path / "out").exists()


def test_prep_notes_a_dataset_that_trains_or_evaluates_badly(tmp_path):
    """A split with no train sample, and a time split evaluating few users, are said
    after the summary (the dataset is still written: the user may want it anyway)."""
    src = write(tmp_path / "log.csv", LOG)
    # by the table above: validation users 1 and 2 (user 4 has no history), test 1, 2, 4
    r = cli("prep", src, "-o", tmp_path / "time", "--split", "time", "--val-from", "7",
            "--test-from", "9")
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == (
        "note: only 2 validation and 3 test users are evaluated; metrics over so few users "
        "vary widely with the cuts (move --val-from and --test-from, or the fractions, "
        "earlier for more).")
    two = write(tmp_path / "two.csv", "user,item,time\n1,1,1\n1,2,2\n2,2,1\n2,3,2\n")
    r = cli("prep", two, "-o", tmp_path / "ratio", "--split", "ratio")
    assert r.exit_code == 0 and (tmp_path / "ratio").is_dir(), r.output
    assert "note: there are no train samples" in r.output
    r = cli("prep", src, "-o", tmp_path / "loo", "--test-negatives", "1")
    assert r.exit_code == 0 and "note:" not in r.output, r.output


def test_time_split_needs_times(tmp_path):
    src = write(tmp_path / "pairs.txt", "1 10\n1 20\n1 30\n2 10\n2 20\n2 40\n")
    r = cli("prep", src, "-o", tmp_path / "out", "--format", "sequence-pairs", "--split",
            "time")
    assert r.exit_code != 0 and "has no times" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()
    # the ratio split needs only the order, which a sequence file has
    r = cli("prep", src, "-o", tmp_path / "out", "--format", "sequence-pairs", "--split",
            "ratio")
    assert r.exit_code == 0, r.output


def test_cuts_of_another_kind_than_the_logs_times_are_one_sentence(tmp_path):
    """A date against number times (their unit is unknown), a number against dates, and
    a zoned date against dates without a zone are refused, naming the kinds; a date
    without a zone against zoned dates is read as UTC, as the log's dates are."""
    numbers = write(tmp_path / "log.csv", LOG)
    naive = write(tmp_path / "naive.csv", "user,item,time\n" + "".join(
        f"{u},{i},2020-01-{d:02d}T12:00:00\n" for u, i, d in
        [(1, 1, 1), (1, 2, 2), (1, 3, 5), (1, 4, 8), (2, 2, 1), (2, 3, 3), (2, 5, 6),
         (2, 1, 9)]))
    zoned = write(tmp_path / "zoned.csv", naive.read_text().replace(":00\n", ":00Z\n"))
    for src, cuts, words in (
            (numbers, ("2020-01-05", "2020-01-08"),
             "log.csv: its times are numbers (1 to 12), not dates, so --val-from must be "
             "a number in the same units, not '2020-01-05' (as Unix seconds that date is "
             "1578182400)"),
            (naive, ("5", "8"), "naive.csv: its times are dates, so --val-from must be a "
                                "date"),
            (naive, ("2020-01-05", "2020-01-08T00:00:00+01:00"),
             "naive.csv: its dates have no time zone, so --test-from "
             "'2020-01-08T00:00:00+01:00' cannot be placed among them")):
        r = cli("prep", src, "-o", tmp_path / "out", "--split", "time", "--val-from",
                cuts[0], "--test-from", cuts[1])
        assert r.exit_code != 0 and "Traceback" not in r.output
        assert words in r.output.strip().splitlines()[-1], r.output
        assert not (tmp_path / "out").exists()
    # 2020-01-08 (no zone) is midnight UTC: user 1's 12:00Z on Jan 8 is test
    d = fa.prepare(zoned, tmp_path / "z", split="time", val_from="2020-01-05",
                   test_from="2020-01-08")
    assert (d.counts["val_samples"], d.counts["test_samples"]) == (2, 2)


def test_dates_as_cuts(tmp_path):
    src = write(tmp_path / "log.csv", "user,item,time\n" + "".join(
        f"{u},{i},2020-01-{d:02d}\n" for u, i, d in
        [(1, 1, 1), (1, 2, 2), (1, 3, 5), (1, 4, 8), (2, 2, 1), (2, 3, 3), (2, 5, 6),
         (2, 1, 9)]))
    # validation from Jan 5, test from Jan 8: user 1 val 3, test 4; user 2 val 5, test 1.
    d = fa.prepare(src, tmp_path / "out", split="time", val_from="2020-01-05",
                   test_from="2020-01-08")
    assert (d.counts["val_samples"], d.counts["test_samples"]) == (2, 2)
    r = cli("prep", src, "-o", tmp_path / "late", "--split", "time", "--val-from",
            "2020-01-05", "--test-from", "2020-02-01")
    assert r.exit_code != 0 and "2020-02-01 00:00:00 leaves no test interactions" in r.output
