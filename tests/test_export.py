"""`fastattrec export`: the exported file, loaded by torch.export or ONNX Runtime alone,
ranks each user's unseen items as `recommend` does, with the same scores, from windows
built here with the id maps the file carries (docs/formats.md §5)."""

import json

import numpy as np
import pytest
import torch

import fastattrec as fa
from fastattrec.errors import UserError

from helpers import cli, trained_on_histories, write

HISTORY = {"ann": [101, 102, 103, 104], "bob": [102, 103, 105], "cy": [101, 106, 107, 108],
           "dee": [104, 105, 106], "eve": [107, 108, 101], "fay": [103, 104, 105, 106]}
L = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return fa.load_run(trained_on_histories(root, HISTORY, text_ids=True, maxlen=L))


def inputs(meta, queries):
    """users (B,), windows (B, L) and seen rows per query from raw ids and the file's maps:
    a query is (raw user or None, its items oldest first)."""
    user_row = dict(zip(meta["user_rows"]["raw_user"], meta["user_rows"]["row"], strict=True))
    item_row = dict(zip(meta["item_rows"]["raw_item"], meta["item_rows"]["row"], strict=True))
    users, windows, seen = [], [], []
    for user, items in queries:
        rows = [item_row[i] for i in items]
        users.append(user_row.get(user, 0))
        windows.append(([0] * L + rows)[-L:])
        seen.append(rows)
    return np.array(users, dtype=np.int64), np.array(windows, dtype=np.int64), seen


def ranked(meta, goodness, seen, k):
    """Top-k (raw item, score) lists from goodness (B, I) with each query's seen rows out."""
    raw_of = dict(zip(meta["item_rows"]["row"], meta["item_rows"]["raw_item"], strict=True))
    out = []
    for g, rows in zip(np.asarray(goodness, dtype=np.float64), seen, strict=True):
        g = g.copy()
        g[rows] = -np.inf
        top = [j for j in np.argsort(-g, kind="stable")[:k] if np.isfinite(g[j])]
        out.append(([raw_of[j] for j in top], g[top]))
    return out


QUERIES = [("ann", HISTORY["ann"]), ("dee", HISTORY["dee"]), ("cy", HISTORY["cy"])]
NEW = [101, 105, 107, 102]


def check_against_run(run, meta, score, atol):
    users, windows, seen = inputs(meta, QUERIES + [(None, NEW)])
    got = ranked(meta, score(users, windows), seen, 4)
    rec = run.recommend(users=[u for u, _ in QUERIES], k=4)
    for (user, _), (items, scores) in zip(QUERIES, got[:-1], strict=True):
        part = rec.filter(rec["raw_user"] == user)
        assert items == part["raw_item"].to_list()
        np.testing.assert_allclose(scores, part["score"].to_numpy(), rtol=0, atol=atol)
    new = run.recommend(histories={None: NEW}, k=4)
    assert got[-1][0] == new["raw_item"].to_list()
    np.testing.assert_allclose(got[-1][1], new["score"].to_numpy(), rtol=0, atol=atol)


def test_pt2_gives_the_runs_scores(run, tmp_path):
    r = cli("export", str(run.path), "-o", str(tmp_path / "m.pt2"))
    assert r.exit_code == 0, r.output
    extra = {"fastattrec.json": ""}
    program = torch.export.load(tmp_path / "m.pt2", extra_files=extra)
    meta = json.loads(extra["fastattrec.json"])
    assert meta["kind"] == "fastattrec-model" and meta["maxlen"] == L
    assert sorted(meta["user_rows"]["raw_user"]) == sorted(HISTORY)
    module = program.module()

    def score(users, windows):  # a plain call, as a serving stack makes it
        return module(torch.from_numpy(users), torch.from_numpy(windows)).numpy()

    check_against_run(run, meta, score, atol=1e-6)
    assert np.isneginf(score(*inputs(meta, [(None, [101])])[:2])[0, 0])  # padding row


def test_onnx_gives_the_runs_scores(run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = run.export(tmp_path / "m.onnx")
    meta = json.loads(next(p.value for p in onnx.load(path).metadata_props
                           if p.key == "fastattrec"))
    session = ort.InferenceSession(str(path))

    def score(users, windows):
        return session.run(["goodness"], {"users": users, "windows": windows})[0]

    check_against_run(run, meta, score, atol=1e-5)


def test_export_refusals(run, tmp_path):
    for name, says in (("m.pt", "TorchScript, which torch deprecates"),
                       ("m.txt", "must end in .pt2 (torch.export) or .onnx")):
        r = cli("export", str(run.path), "-o", str(tmp_path / name))
        assert r.exit_code != 0 and "Traceback" not in r.output
        assert says in r.output
    foreign = write(tmp_path / "theirs.pt2", "not ours")
    r = cli("export", str(run.path), "-o", str(foreign), "--force")
    assert r.exit_code != 0 and "did not make" in r.output
    assert foreign.read_text() == "not ours"
    ours = run.export(tmp_path / "ours.pt2")
    with pytest.raises(UserError, match="already exists"):
        run.export(ours)
    before = ours.stat().st_mtime_ns
    run.export(ours, force=True)  # our own export: replaced
    assert ours.stat().st_mtime_ns >= before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers
