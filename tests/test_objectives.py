"""The training objectives (docs/spec.md §2.5) against float64 numpy computations of
their formulas and gradients; N negatives per positive, shared negatives and their hit
mask; dropout; exact resume with each; the SASRec evaluation protocol's negatives."""

import json

import numpy as np
import pytest
import torch

from fastattrec import batches
from fastattrec.batches import DeviceData
from fastattrec.config import AttRecConfig, TrainConfig
from fastattrec.data.dataset import load_prepared
from fastattrec.errors import UserError
from fastattrec.evaluate import sasrec_negatives
from fastattrec.model import AttRec, gbce_beta, sample_terms
from fastattrec.training import train

from helpers import cli, synthetic_dataset

SMALL = dict(dim=8, batch_size=128, eval_every=3, device="cpu", compile=False)


def softplus(x):
    return np.logaddexp(0.0, x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_terms(s, ok, objective, mode, gamma, beta):
    """Per-sample losses and d(sum of losses)/ds, written out from the formulas."""
    sign = 1.0 if mode == "inner" else -1.0
    lg = sign * s
    b, k = s.shape
    loss, grad = np.zeros(b), np.zeros_like(s)
    for i in range(b):
        idx = [j for j in range(1, k) if ok[i, j - 1]]
        if objective == "pair":
            n = max(1, len(idx))
            for j in idx:
                if mode == "inner":
                    loss[i] += softplus(s[i, j] - s[i, 0]) / n
                    g = sigmoid(s[i, j] - s[i, 0]) / n
                    grad[i, j] += g
                    grad[i, 0] -= g
                else:
                    m = s[i, 0] - s[i, j] + gamma
                    loss[i] += max(m, 0.0) / n
                    if m > 0:
                        grad[i, 0] += 1.0 / n
                        grad[i, j] -= 1.0 / n
        elif objective in ("bce", "gbce"):
            loss[i] = beta * softplus(-lg[i, 0]) + sum(softplus(lg[i, j]) for j in idx)
            grad[i, 0] = sign * beta * (sigmoid(lg[i, 0]) - 1.0)
            for j in idx:
                grad[i, j] = sign * sigmoid(lg[i, j])
        else:  # sampled-softmax
            cand = [0, *idx]
            z = np.array([lg[i, j] for j in cand])
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            loss[i] = -np.log(p[0])
            for pj, j in zip(p, cand, strict=True):
                grad[i, j] = sign * (pj - (1.0 if j == 0 else 0.0))
    return loss, grad


@pytest.mark.parametrize("mode", ["inner", "dist"])
@pytest.mark.parametrize("objective", ["pair", "bce", "gbce", "sampled-softmax"])
@pytest.mark.parametrize("n", [1, 4])
def test_objectives_match_their_formulas_and_gradients(objective, mode, n):
    rng = np.random.default_rng(3)
    s = rng.normal(0, 2, (7, 1 + n))
    if mode == "dist":
        s = np.abs(s)  # distances
    ok = rng.random((7, n)) > 0.25  # negatives equal to their target are masked
    ok[0] = False  # a sample whose every negative is masked
    beta = 0.37 if objective == "gbce" else 1.0
    st = torch.tensor(s, requires_grad=True)
    got = sample_terms(st, torch.tensor(ok), objective, mode, 0.5, beta)
    got.sum().backward()
    want, grad = numpy_terms(s, ok, objective, mode, 0.5, beta)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(st.grad.numpy(), grad, rtol=1e-10, atol=1e-12)


def test_gbce_beta_hand_worked():
    # alpha = 256 / 1000 = 0.256; beta = 0.256 (0.75 (1 - 1/0.256) + 1/0.256) = 0.442
    assert gbce_beta(256, 1001, 0.75) == pytest.approx(0.442, abs=1e-12)
    assert gbce_beta(256, 1001, 0.0) == pytest.approx(1.0)  # plain bce
    assert gbce_beta(256, 1001, 1.0) == pytest.approx(0.256)  # alpha


def tiny_model(objective, mode, n_items=9, n_negatives=1):
    """A float64 model with random tables (kernel torch: the reference attention)."""
    cfg = AttRecConfig(n_users=5, n_items=n_items, dim=4, maxlen=3, mode=mode, w=0.3,
                       kernel="torch", objective=objective, n_negatives=n_negatives)
    return AttRec(cfg, generator=torch.Generator().manual_seed(2)).double()


def numpy_scores(m, users, short, items):
    """Scores of `items` (B, K) from the model's tables, written out (spec §2.4)."""
    U, E, E2 = (t.detach().numpy() for t in (m.user_emb, m.item_emb, m.item2_emb))
    w = m.cfg.w
    u, e, e2 = U[users][:, None], E[items], E2[items]
    sh = short[:, None]
    if m.cfg.mode == "inner":
        return w * (u * e2).sum(-1) + (1 - w) * (sh * e).sum(-1)

    def clip(v):
        return v / np.maximum(1.0, np.linalg.norm(v, axis=-1, keepdims=True))

    return (w * ((clip(u) - clip(e2)) ** 2).sum(-1)
            + (1 - w) * ((sh - clip(e)) ** 2).sum(-1))


@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_full_softmax_normalises_over_every_real_item(mode):
    """The softmax objective through the model: -log softmax of the target over every
    real item (row 0 and a hole in the catalogue excluded), against numpy."""
    m = tiny_model("softmax", mode)
    valid = torch.ones(9, dtype=torch.bool)
    valid[[0, 6]] = False  # padding and an id that is not an item
    m.set_item_rows(valid)
    users, windows = torch.tensor([1, 2, 4]), torch.tensor([[0, 1, 2], [3, 4, 5], [7, 8, 1]])
    pos = torch.tensor([3, 8, 2])
    loss = m(users, windows, pos, torch.zeros(3, dtype=torch.long))
    short = m.short_term(windows).detach().numpy()
    items = np.arange(9)[None].repeat(3, 0)
    lg = numpy_scores(m, users.numpy(), short, items) * (1 if mode == "inner" else -1)
    lg = lg[:, valid.numpy()]
    target = np.array([list(np.flatnonzero(valid.numpy())).index(p) for p in pos.tolist()])
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    want = np.mean(lse - lg[np.arange(3), target])
    assert float(loss) == pytest.approx(want, rel=1e-12)


def test_bce_with_shared_negatives_through_the_model_masks_hits():
    """bce with 3 negatives shared by the batch through AttRec.forward, one equal to a
    sample's target (an accidental hit): masked for that sample, against numpy."""
    m = tiny_model("bce", "inner", n_negatives=3)
    m.cfg.shared_negatives = True
    users, windows = torch.tensor([1, 3]), torch.tensor([[0, 2, 5], [1, 4, 7]])
    pos = torch.tensor([4, 6])
    neg = torch.tensor([1, 4, 8])  # shared; sample 0's second negative is its target
    loss = m(users, windows, pos, neg)
    short = m.short_term(windows).detach().numpy()
    cand = torch.cat([pos[:, None], neg[None].expand(2, 3)], 1).numpy()
    s = numpy_scores(m, users.numpy(), short, cand)
    terms = softplus(-s[:, 0]) + softplus(s[:, 1:]).sum(1)
    terms[0] -= softplus(s[0, 2])  # the masked hit
    assert float(loss) == pytest.approx(terms.mean(), rel=1e-12)


@pytest.mark.parametrize("mode", ["inner", "dist"])
@pytest.mark.parametrize("objective", ["pair", "gbce", "sampled-softmax"])
def test_shared_negatives_scored_by_one_product_equal_the_per_sample_form(objective, mode):
    """The shared form (N negative rows, one matrix product) against the same negatives
    given to every sample: the same loss and the same gradients."""
    grads = []
    for shared in (True, False):
        m = tiny_model(objective, mode, n_negatives=4)
        m.cfg.shared_negatives = shared
        users, windows = torch.tensor([1, 3, 2]), torch.tensor([[0, 2, 5], [1, 4, 7], [3, 3, 8]])
        pos, neg = torch.tensor([4, 6, 1]), torch.tensor([2, 5, 7, 8])
        loss = m(users, windows, pos, neg if shared else neg[None].expand(3, 4))
        loss.backward()
        grads.append([float(loss)] + [p.grad.clone() for p in m.parameters()])
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    for a, b in zip(grads[0][1:], grads[1][1:], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    return synthetic_dataset(root, 80, 150, 4000, seed=4, clusters=6, test_negatives=20)


def seen_items(data):
    users, items = data.row_user.numpy(), data.items.numpy()
    return {u: set(items[users == u]) for u in np.unique(users)}


def test_n_negatives_per_row_are_unseen_and_cover_the_catalogue(data_dir):
    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    negs = data.sample_negatives(torch.Generator().manual_seed(1), per_row=5)
    assert negs.shape == (data.items.shape[0], 5)
    seen = seen_items(data)
    users = data.row_user.numpy()
    for r in range(0, negs.shape[0], 7):
        for v in negs[r].tolist():
            assert 1 <= v < data.n_items and v not in seen[users[r]]
    # one user's many draws reach every item that user never had
    u = int(users[0])
    rows = torch.nonzero(data.row_user == u).flatten()
    many = data.sample_negatives(torch.Generator().manual_seed(2), per_row=400, rows=rows)
    assert set(many.flatten().tolist()) == set(range(1, data.n_items)) - seen[u]


@pytest.mark.parametrize("table", [True, False])
def test_the_r_th_unseen_item_is_found_with_and_without_the_table(data_dir, monkeypatch,
                                                                  table):
    """Both lookups of sample_negatives (the table of unseen items, and the search used
    where that table would be too large) give user u's r-th unseen item in ascending
    order, for every user and every r, as a plain sorted set difference does."""
    monkeypatch.setattr(batches, "UNSEEN_TABLE_MAX", 2**25 if table else 0)
    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    index = data.unseen_index
    assert (index.table is not None) == table
    seen = seen_items(data)
    users, ranks, want = [], [], []
    for u, items in seen.items():
        unseen = sorted(set(range(1, data.n_items)) - items)
        assert int(index.unseen[u]) == len(unseen)
        users += [u] * len(unseen)
        ranks += list(range(len(unseen)))
        want += unseen
    got = index.pick(torch.tensor(users), torch.tensor(ranks))
    assert got.tolist() == want


def test_shared_negatives_are_real_items(data_dir):
    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    shared = data.shared_negatives(torch.Generator().manual_seed(3), 6, 9)
    assert shared.shape == (6, 9)
    assert bool(data.item_valid[shared].all())


def test_sasrec_protocol_negatives(data_dir):
    """100 per test user, never an item the user rated (any split), with replacement, the
    same on every evaluation; `evaluate --protocol sasrec` reports them."""
    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    negs = sasrec_negatives(data)
    assert negs.shape == (data.test_rows.shape[0], 100)
    assert torch.equal(negs, sasrec_negatives(data))
    seen = seen_items(data)
    for i, row in enumerate(data.test_rows.tolist()):
        assert not set(negs[i].tolist()) & seen[int(data.row_user[row])]


@pytest.mark.parametrize("opts", [
    dict(objective="gbce", n_negatives=4, negatives="resample", dropout=0.2),
    dict(objective="softmax"),
    dict(objective="sampled-softmax", n_negatives=8, negatives="shared", mode="dist"),
    dict(objective="bce", n_negatives=3, negatives="resample", compile=True, dropout=0.1),
], ids=["gbce-dropout", "softmax", "sampled-softmax-shared", "bce-compiled-dropout"])
def test_resume_is_exact_with_each_objective(data_dir, tmp_path, opts):
    cfg = {**SMALL, **opts}
    full = train(data_dir, tmp_path / "full", TrainConfig(epochs=3, **cfg), log=print)
    train(data_dir, tmp_path / "part", TrainConfig(epochs=2, **cfg), log=print)
    r = cli("train", "--resume", tmp_path / "part", "--epochs", "3")
    assert r.exit_code == 0, r.output
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [h["train_loss"] for h in full.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    saved = json.loads((tmp_path / "full" / "config.json").read_text())["train"]
    assert {k: saved[k] for k in opts} == opts


def test_dropout_changes_training_and_only_training(data_dir, tmp_path):
    """With dropout the run differs from one without (masks are drawn), yet the same
    seed gives the same run."""
    a = train(data_dir, tmp_path / "a", TrainConfig(epochs=1, dropout=0.3, **SMALL))
    b = train(data_dir, tmp_path / "b", TrainConfig(epochs=1, dropout=0.3, **SMALL))
    c = train(data_dir, tmp_path / "c", TrainConfig(epochs=1, **SMALL))
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.history[0]["train_loss"] != c.history[0]["train_loss"]


@pytest.mark.parametrize("opts,words", [
    (dict(n_negatives=4), "--negatives resample"),
    (dict(objective="softmax", n_negatives=4, negatives="resample"), "no negatives"),
    (dict(objective="nce"), "--objective must be one of"),
    (dict(gbce_t=1.5), "--gbce-t must be between 0 and 1"),
    (dict(dropout=0.95), "--dropout must be between 0 and 0.9"),
])
def test_bad_objective_options_are_one_sentence(opts, words):
    with pytest.raises(UserError, match=words):
        TrainConfig(**opts).check()


def test_one_scatter_refuses_other_objectives(data_dir, tmp_path):
    with pytest.raises(UserError, match="one_scatter"):
        train(data_dir, tmp_path / "r", TrainConfig(epochs=1, objective="bce", kernel="torch",
                                                    one_scatter=True, **SMALL))


def test_which_objectives_train_with_the_hand_written_cpu_step(data_dir, tmp_path):
    """pair, bce, gbce and sampled-softmax with per-sample negatives, with or without
    dropout: the hand-written step; the full softmax and shared negatives: autograd."""
    lines = []
    for i, opts in enumerate([{}, dict(objective="sampled-softmax", n_negatives=4,
                                       negatives="resample"),
                              dict(objective="bce", dropout=0.1),
                              dict(objective="softmax"),
                              dict(objective="bce", n_negatives=4, negatives="shared")]):
        train(data_dir, tmp_path / str(i), TrainConfig(epochs=1, **opts, **SMALL),
              log=lines.append)
    steps = [line.split("step: ")[1].split(";")[0] for line in lines if "step: " in line]
    assert steps == ["hand-written"] * 3 + ["autograd, eager loss"] * 2


def test_a_fixed_negative_equal_to_its_target_still_counts():
    """Only shared negatives are masked: the notebook's pair loss counts a drawn negative
    that happens to be the target (possible under --compat notebook) as log 2."""
    m = tiny_model("pair", "inner")
    users, windows = torch.tensor([1]), torch.tensor([[0, 2, 5]])
    loss = m(users, windows, torch.tensor([4]), torch.tensor([4]))
    assert float(loss) == pytest.approx(np.log(2.0), rel=1e-12)


def test_the_quality_preset_fills_only_the_options_not_given(data_dir, tmp_path):
    """--preset quality sets its options where the command line is silent, an option
    given wins, and config.json records the values used; the API does the same."""
    from fastattrec.config import PRESETS

    r = cli("train", data_dir, "-o", tmp_path / "p", "--preset", "quality", "--epochs", "1",
            "--dim", "8", "--device", "cpu", "--no-compile")
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "p" / "config.json").read_text())["train"]
    want = {**PRESETS["quality"], "epochs": 1, "dim": 8, "preset": "quality"}
    assert {k: saved[k] for k in want} == want
    r = cli("train", data_dir, "-o", tmp_path / "n", "--epochs", "1", "--dim", "8",
            "--device", "cpu", "--no-compile")
    assert r.exit_code == 0, r.output
    plain = json.loads((tmp_path / "n" / "config.json").read_text())["train"]
    assert (plain["objective"], plain["n_negatives"], plain["early_stop"]) == ("pair", 1, 0)
    import fastattrec as fa

    run = fa.train(data_dir, tmp_path / "api", preset="quality", epochs=1, dim=8,
                   device="cpu", compile=False, n_negatives=2)
    assert (run.options["objective"], run.options["n_negatives"]) == (
        PRESETS["quality"]["objective"], 2)
    with pytest.raises(UserError, match="--preset must be one of notebook, quality"):
        fa.train(data_dir, tmp_path / "bad", preset="best")


@pytest.mark.parametrize("opts,words", [
    (dict(objective="softmax", n_negatives=4), "drop --n-negatives and --negatives shared"),
    (dict(objective="softmax", negatives="shared"), "takes no negatives"),
    (dict(gbce_t=0.5), "--gbce-t applies to --objective gbce only"),
])
def test_options_an_objective_would_ignore_are_refused(opts, words):
    with pytest.raises(UserError, match=words):
        TrainConfig(**opts).check()
    TrainConfig(objective="gbce", gbce_t=0.5).check()  # where it applies


def test_more_negatives_than_items_are_refused(data_dir, tmp_path):
    r = cli("train", data_dir, "-o", tmp_path / "r", "--n-negatives", "100000",
            "--negatives", "resample", "--device", "cpu", "--no-compile")
    assert r.exit_code != 0 and "--n-negatives 100000 is not less than the" in r.output
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_changed_flag_on_resume_is_named_as_typed(data_dir, tmp_path):
    train(data_dir, tmp_path / "r", TrainConfig(epochs=1, **SMALL))
    r = cli("train", "--resume", tmp_path / "r", "--epochs", "2", "--compile")
    assert r.exit_code != 0 and "--compile (the run's: --no-compile)" in r.output
