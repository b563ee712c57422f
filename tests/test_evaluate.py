"""Ranking metrics and the two protocols against hand-ranked examples (ties included),
and device-side windows against windows written out by hand."""

import math

import pytest
import torch

from fastattrec.batches import DeviceData
from fastattrec.data.dataset import load_prepared
from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.evaluate import (
    PopularityRanker,
    evaluate,
    full_ranks,
    metrics_from_ranks,
    sampled_ranks,
)

from helpers import TINY_ML1M, write

# Goodness of items 0..7 (0 is padding and must never count).
G = torch.tensor([100.0, 0.1, 0.9, 0.5, 0.6, 0.6, 0.7, 0.2])


class FixedRanker:
    def goodness(self, users, windows, items):
        return G[items]

    def goodness_all(self, users, windows):
        return G[None, :].expand(users.shape[0], -1)


@pytest.fixture()
def data(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    prepare(src, tmp_path / "out", PrepOptions(test_negatives=2))
    d = DeviceData.from_prepared(load_prepared(tmp_path / "out"), "cpu")
    # Sequences (dense): user 1 [2, 1, 3, 4], user 2 [1, 5, 6], user 3 [7, 1].
    d.test_negs = torch.tensor([[5, 7], [2, 3], [2, 7]])
    return d


def test_windows_by_hand(data):
    assert data.train_rows.tolist() == [1]
    assert data.val_rows.tolist() == [2, 5]
    assert data.test_rows.tolist() == [3, 6, 8]
    assert data.windows_before(data.train_rows, 3).tolist() == [[0, 0, 2]]
    assert data.windows_before(data.val_rows, 3).tolist() == [[0, 2, 1], [0, 0, 1]]
    assert data.windows_before(data.test_rows, 3).tolist() == [[2, 1, 3], [0, 1, 5], [0, 0, 7]]
    assert data.windows_before(data.test_rows, 2).tolist() == [[1, 3], [1, 5], [0, 7]]
    users = torch.tensor([1, 2, 3])
    assert data.latest_windows(users, 3).tolist() == [[1, 3, 4], [1, 5, 6], [0, 7, 1]]


def test_sampled_ranks_ties_count_against_target(data):
    # user 1: target 4 (0.6) vs 5 (0.6, tie) and 7 (0.2) -> 1
    # user 2: target 6 (0.7) vs 2 (0.9) and 3 (0.5) -> 1
    # user 3: target 1 (0.1) vs 2 (0.9) and 7 (0.2) -> 2
    assert sampled_ranks(FixedRanker(), data, 3).tolist() == [1, 1, 2]


def test_sampled_ranks_of_other_targets(data):
    # the validation rows 2 and 5: user 1's item 3 (0.5), user 2's item 5 (0.6)
    # user 1: 3 vs 4 (0.6), 6 (0.7), 7 (0.2) -> 2; user 2: 5 vs 5 (a copy: tie), 1 (0.1),
    # 7 (0.2) -> 1
    negs = torch.tensor([[4, 6, 7], [5, 1, 7]])
    got = sampled_ranks(FixedRanker(), data, 3, negs=negs, targets=data.val_rows)
    assert got.tolist() == [2, 1]


def test_full_ranks_exclude_history_and_padding(data):
    # user 1: history {2, 1, 3} out; 5 (tie) and 6 beat 4; 7 does not -> 2
    # user 2: history {1, 5} out; 2 beats 6 -> 1
    # user 3: history {7} out; 2, 3, 4, 5, 6 beat item 1 -> 5
    assert full_ranks(FixedRanker(), data, data.test_rows, 3).tolist() == [2, 1, 5]
    # Validation targets: user 1 target 3 (0.5), history {2, 1}: 4, 5, 6 beat it -> 3
    assert full_ranks(FixedRanker(), data, data.val_rows, 3, chunk=1).tolist()[0] == 3


def test_metrics_from_hand_ranks():
    m = metrics_from_ranks(torch.tensor([2, 1, 5]), ks=(1, 5), ndcg_log="2")
    assert m["HR@1"] == 0.0
    assert m["HR@5"] == pytest.approx(2 / 3)
    assert m["NDCG@5"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(3)) / 3)
    assert m["MRR"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 6) / 3)
    e = metrics_from_ranks(torch.tensor([0, 9, 10]), ks=(10,), ndcg_log="e")
    assert e["HR@10"] == pytest.approx(2 / 3)
    assert e["NDCG@10"] == pytest.approx((1 / math.log(2) + 1 / math.log(11)) / 3)
    assert m["users"] == 3


def test_popularity_counts_train_and_validation_rows(data):
    pop = data.item_popularity()
    # Rows before each user's test target: [2, 1, 3], [1, 5], [7]
    assert pop.tolist() == [0, 2, 1, 1, 0, 1, 0, 1]
    res = evaluate(PopularityRanker(pop), data, 3, "both", (1, 5))
    assert set(res) == {"sampled", "full"}
    # Sampled, user 1: target 4 (0) vs 5 (1), 7 (1) -> rank 2
    assert sampled_ranks(PopularityRanker(pop), data, 3).tolist()[0] == 2


def test_resampled_negatives_avoid_each_users_items(data):
    g = torch.Generator().manual_seed(0)
    seen = {1: {2, 1, 3, 4}, 2: {1, 5, 6}, 3: {7, 1}}
    counts = torch.zeros(8)
    for _ in range(300):
        negs = data.sample_negatives(g)
        for row, (u, n) in enumerate(zip(data.row_user.tolist(), negs.tolist(), strict=True)):
            assert n not in seen[u] and 1 <= n <= 7, (row, u, n)
        counts += torch.bincount(negs[:4], minlength=8)  # user 1: unseen {5, 6, 7}
    share = counts[[5, 6, 7]] / counts.sum()
    assert counts[[0, 1, 2, 3, 4]].sum() == 0
    assert (share - 1 / 3).abs().max() < 0.05


class NanRanker(FixedRanker):
    """Item 4 (user 1's test target) and item 2 score NaN: a diverged model."""

    def __init__(self):
        self.g = G.clone()
        self.g[4] = math.nan
        self.g[2] = math.nan

    def goodness(self, users, windows, items):
        return self.g[items]

    def goodness_all(self, users, windows):
        return self.g[None, :].expand(users.shape[0], -1)


def test_nan_scores_rank_last_never_a_hit(data):
    # user 1: target 4 is NaN -> beaten by both negatives (5, 7): rank 2, not 0.
    # user 2: negative 2 is NaN -> never beats target 6 (0.7); 3 (0.5) does not: rank 0.
    # user 3: target 1 (0.1) vs 2 (NaN, never counts) and 7 (0.2): rank 1.
    assert sampled_ranks(NanRanker(), data, 3).tolist() == [2, 0, 1]
    # Full ranking, user 1: every real item that is not excluded counts against a NaN
    # target: items 5, 6, 7 (1, 2, 3 are the user's earlier items; 4 is the target).
    assert full_ranks(NanRanker(), data, data.test_rows[:1], 3).tolist() == [3]
    m = metrics_from_ranks(sampled_ranks(NanRanker(), data, 3), (1,))
    assert m["HR@1"] == pytest.approx(1 / 3)
