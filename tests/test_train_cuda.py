"""Training on CUDA: the CUDA-graph step against the eager step, and the Triton kernel
against the torch reference inside the whole model. Skipped without a GPU."""

import copy

import pytest
import torch

from fastattrec.batches import DeviceData
from fastattrec.data.dataset import load_prepared
from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.synth import synthesize
from fastattrec.model import AttRec, AttRecConfig
from fastattrec.training import EpochRunner, TrainConfig, make_optimizer, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    synthesize(root / "r.dat", 300, 800, 30000, seed=5)
    prepare(root / "r.dat", root / "data", PrepOptions(test_negatives=50))
    return root / "data"


def same_start(data_dir, cfg: TrainConfig):
    """A model (seed 0, compiled loss), its capturable optimiser and an epoch runner with
    a fixed permutation: the same starting state on every call."""
    data = DeviceData.from_prepared(load_prepared(data_dir), "cuda")
    mcfg = AttRecConfig(n_users=data.n_users, n_items=data.n_items, mode=cfg.mode,
                        kernel="triton")
    model = AttRec(mcfg, generator=torch.Generator().manual_seed(0)).cuda()
    model.compile_loss()
    opt = make_optimizer(model, cfg, torch.device("cuda"), capturable=True)
    runner = EpochRunner(model, opt, data, cfg)
    runner.perm.copy_(torch.randperm(runner.n_train, device="cuda",
                                     generator=torch.Generator("cuda").manual_seed(1)))
    return model, opt, runner


@pytest.mark.parametrize("mode,graph_steps", [("inner", 1), ("dist", 1), ("inner", 3)])
def test_graph_replay_equals_eager_steps(data_dir, mode, graph_steps):
    """From the same state, three steps as replays of the captured graph (three of one
    step, or one of three) and three eager steps give the same weights (same kernels,
    same order: only launch mechanics differ)."""
    cfg = TrainConfig(device="cuda", mode=mode, kernel="triton", batch_size=256,
                      graph_steps=graph_steps)
    runs = []
    for graphed in (True, False):
        model, opt, runner = same_start(data_dir, cfg)
        if graphed:
            runner.capture()  # its warm-up steps are undone, but they advanced the counters
        runner.step.zero_()
        runner.loss_sum.zero_()
        for _ in range(3 // graph_steps if graphed else 3):
            if graphed:
                runner.graphs[graph_steps].replay()
            else:
                opt.zero_grad(set_to_none=True)
                runner._step()
        torch.cuda.synchronize()
        runs.append((copy.deepcopy(model.state_dict()), float(runner.loss_sum)))
    (wa, la), (wb, lb) = runs
    assert la == pytest.approx(lb, rel=1e-5)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("graph_steps,one_scatter", [(1, False), (7, False), (7, True)])
def test_whole_runs_agree(data_dir, tmp_path, graph_steps, one_scatter):
    """Graph + compiled loss vs eager over two epochs: Adam amplifies rounding where
    gradients are tiny, so whole runs agree in loss and metrics, not bit for bit. With 7
    steps a graph, the epoch ends with a replay of the remaining steps; with one_scatter
    the graphed step is the fused kernel chain."""
    common = dict(device="cuda", epochs=2, eval_every=2, kernel="triton", batch_size=256)
    a = train(data_dir, tmp_path / "graph",
              TrainConfig(compile=True, graph_steps=graph_steps, one_scatter=one_scatter,
                          **common), log=print)
    b = train(data_dir, tmp_path / "eager", TrainConfig(compile=False, **common), log=print)
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-2)
    sa, sb = a.history[-1]["test"]["sampled"], b.history[-1]["test"]["sampled"]
    assert sa["HR@10"] == pytest.approx(sb["HR@10"], abs=0.03)


def test_triton_model_matches_reference_model(data_dir, tmp_path):
    common = dict(device="cuda", epochs=1, eval_every=1, compile=False, batch_size=256)
    a = train(data_dir, tmp_path / "t", TrainConfig(kernel="triton", **common), log=print)
    b = train(data_dir, tmp_path / "r", TrainConfig(kernel="torch", **common), log=print)
    assert a.backend == "triton" and b.backend == "torch"
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-4)
    sa, sb = a.history[-1]["test"]["sampled"], b.history[-1]["test"]["sampled"]
    assert sa["HR@10"] == pytest.approx(sb["HR@10"], abs=0.02)


def test_an_epoch_of_multi_step_replays_equals_eager_steps(data_dir):
    """One epoch as replays of 7 steps and of the remainder equals the same epoch run
    step by step eagerly from the same state: the same loss sum, weights to float
    rounding, and every step taken once."""
    cfg = TrainConfig(device="cuda", kernel="triton", batch_size=256, graph_steps=7)
    runs = []
    for graphed in (True, False):
        model, opt, runner = same_start(data_dir, cfg)
        assert runner.n_steps % 7, "the epoch should end with a shorter replay"
        if graphed:
            runner.capture()
            assert sorted(runner.graphs) == sorted({7, runner.n_steps % 7})
            total = runner.run()
        else:
            runner.step.zero_()
            runner.loss_sum.zero_()
            for _ in range(runner.n_steps):
                opt.zero_grad(set_to_none=True)
                runner._step()
            total = runner.loss_sum
        torch.cuda.synchronize()
        assert int(runner.step) == runner.n_steps
        runs.append((copy.deepcopy(model.state_dict()), float(total)))
    (wa, la), (wb, lb) = runs
    assert la == pytest.approx(lb, rel=1e-4)
    for k in wa:  # one Adam step moves a weight by about lr = 1e-3: far beyond these
        assert torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5), k


@pytest.mark.parametrize("graph_steps,mode,batch", [(1, "inner", 256), (7, "inner", 256),
                                                    (1, "dist", 256), (1, "inner", 32768)])
def test_one_scatter_graph_epoch_equals_the_default_step(data_dir, graph_steps, mode, batch):
    """An epoch of CUDA-graph replays (1 or 7 steps each, plus the remainder) of the
    one-scatter step (TrainConfig.one_scatter: the epoch's batches planned at its start,
    the step a chain of Triton kernels without autograd: gather, attention, pairwise loss,
    attention backward, scatter, Adam, bookkeeping) against the default one-step graph,
    from the same state, over two epochs (the second with a new order). Both modes; and
    an epoch of a single step (batch 32,768: the graph's warm-up must not step past it)."""
    runs = []
    for one in (True, False):
        cfg = TrainConfig(device="cuda", kernel="triton", batch_size=batch, one_scatter=one,
                          graph_steps=graph_steps if one else 1, mode=mode)
        model, _, runner = same_start(data_dir, cfg)
        assert (runner.batches is not None) == one
        if batch > 256:  # the case meant to have a single step has one
            assert runner.n_steps == 1
        assert runner.fused() == one  # on the GPU the one-scatter step is the kernel chain
        runner.capture()
        totals = [float(runner.run())]
        runner.perm.copy_(torch.randperm(runner.n_train, device="cuda",
                                         generator=torch.Generator("cuda").manual_seed(2)))
        totals.append(float(runner.run()))
        torch.cuda.synchronize()
        runs.append((copy.deepcopy(model.state_dict()), totals))
    (wa, la), (wb, lb) = runs
    assert la == pytest.approx(lb, rel=1e-4)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5), k
