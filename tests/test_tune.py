"""`fastattrec tune`: each trial is a run trained with the options the table says, scored
by that run's best validation NDCG; best.toml is the best trial's options; the folder
resumes (new points, interrupted trials recorded as failed); mistakes are one line."""

import json

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import polars as pl
import pytest

import fastattrec as fa
from fastattrec.tune import SPACE

from helpers import cli, write

optuna = pytest.importorskip("optuna")

BASE = 'epochs = 2\nearly_stop = 0\neval_every = 2\ndevice = "cpu"\ncompile = false\n' \
       'batch_size = 256\n'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    fa.synthesize(root / "r.dat", users=60, items=200, interactions=3000, seed=4)
    fa.prepare(root / "r.dat", root / "data", test_negatives=20)
    write(root / "base.toml", BASE)
    return root


@pytest.fixture(scope="module")
def searched(data):
    r = cli("tune", str(data / "data"), "-o", str(data / "t"), "--trials", "3", "--config",
            str(data / "base.toml"))
    assert r.exit_code == 0, r.output
    return data / "t", r


def run_options(run_dir):
    return json.loads((run_dir / "config.json").read_text())["train"]


def best_val(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return max(json.loads(x)["val_metric"] for x in lines)


def test_each_trial_is_a_run_with_its_options_and_score(searched):
    out, _ = searched
    table = pl.read_csv(out / "trials.csv")
    assert table.height == 3 and table["state"].to_list() == ["complete"] * 3
    for row in table.iter_rows(named=True):
        run = out / row["run"]
        opts = run_options(run)
        for name in SPACE:
            assert opts[name] == pytest.approx(row[name]), name
        assert opts["negatives"] == "resample" and opts["epochs"] == 2
        assert row["val_ndcg"] == pytest.approx(best_val(run))


def test_best_toml_is_the_best_trial_and_trains(searched, data):
    out, r = searched
    table = pl.read_csv(out / "trials.csv")
    best = table.sort("val_ndcg", descending=True).row(0, named=True)
    opts = tomllib.loads((out / "best.toml").read_text())
    for name in SPACE:
        assert opts[name] == pytest.approx(best[name]), name
    assert opts["data_dir"] == str((data / "data").resolve())
    assert f"best: trial {best['trial']}," in r.output
    r = cli("train", "-o", str(data / "again"), "--config", str(out / "best.toml"))
    assert r.exit_code == 0, r.output
    again = run_options(data / "again")
    assert {k: again[k] for k in SPACE} == pytest.approx({k: opts[k] for k in SPACE})


def test_resume_draws_new_points_and_closes_interrupted_trials(searched, data):
    out, _ = searched
    study = optuna.load_study(study_name="fastattrec", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))))
    study.ask()  # a trial left running, as by a killed tune
    r = cli("tune", str(data / "data"), "-o", str(out), "--trials", "4", "--resume",
            "--device", "cpu")  # a resumed search may name its device again
    assert r.exit_code == 0, r.output
    assert "trial 3 was interrupted; it is recorded as failed" in r.output
    assert "up to 1 more trial (3 finished already)" in r.output  # what it is about to do
    assert "trial 4: objective=" in r.output  # a trial's options, said as it starts
    table = pl.read_csv(out / "trials.csv")
    assert table["state"].to_list() == ["complete"] * 3 + ["fail", "complete"]
    points = [tuple(row[k] for k in SPACE) for row in table.filter(
        pl.col("state") == "complete").iter_rows(named=True)]
    assert len(set(points)) == 4  # the resumed search did not repeat its first draws
    r = cli("tune", str(data / "data"), "-o", str(out), "--trials", "4", "--resume")
    assert r.exit_code == 0 and "already holds 4 finished trials" in r.output


def test_time_budget_stops_starting_trials(data):
    r = cli("tune", str(data / "data"), "-o", str(data / "b"), "--trials", "5",
            "--time-budget", "0.05s", "--config", str(data / "base.toml"))
    assert r.exit_code == 0, r.output
    assert pl.read_csv(data / "b" / "trials.csv").height == 1  # the one in flight finished


@pytest.mark.parametrize(("args", "says"), [
    (["-o", "{t}"], "holds a search already; --resume continues"),
    (["-o", "{data}", "--resume"], "is not a tuning folder"),
    (["-o", "{new}", "--config", "{dim}"], "sets dim, which the search chooses"),
    (["-o", "{new}", "--time-budget", "soon"], "is not a positive duration"),
    (["-o", "{new}", "--config", "{fixed}"], "every trial trains with negatives = 'resample'"),
    (["-o", "{t}", "--resume", "--force"], "give one of them"),
])
def test_mistakes_are_one_line(searched, data, args, says):
    write(data / "dim.toml", "dim = 8\n")
    write(data / "fixed.toml", 'negatives = "fixed"\n')
    paths = {"t": data / "t", "data": data / "data", "new": data / "new",
             "dim": data / "dim.toml", "fixed": data / "fixed.toml"}
    r = cli("tune", str(data / "data"), *[a.format(**paths) for a in args])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert says in r.output.strip().splitlines()[-1]
    assert not (data / "new").exists()
