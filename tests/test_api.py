"""The Python API: the README's example runs as written, returns what it says, and
mistakes raise the same one-sentence UserError the command prints."""

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import fastattrec as fa
from fastattrec.errors import UserError

from helpers import TINY_ML1M, write

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "quickstart.py"


def test_readme_shows_the_example_that_the_suite_runs():
    code = [line for line in EXAMPLE.read_text().splitlines()
            if line and not line.startswith('"""')]
    assert len(code) < 15
    readme = (ROOT / "README.md").read_text()
    for line in code:
        assert line in readme, line


def test_the_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert re.search(r"AttRec\s+┆ sampled", r.stdout) and "popularity" in r.stdout
    assert re.search(r"^epoch +1/10 ", r.stdout, re.M)  # log=print shows the epochs
    ev = json.loads((tmp_path / "quickstart" / "run" / "eval.json").read_text())
    assert 1 <= ev["epoch"] <= 10 and set(ev["results"]) == {"AttRec", "popularity"}
    full = {m: ev["results"][m]["full"] for m in ("AttRec", "popularity")}
    assert full["AttRec"]["HR@10"] > full["popularity"]["HR@10"]  # a first model worth having
    assert (tmp_path / "quickstart" / "data" / "meta.json").exists()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    fa.synthesize(root / "r.dat", users=60, items=200, interactions=3000, seed=4)
    data = fa.prepare(root / "r.dat", root / "data", test_negatives=20)
    return fa.train(data, root / "run", epochs=2, dim=8, batch_size=128, device="cpu",
                    compile=False)


def test_objects_and_frames(run):
    assert run.data.counts["users"] == 60 and len(run.data.fingerprint) == 64
    h = run.history()
    assert h.get_column("epoch").to_list() == [1, 2]
    assert "test_sampled_HR@10" in h.columns  # the last epoch is tested
    again = fa.load_run(run.path)
    assert again.history().get_column("train_loss").to_list() == \
        h.get_column("train_loss").to_list()
    frame = run.evaluate(ks=[5, 10], protocol="sampled")
    assert frame.select("model", "protocol").rows() == [("AttRec", "sampled"),
                                                         ("popularity", "sampled")]
    saved = json.loads((run.path / "eval.json").read_text())["results"]
    assert frame.row(0, named=True)["HR@10"] == saved["AttRec"]["sampled"]["HR@10"]
    assert frame.row(1, named=True)["MRR"] == saved["popularity"]["sampled"]["MRR"]
    recs = run.recommend(users=[3, 1], k=4)
    assert recs.get_column("raw_user").to_list() == [3] * 4 + [1] * 4
    assert recs.get_column("rank").to_list() == [1, 2, 3, 4] * 2
    every = run.recommend(k=2)
    assert every.height == 2 * 60 and every.schema["score"] == pl.Float32


def test_mistakes_raise_user_error(run, tmp_path):
    with pytest.raises(UserError, match="unknown training option"):
        fa.train(run.data, tmp_path / "r2", epoch=3)
    with pytest.raises(UserError, match="does not exist"):
        fa.load_run(tmp_path / "nowhere")
    with pytest.raises(UserError, match="-k must be a whole number from 1"):
        run.evaluate(ks=[0])
    with pytest.raises(UserError, match="not in the prepared data"):
        run.recommend(users=[99999])
    with pytest.raises(UserError, match="integers"):
        run.recommend(users=["alice"])
    src = write(tmp_path / "r.dat", TINY_ML1M)
    with pytest.raises(UserError, match="is the input"):
        fa.prepare(src, src, force=True)


def test_api_argument_mistakes(run):
    with pytest.raises(UserError, match="protocol must be one of"):
        run.evaluate(protocol="xx")
    with pytest.raises(UserError, match="users is empty"):
        run.recommend(users=[], k=5)


@pytest.mark.parametrize("call", [
    lambda run: run.recommend(users=1),
    lambda run: run.recommend(users=[1], k=True),
    lambda run: run.evaluate(ndcg_log="10"),
    lambda run: run.evaluate(ks="10"),
    lambda run: run.evaluate(ks=[10.5]),
    lambda run: run.evaluate(ks=[]),
    lambda run: fa.load_run(None),
    lambda run: fa.load_dataset(5),
    lambda run: fa.synthesize("x.dat", users=True),
    lambda run: fa.synthesize(None),
    lambda run: fa.prepare(123, "out"),
    lambda run: fa.prepare("r.dat", "out", test_negatives=1.5),
    lambda run: fa.prepare("r.dat", "out", seed=-1),
    lambda run: fa.prepare("r.dat", "out", trans_score="3"),
])
def test_odd_api_arguments_are_user_errors(run, call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError):
        call(run)
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.dat").exists()


# ---- issue 20 (D10): arguments are checked where they enter the API ---------------------

@pytest.mark.parametrize("call,name", [
    (lambda run, src: fa.train(None, "out"), "data"),
    (lambda run, src: fa.train(run.data, None), "out"),
    (lambda run, src: fa.train(run.data, "out", log=5), "log"),
    (lambda run, src: fa.train(run.data, "out", progress="yes"), "progress"),
    (lambda run, src: run.evaluate(device=0), "device"),
    (lambda run, src: run.evaluate(checkpoint=5), "checkpoint"),
    (lambda run, src: run.evaluate(data=5), "data"),
    (lambda run, src: run.evaluate(baseline="no"), "baseline"),
    (lambda run, src: run.evaluate(save="no"), "save"),
    (lambda run, src: run.recommend(users=[1], device=0), "device"),
    (lambda run, src: run.recommend(users=[1], data=5), "data"),
    (lambda run, src: run.recommend(users=[1], titles=pl.DataFrame({"a": [1]})), "titles"),
    (lambda run, src: run.recommend(users=[1], titles=pl.DataFrame({"raw_item": [1]})),
     "titles"),
    (lambda run, src: run.recommend(users=[1], titles=5), "titles"),
    (lambda run, src: fa.prepare(src, "out", log=5), "log"),
    (lambda run, src: fa.prepare(src, "out", streaming="no"), "streaming"),
    (lambda run, src: fa.prepare(src, "out", format=5), "format"),
    (lambda run, src: fa.prepare(src, "out", user_col=5), "user_col"),
    (lambda run, src: fa.resume(run.path, epochs=1.5), "epochs"),
    (lambda run, src: fa.resume(run.path, device=0), "device"),
    (lambda run, src: fa.resume(run.path, data=5), "data"),
])
def test_each_refused_argument_is_named(run, call, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = write(tmp_path / "r.dat", TINY_ML1M)
    eval_json = (run.path / "eval.json").read_bytes() if (run.path / "eval.json").exists() \
        else None
    with pytest.raises(UserError, match=rf"^{name} must be|^{name} lacks|^{name} has"):
        call(run, src)
    assert not (tmp_path / "out").exists()
    after = (run.path / "eval.json").read_bytes() if (run.path / "eval.json").exists() else None
    assert after == eval_json


def test_force_must_be_a_bool_and_a_string_replaces_nothing(run, tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    data = fa.prepare(src, tmp_path / "data", test_negatives=2)
    meta = (data.path / "meta.json").read_bytes()
    with pytest.raises(UserError, match="^force must be True or False, got 'no'"):
        fa.prepare(src, data.path, test_negatives=2, seed=5, force="no")
    assert (data.path / "meta.json").read_bytes() == meta
    ckpt = (run.path / "checkpoint.pt").read_bytes()
    with pytest.raises(UserError, match="^force must be True or False"):
        fa.train(run.data, run.path, force="no", epochs=1)
    assert (run.path / "checkpoint.pt").read_bytes() == ckpt
    synth = fa.synthesize(tmp_path / "s.dat", users=5, items=5, interactions=20)
    text = synth.read_bytes()
    with pytest.raises(UserError, match="^force must be True or False"):
        fa.synthesize(synth, users=6, items=5, interactions=20, force=1)
    assert synth.read_bytes() == text


def test_a_dataset_object_is_taken_wherever_a_path_is(run):
    by_path = run.evaluate(ks=[10], protocol="sampled", data=str(run.data.path), save=False)
    by_object = run.evaluate(ks=[10], protocol="sampled", data=run.data, save=False)
    assert by_object.equals(by_path)
    assert run.recommend(users=[1], k=3, data=run.data).equals(run.recommend(users=[1], k=3))
    titles = pl.DataFrame({"raw_item": run.recommend(users=[1], k=3)["raw_item"],
                           "title": ["a", "b", "c"]})
    recs = run.recommend(users=[1], k=3, titles=titles, allow_missing=True)
    assert recs.get_column("title").to_list() == ["a", "b", "c"]


# ---- issue 21: users are taken once each ------------------------------------------------

def test_a_user_given_twice_gets_one_list(run):
    recs = run.recommend(users=["3", 3, 1, "1"], k=2)
    assert recs.get_column("raw_user").to_list() == [3, 3, 1, 1]
    with pytest.raises(UserError, match="^user 99999 is not in the prepared data"):
        run.recommend(users=[3, 99999])


def test_allow_missing_must_be_a_bool(run):
    with pytest.raises(UserError, match="^allow_missing must be True or False, got 'yes'"):
        run.recommend(users=[1], allow_missing="yes")
