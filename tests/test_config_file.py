"""`fastattrec train --config FILE`: options from TOML or a run's config.json, the command
line overriding them, every mistake one sentence naming the file and line."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import fastattrec as fa
from fastattrec.cli import main
from fastattrec.config import PRESETS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    fa.synthesize(root / "r.dat", users=60, items=300, interactions=1500, seed=3)
    return fa.prepare(root / "r.dat", root / "d").path


def run_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def saved(run_dir):
    return json.loads((run_dir / "config.json").read_text())["train"]


def test_toml_top_level_and_train_table_set_options_and_the_command_line_wins(data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('epochs = 1\nseed = 5\n[train]\ndim = 12\ncompile = false\nlr = 0.01\n'
                   'mode = "dist"\n')
    res = run_cli("train", data, "-o", tmp_path / "run", "--config", cfg, "--lr", "0.02")
    assert res.exit_code == 0, res.output
    t = saved(tmp_path / "run")
    assert (t["epochs"], t["seed"], t["dim"], t["compile"], t["mode"]) == (1, 5, 12, False,
                                                                          "dist")
    assert t["lr"] == 0.02  # the command line over the file
    assert t["maxlen"] == 5  # neither: the default


def test_a_runs_config_json_repeats_the_run_bit_for_bit(data, tmp_path):
    first = fa.train(data, tmp_path / "a", epochs=1, dim=8, compile=False, seed=11,
                     negatives="resample", w=0.3)
    res = run_cli("train", "-o", tmp_path / "b", "--config", first.path / "config.json")
    assert res.exit_code == 0, res.output  # data_dir from the file stands for DATA_DIR
    assert saved(tmp_path / "b") == saved(tmp_path / "a")
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_preset_in_the_file_then_file_then_command_line(data, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "quality"\nn_negatives = 4\ncompile = false\ndim = 8\n')
    run = fa.train(data, tmp_path / "run", config=cfg, n_negatives=2, epochs=1)
    t = saved(run.path)
    assert t["objective"] == PRESETS["quality"]["objective"] != "pair"  # the preset's
    assert t["early_stop"] == 5 and t["lr"] == PRESETS["quality"]["lr"] != 1e-3
    assert t["n_negatives"] == 2 and t["dim"] == 8 and t["epochs"] == 1


@pytest.mark.parametrize("text, expected", [
    ("dim = 8\ndimm = 3\n", "c.toml, line 2: 'dimm' is not a training option (did you mean "
                            "dim?)"),
    ("[train]\n\ndim = 0\n", "c.toml, line 3: dim must be at least 1, got 0."),
    ('mode = "cosine"\n', "c.toml, line 1: mode must be one of inner, dist, got 'cosine'."),
    ("dim = \n", "c.toml is not valid TOML (Invalid value (at line 1, column 7))"),
    ("dim = 8\n[train]\ndim = 9\n", "c.toml: dim is set both at the top and under [train]"),
    ("compile = 1\n", "c.toml, line 1: compile must be true or false, got 1."),
    ("dim = [1, 2]\n", "c.toml, line 1: dim must be a single value, not a list."),
])
def test_each_mistake_is_one_sentence_naming_file_and_line(data, tmp_path, monkeypatch,
                                                            text, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.toml").write_text(text)
    res = run_cli("train", data, "-o", "run", "--config", "c.toml")
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.output
    assert not (tmp_path / "run").exists()


def test_a_missing_file_and_resume_are_refused(data, tmp_path):
    res = run_cli("train", data, "-o", tmp_path / "run", "--config", tmp_path / "none.toml")
    assert res.exit_code != 0 and "does not exist" in res.output
    run = fa.train(data, tmp_path / "r", epochs=1, dim=8, compile=False)
    (tmp_path / "c.toml").write_text("epochs = 2\n")
    res = run_cli("train", "--resume", run.path, "--config", tmp_path / "c.toml")
    assert res.exit_code != 0 and "a resumed run keeps its own" in res.output
    with pytest.raises(fa.UserError, match="data must be the prepared dataset"):
        fa.train(None, tmp_path / "x", config=tmp_path / "c.toml")
