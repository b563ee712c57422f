"""The experimental training steps (fastattrec.experimental) against the default step
they must equal: the one-scatter step, its fused eight-launch form (in Triton's CPU
interpreter), multi-step CUDA graphs' replay plan, and the Triton Adam's use by them."""

import pytest
import torch

from fastattrec.experimental.adam import TritonKerasAdam
from fastattrec.experimental.steps import FusedStep, OneScatterStep, replay_sizes
from fastattrec.training import TrainConfig, build, train
from fastattrec.training.step import run_epoch

from helpers import synthetic_dataset

SMALL = dict(dim=16, batch_size=256, eval_every=2, device="cpu", compile=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("experimental")
    return synthetic_dataset(root, 200, 600, 16000, seed=1, clusters=12, test_negatives=50)


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


def interpreted_runner(data_dir, kernel: str, small_kernels: str, capturable: bool,
                       **over):
    """(model, optimiser, step) of a one-scatter step on the CPU, for the tests that
    run the GPU's kernels in Triton's interpreter: attention `kernel`, the small kernels'
    backend, and the eager or the capturable (the GPU's) Adam; skips without Triton or
    its interpreter."""
    pytest.importorskip("triton")
    from fastattrec.batches import DeviceData
    from fastattrec.data.dataset import load_prepared
    from fastattrec.kernels.launch import interpreted

    if not interpreted():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest.py without a GPU)")
    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    cfg = TrainConfig(device="cpu", kernel=kernel, batch_size=16, compile=False, dim=8,
                      one_scatter=True, **over)
    b = build(cfg, data, torch.device("cpu"), kernel)
    opt = b.opt
    if capturable:
        opt = TritonKerasAdam(opt.param_groups, lr=cfg.lr, eps=1e-7, capturable=True,
                              zero_grads_after=True)
    fused = kernel == "triton" and small_kernels == "triton"
    step = (FusedStep if fused else OneScatterStep)(b.model, opt, b.step.samples)
    step.rows_backend = small_kernels
    assert step.opt_zeroes_grads == capturable
    return b.model, opt, step


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
        runner.samples.perm.copy_(torch.randperm(runner.samples.n_train,
                                         generator=torch.Generator().manual_seed(4)))
        runner.start_epoch()
        for i in range(3):
            runner(i)
        assert int(runner.counter) == 3
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
        assert isinstance(runner, FusedStep) == (kernel == "triton")
        data = runner.samples.data
        totals = []
        for epoch in range(2):
            runner.samples.perm.copy_(torch.randperm(
                runner.samples.n_train, generator=torch.Generator().manual_seed(4 + epoch)))
            if epoch:
                runner.samples.set_negatives(data.sample_negatives(torch.Generator().manual_seed(8)))
            runner.start_epoch()
            for i in range(3):
                runner(i)
            assert int(runner.counter) == 3
            runner.counter.fill_(runner.samples.n_steps - 1)  # and the padded last batch
            assert runner.samples.n_train % runner.samples.global_bs
            runner(runner.samples.n_steps - 1)
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
    for i in range(2):  # optimiser state created, configurations chosen
        runner(i)
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
            runner(2)
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

    data = DeviceData.from_prepared(load_prepared(data_dir), "cpu")
    outs = []
    for one in (True, False):
        cfg = TrainConfig(device="cpu", kernel="torch", batch_size=97, compile=False,
                          mode=mode, dim=16, one_scatter=one)
        b = build(cfg, data, torch.device("cpu"), "torch")
        model, runner = b.model, b.step
        assert isinstance(runner, OneScatterStep) == one
        totals = []
        for epoch in range(2):  # the second epoch: a new order and new negatives
            runner.samples.shuffle(torch.Generator().manual_seed(3 + epoch))
            if epoch:
                runner.samples.set_negatives(
                    data.sample_negatives(torch.Generator().manual_seed(9)))
            totals.append(float(run_epoch(runner)))
        if one:  # the tables' gradients are views of the one buffer
            assert model.item_emb.grad.data_ptr() == runner.grad_views[1].data_ptr()
        outs.append((totals, [p.detach().clone() for p in model.parameters()]))
    (la, pa), (lb, pb) = outs
    assert la == pytest.approx(lb, rel=1e-5)
    for a, b in zip(pa, pb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
