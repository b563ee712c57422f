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
from fastattrec.training import TrainConfig, replay_sizes, train

from helpers import cli

SMALL = dict(dim=16, batch_size=256, eval_every=2, device="cpu", compile=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    synthesize(root / "r.dat", 200, 600, 16000, seed=1, clusters=12)
    prepare(root / "r.dat", root / "data", PrepOptions(test_negatives=50))
    return root / "data"


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
    from fastattrec.data.readers import read_ratings

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
    assert r.exit_code != 0 and "only --epochs and --device" in r.output


def test_cli_precision_choices_match_the_kernels():
    from fastattrec.cli import train as train_cmd
    from fastattrec.kernels import PRECISIONS

    opt = next(p for p in train_cmd.params if p.name == "precision")
    assert tuple(opt.type.choices) == PRECISIONS


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


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    import io

    import fastattrec.training as training

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
    assert r.exit_code != 0 and "only --epochs and --device" in r.output


def test_huge_option_values_are_not_echoed_whole(tmp_path):
    huge = "9" * 5000
    for args in (("train", tmp_path, "-o", tmp_path / "r", "--dim", huge),
                 ("synth", "-o", tmp_path / "s.dat", "--users", huge),
                 ("train", tmp_path, "-o", tmp_path / "r", "--device", huge)):
        r = cli(*args)
        assert r.exit_code != 0 and len(r.output.strip().splitlines()[-1]) < 300


@pytest.mark.parametrize("n_steps,per_graph,want", [
    (10, 4, [4, 4, 2]),  # two graphs: 4 steps, and the 2 left
    (8, 4, [4, 4]),
    (3, 16, [3]),  # never more steps than the epoch has
    (95, 1, [1] * 95),
    (1, 1, [1]),
])
def test_replay_sizes_cover_the_epoch_in_order(n_steps, per_graph, want):
    """The CUDA graph replays of an epoch (hand-worked): every step once, at most two
    graph sizes."""
    assert replay_sizes(n_steps, per_graph) == want


def test_graph_steps_say_when_they_do_not_apply(data_dir, tmp_path):
    lines = []
    train(data_dir, tmp_path / "run", TrainConfig(epochs=1, graph_steps=8, **SMALL),
          log=lines.append)
    assert any("--graph-steps 8 ignored" in line for line in lines)


def test_one_scatter_run_says_which_step_it_takes(data_dir, tmp_path):
    """A whole `train` call with one_scatter on the CPU (the autograd form of the step,
    the kernels' torch forms) says so in its log and trains as the default step does."""
    lines = []
    opts = {**SMALL, "kernel": "torch", "epochs": 1}
    res = train(data_dir, tmp_path / "one", TrainConfig(one_scatter=True, **opts),
                log=lines.append)
    assert any("one-scatter step (autograd" in line for line in lines), lines
    ref = train(data_dir, tmp_path / "ref", TrainConfig(**opts), log=lambda s: None)
    assert res.history[-1]["train_loss"] == pytest.approx(ref.history[-1]["train_loss"],
                                                          rel=1e-5)


def test_graph_steps_must_be_a_positive_integer():
    from fastattrec.errors import UserError

    for bad in (0, -3, 5000, 2.5, True):
        with pytest.raises(UserError, match="--graph-steps"):
            TrainConfig(graph_steps=bad).check()


@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_cpu_epoch_takes_the_same_batches_as_the_device_step(data_dir, mode):
    """The CPU epoch loop cuts batches with Python integers (`_manual_step`); the device
    loop (`_step`) with tensor arithmetic. From one state, a whole epoch each, with a
    padded last batch (batch 97 does not divide the train samples): the same loss sum and
    the same weights, bit for bit."""
    from fastattrec.batches import DeviceData
    from fastattrec.data.dataset import load_prepared
    from fastattrec.training import EpochRunner, _build

    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    cfg = TrainConfig(device="cpu", kernel="structured", batch_size=97, compile=False,
                      mode=mode, dim=16)
    outs = []
    for loop in ("run", "_step"):
        model, _, opt, _ = _build(cfg, data, torch.device("cpu"), "structured", False)
        runner = EpochRunner(model, opt, data, cfg)
        assert runner.manual is not None and runner.n_train % 97
        runner.perm.copy_(torch.randperm(runner.n_train,
                                         generator=torch.Generator().manual_seed(5)))
        if loop == "run":
            total = runner.run()
        else:
            runner.step.zero_()
            runner.loss_sum.zero_()
            for _ in range(runner.n_steps):
                runner._step()
            total = runner.loss_sum
        assert int(runner.step) == runner.n_steps
        outs.append((float(total), [p.detach().clone() for p in model.parameters()]))
    (la, pa), (lb, pb) = outs
    assert la == lb
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))


def interpreted_runner(data_dir, kernel: str, small_kernels: str, capturable: bool,
                       **over):
    """(model, optimiser, runner) of a one-scatter step on the CPU, for the tests that
    run the GPU's kernels in Triton's interpreter: attention `kernel`, the small kernels'
    backend, and the eager or the capturable (the GPU's) Adam; skips without Triton or
    its interpreter."""
    pytest.importorskip("triton")
    from fastattrec.batches import DeviceData
    from fastattrec.data.dataset import load_prepared
    from fastattrec.kernels.launch import interpreted
    from fastattrec.optim import KerasAdam
    from fastattrec.training import EpochRunner, _build

    if not interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)")
    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    cfg = TrainConfig(device="cpu", kernel=kernel, batch_size=16, compile=False, dim=8,
                      one_scatter=True, **over)
    model, _, opt, _ = _build(cfg, data, torch.device("cpu"), kernel, False)
    if capturable:
        opt = KerasAdam(opt.param_groups, lr=cfg.lr, eps=1e-7, capturable=True)
    runner = EpochRunner(model, opt, data, cfg)
    runner.rows_backend = small_kernels
    assert runner.opt_zeroes_grads == capturable
    return model, opt, runner


@pytest.mark.parametrize("capturable", [False, True], ids=["eager-adam", "device-adam"])
def test_one_scatter_step_runs_the_triton_gather_and_scatter(data_dir, capturable):
    """The one-scatter step with its gather, scatter and bookkeeping as Triton kernels
    (in the CPU interpreter here, on the GPU in use) against the same steps with their
    torch forms: the kernels read their step's rows of the epoch's index and plan from
    the device counter, and must give the same bits. With the capturable Adam (the GPU's),
    whose kernel zeroes the gradients it read, the step skips its own zeroing: the
    weights then agree to Adam's rounding and the gradient buffer is left at zero."""
    outs = []
    for backend in ("triton", "torch"):
        model, opt, runner = interpreted_runner(data_dir, "torch", backend,
                                                capturable and backend == "triton")
        runner.perm.copy_(torch.randperm(runner.n_train,
                                         generator=torch.Generator().manual_seed(4)))
        runner.start_epoch()
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            runner._step()
        assert int(runner.step) == 3
        if runner.opt_zeroes_grads:
            assert not runner.flat_grad.any()
        outs.append((float(runner.loss_sum), [p.detach().clone() for p in model.parameters()]))
    (la, pa), (lb, pb) = outs
    if not capturable:
        assert la == lb
        assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    else:
        assert la == pytest.approx(lb, rel=1e-5)
        for x, y in zip(pa, pb, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode,capturable", [("inner", False), ("dist", False),
                                             ("inner", True), ("dist", True)])
def test_fused_step_equals_the_autograd_step(data_dir, mode, capturable):
    """The one-scatter step as a chain of Triton kernels without autograd (the GPU's
    path; here in the CPU interpreter) against the autograd step with the reference
    attention, from one state: each of two epochs (the second with a new order and new
    negatives) runs its first three steps and its padded last one. With the capturable
    Adam (the GPU's), its gradients are zeroed by its kernel and its step counters
    counted by the bookkeeping launch."""
    outs = []
    for kernel in ("triton", "torch"):
        model, opt, runner = interpreted_runner(data_dir, kernel, kernel,
                                                capturable and kernel == "triton", mode=mode)
        assert runner.fused() == (kernel == "triton")
        data = runner.data
        totals = []
        for epoch in range(2):
            runner.perm.copy_(torch.randperm(
                runner.n_train, generator=torch.Generator().manual_seed(4 + epoch)))
            if epoch:
                runner.set_negatives(data.sample_negatives(torch.Generator().manual_seed(8)))
            runner.step.zero_()
            runner.loss_sum.zero_()
            runner.start_epoch()
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                runner._step()
            assert int(runner.step) == 3
            runner.step.fill_(runner.n_steps - 1)  # and the padded last batch
            assert runner.n_train % runner.global_bs
            opt.zero_grad(set_to_none=True)
            runner._step()
            totals.append(float(runner.loss_sum))
        outs.append((totals, [p.detach().clone() for p in model.parameters()]))
        if runner.opt_zeroes_grads:  # counted by the bookkeeping launch, not by Adam
            assert [float(st["step"]) for st in opt.state.values()] == [8.0] * 4
            assert not runner.flat_grad.any()
            opt.step()  # the optimiser itself still counts its own steps
            assert [float(st["step"]) for st in opt.state.values()] == [9.0] * 4
    (la, pa), (lb, pb) = outs
    assert la == pytest.approx(lb, rel=1e-5)
    for x, y in zip(pa, pb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_fused_step_is_eight_launches_and_no_torch_arithmetic(data_dir):
    """The launch count of the GPU's fused step, counted on the CPU: every Triton launch
    of one step is recorded (through the interpreter), and every torch operation outside
    them; on a GPU the step is then exactly these eight kernels, since the only torch
    operations are allocations, views and profiler marks, which launch nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    _, opt, runner = interpreted_runner(data_dir, "triton", "triton", True)  # the GPU's
    import triton.runtime.interpreter as interp

    runner.start_epoch()
    for _ in range(2):  # optimiser state created, configurations chosen
        opt.zero_grad(set_to_none=True)
        runner._step()
    launches, ops, inside = [], [], [False]
    run = interp.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        inside[0] = True
        try:
            return run(self, *args, **kwargs)
        finally:
            inside[0] = False

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside[0]:  # the interpreter's own tensor copies are not the step's
                ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    opt.zero_grad(set_to_none=True)
    interp.InterpretedFunction.run = counted
    try:
        with Record():
            runner._step()
    finally:
        interp.InterpretedFunction.run = run
    assert launches == ["_step_prologue", "_tile_fwd", "_pair_loss", "_tile_bwd",
                        "_reduce_weight_grad", "_scatter_rows", "_keras_adam",
                        "_step_tail_parts"]
    silent = {"empty", "empty_like", "view", "detach", "slice", "alias",
              "_record_function_enter_new", "_record_function_exit"}
    assert set(ops) <= silent, sorted(set(ops) - silent)


@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_one_scatter_step_equals_the_autograd_step(data_dir, mode):
    """The step whose table rows come from one gather and whose table gradients come
    from one deterministic scatter (the epoch's batches cut and planned at its start)
    against the plain autograd step, from one state, over two epochs with padded last
    batches and, in the second, a new order and new negatives (here on CPU, with the
    kernels' torch forms; the Triton kernels are checked against them below and against
    independent references in tests/test_embedding_gather.py and
    tests/test_embedding_scatter.py)."""
    from fastattrec.batches import DeviceData
    from fastattrec.data.dataset import load_prepared
    from fastattrec.training import EpochRunner, _build

    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    outs = []
    for one in (True, False):
        cfg = TrainConfig(device="cpu", kernel="torch", batch_size=97, compile=False,
                          mode=mode, dim=16, one_scatter=one)
        model, _, opt, _ = _build(cfg, data, torch.device("cpu"), "torch", False)
        runner = EpochRunner(model, opt, data, cfg)
        assert runner.manual is None and (runner.batches is not None) == one
        totals = []
        for epoch in range(2):  # the second epoch: a new order and new negatives
            runner.perm.copy_(torch.randperm(runner.n_train,
                                             generator=torch.Generator().manual_seed(3 + epoch)))
            if epoch:
                runner.set_negatives(data.sample_negatives(torch.Generator().manual_seed(9)))
            totals.append(float(runner.run()))
        if one:  # the tables' gradients are views of the one buffer
            assert model.item_emb.grad.data_ptr() == runner.grad_views[1].data_ptr()
        outs.append((totals, [p.detach().clone() for p in model.parameters()]))
    (la, pa), (lb, pb) = outs
    assert la == pytest.approx(lb, rel=1e-5)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
