"""Training end to end on CPU: learning beats popularity, resume is exact, early stopping
keeps the best epoch, the run folder holds what the README says, and the CLI explains
mistakes."""

import csv
import importlib.util
import json

import polars as pl
import pytest
import torch

from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.synth import synthesize
from fastattrec.training import TrainConfig, train

from helpers import cli, synthetic_dataset

SMALL = dict(dim=16, batch_size=256, eval_every=2, device="cpu", compile=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return synthetic_dataset(root, 200, 600, 16000, seed=1, clusters=12, test_negatives=50)


def test_learns_and_beats_popularity(data_dir, tmp_path):
    res = train(data_dir, tmp_path / "run", TrainConfig(epochs=6, lr=5e-3, **SMALL), log=print)
    r = cli("evaluate", tmp_path / "run", "-k", "10")
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]
    for proto in ("sampled", "full"):
        assert ev["AttRec"][proto]["HR@10"] > ev["popularity"][proto]["HR@10"] + 0.05
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0]
    # Run folder contents.
    run = tmp_path / "run"
    for f in ("config.json", "checkpoint.pt", "best.pt", "log.csv", "metrics.jsonl",
              "eval.json"):
        assert (run / f).exists(), f
    # curves.png needs matplotlib (the `plot` extra); without it the run still completes
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (run / "curves.png").exists() == has_matplotlib
    rows = list(csv.reader((run / "log.csv").open()))
    assert rows[0] == ["Iteration", "fit_time", "evaluate_time", "hit_rate", "ndcg", "mrr"]
    assert [int(r[0]) for r in rows[1:]] == [2, 4, 6]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize("mode,negatives", [("inner", "fixed"), ("dist", "resample")])
def test_resume_gives_identical_weights_and_metrics(data_dir, tmp_path, mode, negatives):
    cfg = dict(epochs=4, mode=mode, negatives=negatives, **SMALL)
    full = train(data_dir, tmp_path / "full", TrainConfig(**cfg), log=print)
    part = TrainConfig(**{**cfg, "epochs": 2})
    train(data_dir, tmp_path / "part", part, log=print)
    r = cli("train", "--resume", tmp_path / "part", "--epochs", "4")
    assert r.exit_code == 0, r.output
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    strip = ("fit_time", "eval_time", "samples_per_s")
    ha = [{k: v for k, v in h.items() if k not in strip} for h in full.history]
    hb = [{k: v for k, v in h.items() if k not in strip} for h in b["history"]]
    assert ha == hb


def test_early_stop_keeps_best(data_dir, tmp_path):
    res = train(data_dir, tmp_path / "run", TrainConfig(epochs=30, lr=3e-2, early_stop=2,
                                                         **SMALL), log=print)
    assert res.stopped_early and len(res.history) < 30
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    metric = [h["val_metric"] for h in res.history]
    assert best["epoch"] == 1 + max(range(len(metric)), key=metric.__getitem__)
    assert len(res.history) - best["epoch"] == 2


def test_time_budget_stops_between_epochs_and_resumes_with_a_larger_one(data_dir, tmp_path):
    """A budget already spent by the first epoch stops the run after it (best.pt kept);
    --resume alone has nothing to do; --resume --time-budget 0 trains on to --epochs, to
    the weights of a run never stopped."""
    cfg = dict(epochs=3, negatives="resample", **SMALL)
    lines = []
    res = train(data_dir, tmp_path / "cut", TrainConfig(time_budget=1e-6, **cfg),
                log=lines.append)
    assert res.stopped_early and [h["epoch"] for h in res.history] == [1]
    assert any("would end past --time-budget" in line for line in lines), lines
    assert torch.load(tmp_path / "cut" / "best.pt", weights_only=False)["epoch"] == 1
    r = cli("train", "--resume", tmp_path / "cut")
    assert r.exit_code == 0 and "nothing to resume" in r.output, r.output
    r = cli("train", "--resume", tmp_path / "cut", "--time-budget", "0")
    assert r.exit_code == 0, r.output
    full = train(data_dir, tmp_path / "full", TrainConfig(**cfg), log=print)
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert b["epoch"] == 3 == len(full.history)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    r = cli("train", "--resume", tmp_path / "cut", "--time-budget", "-1")
    assert r.exit_code != 0 and "--time-budget" in r.output, r.output


def test_triton_backend_in_interpreter_matches_reference(tmp_path):
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel in the CPU interpreter")
    synthesize(tmp_path / "r.dat", 20, 80, 400, seed=2)
    prepare(tmp_path / "r.dat", tmp_path / "data", PrepOptions(test_negatives=10))
    cfg = dict(epochs=1, eval_every=1, dim=8, batch_size=128, device="cpu")
    a = train(tmp_path / "data", tmp_path / "t", TrainConfig(kernel="triton", **cfg), log=print)
    b = train(tmp_path / "data", tmp_path / "r", TrainConfig(kernel="torch", **cfg), log=print)
    assert a.backend == "triton"
    assert a.history[0]["train_loss"] == pytest.approx(b.history[0]["train_loss"], rel=1e-5)


def test_recommend(data_dir, tmp_path):
    train(data_dir, tmp_path / "run", TrainConfig(epochs=1, **SMALL), log=print)
    r = cli("recommend", tmp_path / "run", "--user", "7", "-k", "5")
    assert r.exit_code == 0, r.output
    assert r.output.count("item ") == 5
    out = tmp_path / "recs.parquet"
    r = cli("recommend", tmp_path / "run", "--all-users", "-o", out, "-k", "3")
    assert r.exit_code == 0, r.output
    recs = pl.read_parquet(out)
    assert recs.height == 200 * 3 and recs.columns == ["raw_user", "rank", "raw_item", "score"]
    # Never an item the user already has.
    from fastattrec.data.ratings import read_ratings

    seen, _ = read_ratings(data_dir.parent / "r.dat")
    clash = recs.join(seen.select(pl.col("user").alias("raw_user"),
                                  pl.col("item").alias("raw_item")),
                      on=["raw_user", "raw_item"])
    assert clash.height == 0
    r = cli("recommend", tmp_path / "run", "--user", "99999")
    assert r.exit_code != 0 and "not in the prepared data" in r.output


def test_cli_errors(data_dir, tmp_path):
    r = cli("train", tmp_path / "missing", "-o", tmp_path / "run")
    assert r.exit_code != 0 and "does not exist" in r.output
    (tmp_path / "notdata").mkdir()
    r = cli("train", tmp_path / "notdata", "-o", tmp_path / "run")
    assert r.exit_code != 0 and "not a prepared dataset" in r.output
    r = cli("train", data_dir, "-o", tmp_path / "run", "--epochs", "0")
    assert r.exit_code != 0 and "--epochs must be at least 1" in r.output
    r = cli("evaluate", tmp_path / "nowhere")
    assert r.exit_code != 0 and "nowhere does not exist" in r.output
    r = cli("train", "--resume", tmp_path / "notdata")
    assert r.exit_code != 0 and "not a fastattrec run" in r.output
    r = cli("train", data_dir, "-o", tmp_path / "r2", "--device", "cuda")
    if not torch.cuda.is_available():
        assert r.exit_code != 0 and "no CUDA GPU" in r.output
    # A finished run is not overwritten by accident.
    train(data_dir, tmp_path / "done", TrainConfig(epochs=1, **SMALL), log=print)
    r = cli("train", data_dir, "-o", tmp_path / "done", "--epochs", "1")
    assert r.exit_code != 0 and "--resume" in r.output
    r = cli("train", "--resume", tmp_path / "done", "--lr", "0.1")
    assert r.exit_code != 0 and "only --epochs, --device and --time-budget" in r.output


def test_config_choices_match_the_kernels():
    """config.py is torch-free, so it spells the kernels' choices out; they must agree,
    and the command offers --kernel auto|triton|torch (structured is auto's CPU form)."""
    from fastattrec import config
    from fastattrec.cli import train as train_cmd
    from fastattrec.kernels import BACKENDS, PRECISIONS

    assert config.PRECISIONS == PRECISIONS and set(config.KERNELS) == set(BACKENDS)
    opt = next(p for p in train_cmd.params if p.name == "kernel")
    assert tuple(opt.type.choices) == ("auto", "triton", "torch")
    import click

    names = {p.name for p in train_cmd.params if isinstance(p, click.Option)}
    assert not names & {"precision", "graph_steps", "one_scatter", "data_dir"}


def test_compiled_cpu_step_resumes_bit_identically(data_dir, tmp_path):
    """--compile on CPU (the default): an interrupted run resumed ends with the same
    weights as the uninterrupted one, bit for bit."""
    cfg = dict(SMALL, compile=True, epochs=3)
    train(data_dir, tmp_path / "full", TrainConfig(**cfg), log=print)
    train(data_dir, tmp_path / "part", TrainConfig(**{**cfg, "epochs": 2}), log=print)
    assert cli("train", "--resume", tmp_path / "part", "--epochs", "3").exit_code == 0
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_saved_on_cuda_resumes_on_the_cpu(data_dir, tmp_path):
    """A checkpoint written on CUDA (Philox generator states of 16 bytes, a capturable
    optimiser) resumes on the CPU: a note says the random streams are re-seeded, and two
    resumes of it train to the same weights."""
    cfg = TrainConfig(**{**SMALL, "epochs": 2, "negatives": "resample", "dropout": 0.2})
    train(data_dir, tmp_path / "run", cfg, log=print)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(ck["rng"]) == {"shuffle", "negatives", "dropout"}
    for i, name in enumerate(ck["rng"]):  # what torch.cuda's generator saves: seed, offset
        ck["rng"][name] = torch.tensor([7 + i, 0, 0, 0, 0, 0, 0, 0, 4 * i, 0, 0, 0, 0, 0, 0, 0],
                                       dtype=torch.uint8)
    for g in ck["optimizer"]["param_groups"]:
        g["capturable"] = True  # (the CUDA-graph step's Adam)
    weights = []
    for copy in ("a", "b"):
        (tmp_path / copy).mkdir()
        for f in (tmp_path / "run").iterdir():
            (tmp_path / copy / f.name).write_bytes(f.read_bytes())
        torch.save(ck, tmp_path / copy / "checkpoint.pt")
        r = cli("train", "--resume", tmp_path / copy, "--epochs", "3", "--device", "cpu")
        assert r.exit_code == 0, r.output
        assert "saved on another kind of device" in r.output
        after = torch.load(tmp_path / copy / "checkpoint.pt", weights_only=True)
        assert after["epoch"] == 3
        weights.append(after["model"])
    for k in ck["model"]:
        assert torch.equal(weights[0][k], weights[1][k]), k
        assert bool(torch.isfinite(weights[0][k]).all()), k
    assert not torch.equal(weights[0]["item_emb"], ck["model"]["item_emb"])


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    import io

    import fastattrec.training.system as training

    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for line, want in (("0.50 0.40 0.30 1/80 123", 4), ("1.0 1.0 1.0 2/80 123", 3),
                       ("9.0 9.0 9.0 12/80 123", 1)):
        monkeypatch.setattr(training, "open", lambda *a, line=line, **k: io.StringIO(line),
                            raising=False)
        assert training.free_cores() == want
    monkeypatch.setattr(training, "open", lambda *a, **k: io.StringIO("0.5 0.4 0.3 1/80 1"),
                        raising=False)
    assert training.set_threads(0) == 4 and torch.get_num_threads() == 4
    assert training.set_threads(2) == 2 and torch.get_num_threads() == 2


def test_the_thread_count_used_is_saved_and_reused(data_dir, tmp_path):
    train(data_dir, tmp_path / "run", TrainConfig(epochs=1, threads=1, **SMALL), log=print)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["threads"] == 1
    train(data_dir, tmp_path / "auto", TrainConfig(epochs=1, **SMALL), log=print)
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["train"]["threads"] >= 1
    r = cli("train", "--resume", tmp_path / "run", "--threads", "2")
    assert r.exit_code != 0 and "only --epochs, --device and --time-budget" in r.output


def test_huge_option_values_are_not_echoed_whole(tmp_path):
    huge = "9" * 5000
    for args in (("train", tmp_path, "-o", tmp_path / "r", "--dim", huge),
                 ("synth", "-o", tmp_path / "s.dat", "--users", huge),
                 ("train", tmp_path, "-o", tmp_path / "r", "--device", huge)):
        r = cli(*args)
        assert r.exit_code != 0 and len(r.output.strip().splitlines()[-1]) < 300


def test_experimental_options_are_named_at_run_start(data_dir, tmp_path):
    """An experimental option that does not apply (graph steps on the CPU) still runs,
    and the run's first line names it."""
    lines = []
    train(data_dir, tmp_path / "run", TrainConfig(epochs=1, graph_steps=8, **SMALL),
          log=lines.append)
    assert any("experimental: graph_steps=8" in line for line in lines), lines


def test_graph_steps_must_be_a_positive_integer():
    from fastattrec.errors import UserError

    for bad in (0, -3, 5000, 2.5, True):
        with pytest.raises(UserError, match="--graph-steps must be"):
            TrainConfig(graph_steps=bad).check()


@pytest.mark.parametrize("world,rank", [(1, 0), (2, 0), (2, 1)])
def test_cpu_batches_are_the_device_step_batches(data_dir, world, rank):
    """The CPU step cuts batches with Python integers (`Samples.batch_at`), the device
    step with tensor arithmetic on its counter (`Samples.batch`): every step of an epoch
    with a padded last batch (97 does not divide the train samples), with one process
    and each shard of two, gives the same rows, mask and count; hand-checked: every
    sample once, in the permutation's order."""
    from fastattrec.batches import DeviceData
    from fastattrec.data.dataset import load_prepared
    from fastattrec.training.step import Samples

    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    smp = Samples(data, 5, 97, shard=(rank, world))
    assert smp.n_train % 97
    smp.shuffle(torch.Generator().manual_seed(5))
    seen = []
    for i in range(smp.n_steps):
        a, b = smp.batch_at(i), smp.batch(torch.tensor(i))
        assert torch.equal(a.idx, b.idx) and torch.equal(a.valid, b.valid)
        assert float(a.count) == float(b.count) == min(97, smp.n_train - 97 * i)
        seen += a.idx[a.valid.bool()].tolist()
    share = [smp.perm[j].item() for i in range(smp.n_steps)
             for j in range(97 * i, min(97 * i + 97, smp.n_train))
             if (j - 97 * i) // smp.local_bs == rank]
    assert seen == share


def test_curves_have_a_panel_per_kind_and_a_missing_matplotlib_is_said(data_dir, tmp_path,
                                                                     monkeypatch):
    """curves.png: three panels (losses, validation, test; 1500 x 400 pixels); without
    matplotlib the run says once how to get it."""
    import builtins
    import struct

    pytest.importorskip("matplotlib")
    train(data_dir, tmp_path / "plot", TrainConfig(epochs=2, **SMALL), log=print)
    head = (tmp_path / "plot" / "curves.png").read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (1500, 400)
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    lines = []
    train(data_dir, tmp_path / "bare", TrainConfig(epochs=1, **SMALL), log=lines.append)
    assert not (tmp_path / "bare" / "curves.png").exists()
    assert sum("needs matplotlib" in line for line in lines) == 1
