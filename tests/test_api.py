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
    ev = json.loads((tmp_path / "demo" / "run" / "eval.json").read_text())
    assert ev["epoch"] == 5 and set(ev["results"]) == {"AttRec", "popularity"}
    assert (tmp_path / "demo" / "data" / "meta.json").exists()


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
