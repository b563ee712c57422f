"""The validation loss (docs/spec.md §3.5): the mean per-sample pair loss of every user's
validation target (row n-2) with that row's fixed negative, checked against an
independent float64 computation in numpy from the model's weights and the prepared files
read by hand: in both modes, for every chunk size, split over two ranks (simulated in one
process and with two real gloo processes), and as printed into metrics.jsonl by a real
`fastattrec train` run."""

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from fastattrec.batches import DeviceData
from fastattrec.data.dataset import load_prepared
from fastattrec.distributed import Distributed
from fastattrec.model import AttRec, AttRecConfig
from fastattrec.training import validation_loss

from helpers import cli, write

# A hand-written MovieLens-1M log (user::item::rating::time), each user's lines already in
# time order. Lengths: users 1-8 have 3, 4, 5, 6, 7, 2, 4, 8 items, user 9 has 2, so the
# users with a validation sample (n >= 3) are 1, 2, 3, 4, 5, 7, 8: 7 rows, which two
# ranks split into blocks of 3 and 4. Items 101..115 (15 items; at most 8 seen per user,
# so 7 unseen, enough for 3 test negatives).
LOG = """\
1::106::2::1010
1::110::3::1011
1::114::4::1012
2::111::3::1020
2::115::4::1021
2::104::5::1022
2::108::1::1023
3::101::4::1030
3::105::5::1031
3::109::1::1032
3::113::2::1033
3::102::3::1034
4::106::5::1040
4::110::1::1041
4::114::2::1042
4::103::3::1043
4::107::4::1044
4::111::5::1045
5::111::1::1050
5::115::2::1051
5::104::3::1052
5::108::4::1053
5::112::5::1054
5::101::1::1055
5::105::2::1056
6::101::2::1060
6::105::3::1061
7::106::3::1070
7::110::4::1071
7::114::5::1072
7::103::1::1073
8::111::4::1080
8::115::5::1081
8::104::1::1082
8::108::2::1083
8::112::3::1084
8::101::4::1085
8::105::5::1086
8::109::1::1087
9::101::5::1090
9::105::1::1091
"""
N_VAL = 7
MAXLEN = 3
DIM = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("valloss")
    src = write(root / "ratings.dat", LOG)
    r = cli("prep", src, "-o", root / "data", "--test-negatives", "3")
    assert r.exit_code == 0, r.output
    return root / "data"


# ---- the independent computation (numpy, float64) -------------------------------------

def validation_samples(data_dir):
    """(users, windows, positives, negatives) of every validation sample, read from the
    prepared files by hand: row n-2 of each user with n >= 3, its fixed negative, and the
    MAXLEN items before it, left-padded with 0."""
    seq = pl.read_parquet(data_dir / "sequences.parquet")
    users = pl.read_parquet(data_dir / "users.parquet")
    items, negs = seq["item"].to_list(), seq["neg"].to_list()
    out = []
    for user, off, n in zip(users["user"], users["offset"], users["length"], strict=True):
        if n < 3:
            continue
        row = off + n - 2
        hist = items[off:row][-MAXLEN:]
        window = [0] * (MAXLEN - len(hist)) + hist
        out.append((user, window, items[row], negs[row], negs[row + 1]))
    return out


def positions(length, dim):
    p = np.zeros((length, dim))
    for pos in range(length):
        for j in range(dim):
            angle = pos / 10000 ** (2 * (j // 2) / dim)
            p[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    return p


def short_term(E, W, window):
    """docs/spec.md §2.3 written out again: Q = relu((X + P) W), masked softmax of
    Q Q^T / sqrt(d) over real keys, mean over all L rows of A X."""
    X = E[window]
    Q = np.maximum((X + positions(len(window), E.shape[1])) @ W, 0.0)
    S = Q @ Q.T / math.sqrt(E.shape[1])
    S[:, np.asarray(window) == 0] = -(2.0**32) + 1
    A = np.exp(S - S.max(axis=1, keepdims=True))
    A /= A.sum(axis=1, keepdims=True)
    return (A @ X).mean(axis=0)


def clip(v):
    return v / max(1.0, float(np.linalg.norm(v)))


def sample_loss(wts, user, window, pos, neg, mode, w, gamma):
    U, E, E2, W = (wts[k].detach().double().numpy()
                   for k in ("user_emb", "item_emb", "item2_emb", "proj"))
    short = short_term(E, W, window)

    def score(i):
        if mode == "inner":
            return w * U[user] @ E2[i] + (1 - w) * short @ E[i]
        u, e, e2 = clip(U[user]), clip(E[i]), clip(E2[i])
        return w * np.sum((u - e2) ** 2) + (1 - w) * np.sum((short - e) ** 2)

    sp, sn = score(pos), score(neg)
    if mode == "inner":
        return float(np.logaddexp(0.0, sn - sp))  # softplus(s_neg - s_pos)
    return max(0.0, sp - sn + gamma)


def expected(wts, samples, mode, w, gamma, shifted=False):
    """Mean loss over `samples`; `shifted` pairs each target with the next row's negative
    instead (what the bug `negs[rows + 1]` computes), to show the test can tell."""
    losses = [sample_loss(wts, u, win, pos, nxt if shifted else neg, mode, w, gamma)
              for u, win, pos, neg, nxt in samples]
    return sum(losses) / len(losses), losses


# ---- a model with weights large enough that every term matters ------------------------

def make_model(data_dir, mode, kernel, w=0.3, gamma=0.5, seed=0):
    p = load_prepared(data_dir)
    cfg = AttRecConfig(n_users=p.n_user_rows, n_items=p.n_item_rows, dim=DIM, maxlen=MAXLEN,
                       mode=mode, w=w, gamma=gamma, kernel=kernel)
    g = torch.Generator().manual_seed(seed)
    model = AttRec(cfg, generator=g)
    with torch.no_grad():  # norms around 1.4: some rows are clipped in mode dist, some not
        for t in model.tables():
            t.copy_(torch.randn(t.shape, generator=g) * 0.7)
        model.proj.copy_(torch.randn(model.proj.shape, generator=g) * 0.5)
    return model, DeviceData.from_prepared(p, "cpu")


@pytest.mark.parametrize("kernel", ["torch", "structured"])
@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_matches_the_hand_computation(data_dir, mode, kernel):
    samples = validation_samples(data_dir)
    assert len(samples) == N_VAL
    model, data = make_model(data_dir, mode, kernel)
    wts = model.state_dict()
    want, losses = expected(wts, samples, mode, 0.3, 0.5)
    wrong, _ = expected(wts, samples, mode, 0.3, 0.5, shifted=True)
    # The data and weights tell the right negative from the next row's, and in mode dist
    # the hinge is active for some samples and not for all.
    assert abs(want - wrong) > 1e-3
    if mode == "dist":
        assert 0 < sum(x > 0 for x in losses) < len(losses)
    got = validation_loss(model, data, MAXLEN)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_every_chunk_size_gives_the_same_value(data_dir, mode):
    model, data = make_model(data_dir, mode, "structured", seed=1)
    want, _ = expected(model.state_dict(), validation_samples(data_dir), mode, 0.3, 0.5)
    whole = validation_loss(model, data, MAXLEN)
    assert whole == pytest.approx(want, rel=1e-5, abs=1e-7)
    for chunk in (1, 2, 3, N_VAL - 1, N_VAL, 65536):
        assert validation_loss(model, data, MAXLEN, chunk=chunk) == pytest.approx(
            whole, rel=1e-6, abs=1e-8), chunk


class OneRankOfTwo(Distributed):
    """Rank `rank` of two, with the real contiguous `shard`; `all_sum` returns this rank's
    own partial (summing the ranks' results by hand stands in for the collective)."""

    def all_sum(self, t):
        return t.detach().clone()


@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_two_ranks_simulated_in_one_process(data_dir, mode):
    model, data = make_model(data_dir, mode, "structured", seed=2)
    samples = validation_samples(data_dir)
    wts = model.state_dict()
    want, losses = expected(wts, samples, mode, 0.3, 0.5)
    parts = [validation_loss(model, data, MAXLEN, dist=OneRankOfTwo(r, 2, torch.device("cpu")))
             for r in (0, 1)]
    # Rank 0 takes validation rows 0..2, rank 1 rows 3..6 (7 * r // 2 bounds); each
    # divides by the global count 7, so the partials add up to the mean.
    assert parts[0] == pytest.approx(sum(losses[:3]) / N_VAL, rel=1e-5, abs=1e-7)
    assert parts[1] == pytest.approx(sum(losses[3:]) / N_VAL, rel=1e-5, abs=1e-7)
    assert sum(parts) == pytest.approx(want, rel=1e-5, abs=1e-7)


_RANK = """
import json, torch
from importlib import import_module
from fastattrec.batches import DeviceData
from fastattrec.data.dataset import load_prepared
from fastattrec.distributed import from_environment, shutdown
from fastattrec.model import AttRec, AttRecConfig
validation_loss = getattr(import_module({module!r}), "validation_loss")
torch.set_num_threads(1)
dist = from_environment("cpu")
data = DeviceData.from_prepared(load_prepared({data!r}), dist.device)
values = []
for cfg, state in {models!r}:
    model = AttRec(AttRecConfig(**cfg))
    model.load_state_dict(torch.load(state, weights_only=True))
    values.append(validation_loss(model, data, {maxlen}, dist=dist))
print(json.dumps({{"rank": dist.rank, "world": dist.world, "values": values}}))
shutdown()
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(data_dir, tmp_path):
    """Two real processes (gloo, joined through the environment torchrun would set), one
    model per mode: each rank gets the global mean, equal to one process's value."""
    samples = validation_samples(data_dir)
    models, want, one = [], [], []
    for seed, mode in enumerate(("inner", "dist"), start=3):
        model, data = make_model(data_dir, mode, "structured", seed=seed)
        want.append(expected(model.state_dict(), samples, mode, 0.3, 0.5)[0])
        one.append(validation_loss(model, data, MAXLEN))
        torch.save(model.state_dict(), tmp_path / f"{mode}.pt")
        models.append((model.cfg.to_dict(), str(tmp_path / f"{mode}.pt")))
    code = _RANK.format(module=validation_loss.__module__, data=str(data_dir),
                        models=models, maxlen=MAXLEN)
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, out + err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    for r in results:
        for got, a, b in zip(r["values"], one, want, strict=True):
            assert got == pytest.approx(a, rel=1e-6, abs=1e-8)
            assert got == pytest.approx(b, rel=1e-5, abs=1e-7)


# ---- the value a real run logs ----------------------------------------------------------

@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_metrics_jsonl_holds_the_validation_loss_of_the_saved_weights(data_dir, tmp_path,
                                                                      mode):
    run = tmp_path / "run"
    r = cli("train", data_dir, "-o", run, "--epochs", "2", "--dim", "8", "--maxlen",
            str(MAXLEN), "--mode", mode, "--w", "0.3", "--gamma", "0.5", "--lr", "0.05",
            "--batch-size", "4", "--eval-every", "2", "-k", "3", "--device", "cpu",
            "--no-compile", "--no-progress")
    assert r.exit_code == 0, r.output
    rows = {h["epoch"]: h for h in map(json.loads,
                                       (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2]
    samples = validation_samples(data_dir)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    checked = [(ckpt["model"], rows[2])]
    best = torch.load(run / "best.pt", weights_only=True)
    if best["epoch"] == 1:  # best.pt holds epoch 1's weights: check that row too
        checked.append((best["model"], rows[1]))
    for wts, row in checked:
        want, _ = expected(wts, samples, mode, 0.3, 0.5)
        wrong, _ = expected(wts, samples, mode, 0.3, 0.5, shifted=True)
        assert abs(want - wrong) > 1e-3
        reg = 1e-6 * sum(float(wts[k].double().pow(2).sum())
                         for k in ("user_emb", "item_emb", "item2_emb"))
        assert row["reg_loss"] == pytest.approx(reg, rel=1e-5)
        assert row["val_loss"] - row["reg_loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
