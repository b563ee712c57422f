"""Training on CUDA: the CUDA-graph step against the eager step, the experimental
multi-step graphs and one-scatter chain against the default step, the Triton kernel
against the torch reference inside the whole model, and `--kernel auto`'s timing.
Skipped without a GPU."""

import copy
import json

import pytest
import torch

from fastattrec.batches import DeviceData
from fastattrec.data.dataset import load_prepared
from fastattrec.training import TrainConfig, build, train
from fastattrec.training.step import CudaGraphStep, run_epoch

from helpers import synthetic_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return synthetic_dataset(root, 300, 800, 30000, seed=5, test_negatives=50)


def same_start(data_dir, cfg: TrainConfig, kernel: str = "triton"):
    """The run's model, optimiser and step (graph steps captured) from seed 0, with a
    fixed permutation: the same starting state on every call."""
    data = DeviceData.from_prepared(load_prepared(data_dir), "cuda")
    b = build(cfg, data, CUDA, kernel)
    b.step.samples.shuffle(torch.Generator("cuda").manual_seed(1))
    return b


@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_graph_replay_equals_eager_steps(data_dir, mode):
    """From the same state, three replays of the captured graph and three eager steps
    give the same weights (same kernels, same order: only launch mechanics differ)."""
    runs = []
    for graphed in (True, False):
        cfg = TrainConfig(device="cuda", mode=mode, kernel="triton", batch_size=256,
                          compile=graphed)
        b = same_start(data_dir, cfg)
        assert isinstance(b.step, CudaGraphStep) == graphed
        b.step.start_epoch()
        for i in range(3):
            b.step(i)
        torch.cuda.synchronize()
        runs.append((copy.deepcopy(b.model.state_dict()), float(b.step.loss_sum)))
    (wa, la), (wb, lb) = runs
    assert la == pytest.approx(lb, rel=1e-5)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("graph_steps,one_scatter", [(1, False), (7, False), (7, True)])
def test_whole_runs_agree(data_dir, tmp_path, graph_steps, one_scatter):
    """Graph + compiled loss vs eager over two epochs: Adam amplifies rounding where
    gradients are tiny, so whole runs agree in loss and metrics, not bit for bit. With 7
    steps a graph (experimental), the epoch ends with a replay of the remaining steps;
    with one_scatter the graphed step is the fused kernel chain."""
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


def test_auto_kernel_is_timed_and_recorded(data_dir, tmp_path):
    """--kernel auto on CUDA times both kernels inside the graph step and records them;
    the run then is the run of the chosen kernel, and a resume keeps the choice."""
    res = train(data_dir, tmp_path / "auto", TrainConfig(device="cuda", epochs=1,
                                                         batch_size=256), log=print)
    saved = json.loads((tmp_path / "auto" / "config.json").read_text())
    choice = saved["kernel_choice"]
    assert set(choice["seconds_per_step"]) == {"triton", "torch"}
    assert choice["chosen"] == min(choice["seconds_per_step"],
                                   key=choice["seconds_per_step"].get) == res.backend
    forced = train(data_dir, tmp_path / "forced", TrainConfig(
        device="cuda", epochs=1, batch_size=256, kernel=res.backend), log=print)
    assert forced.history[-1]["train_loss"] == res.history[-1]["train_loss"]


def test_an_epoch_of_multi_step_replays_equals_eager_steps(data_dir):
    """One epoch as replays of 7 steps and of the remainder (experimental) equals the
    same epoch run step by step eagerly from the same state: the same loss sum, weights
    to float rounding, and every step taken once."""
    runs = []
    for graphed in (True, False):
        cfg = TrainConfig(device="cuda", kernel="triton", batch_size=256, graph_steps=7,
                          compile=graphed)
        b = same_start(data_dir, cfg)
        n = b.step.samples.n_steps
        assert n % 7, "the epoch should end with a shorter replay"
        if graphed:
            assert sorted(b.step.graphs) == sorted({7, n % 7})
        total = run_epoch(b.step)
        torch.cuda.synchronize()
        inner = b.step.inner if graphed else b.step
        assert int(inner.counter) == n
        runs.append((copy.deepcopy(b.model.state_dict()), float(total)))
    (wa, la), (wb, lb) = runs
    assert la == pytest.approx(lb, rel=1e-4)
    for k in wa:  # one Adam step moves a weight by about lr = 1e-3: far beyond these
        assert torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5), k


@pytest.mark.parametrize("graph_steps,mode,batch", [(1, "inner", 256), (7, "inner", 256),
                                                    (1, "dist", 256), (1, "inner", 32768)])
def test_one_scatter_graph_epoch_equals_the_default_step(data_dir, graph_steps, mode, batch):
    """An epoch of CUDA-graph replays (1 or 7 steps each, plus the remainder) of the
    experimental one-scatter step (the epoch's batches planned at its start, the step a
    chain of Triton kernels without autograd) against the default one-step graph, from
    the same state, over two epochs (the second with a new order). Both modes; and an
    epoch of a single step (batch 32,768: the graph's warm-up must not step past it)."""
    from fastattrec.experimental.steps import FusedStep

    runs = []
    for one in (True, False):
        cfg = TrainConfig(device="cuda", kernel="triton", batch_size=batch, one_scatter=one,
                          graph_steps=graph_steps if one else 1, mode=mode)
        b = same_start(data_dir, cfg)
        assert isinstance(b.step.inner, FusedStep) == one
        if batch > 256:  # the case meant to have a single step has one
            assert b.step.samples.n_steps == 1
        totals = [float(run_epoch(b.step))]
        b.step.samples.shuffle(torch.Generator("cuda").manual_seed(2))
        totals.append(float(run_epoch(b.step)))
        torch.cuda.synchronize()
        runs.append((copy.deepcopy(b.model.state_dict()), totals))
    (wa, la), (wb, lb) = runs
    assert la == pytest.approx(lb, rel=1e-4)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5), k


def test_dropout_masks_on_cuda_equal_the_cpu_ones():
    """The hashed dropout mask (docs/spec.md §2.5) of the same seeds is the same on CUDA,
    eagerly and compiled (as `compile_loss` runs it), as on the CPU."""
    from fastattrec.model import dropout_scale

    seeds = torch.tensor([2**32 - 3, 123456789])
    want = dropout_scale(seeds, (256, 5, 100), 0.2, torch.float32)
    eager = dropout_scale(seeds.to(CUDA), (256, 5, 100), 0.2, torch.float32)
    compiled = torch.compile(dropout_scale, dynamic=False, fullgraph=True)(
        seeds.to(CUDA), (256, 5, 100), 0.2, torch.float32)
    assert torch.equal(eager.cpu(), want) and torch.equal(compiled.cpu(), want)


def test_a_resumed_graph_run_goes_on_from_its_checkpoint(data_dir, tmp_path):
    """The CUDA-graph step is captured before the checkpoint is loaded, so the loaded Adam
    state must land in the tensors the graph holds: an interrupted run resumed ends
    where the uninterrupted one does (to the rounding of CUDA's atomic adds)."""
    from helpers import cli

    cfg = dict(device="cuda", epochs=2, eval_every=2, kernel="triton", batch_size=256,
               compile=True)
    full = train(data_dir, tmp_path / "full", TrainConfig(**cfg), log=print)
    train(data_dir, tmp_path / "part", TrainConfig(**{**cfg, "epochs": 1}), log=print)
    r = cli("train", "--resume", tmp_path / "part", "--epochs", "2")
    assert r.exit_code == 0, r.output
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert b["history"][-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"],
                                                           rel=1e-3)
    for k in a["model"]:  # a restarted Adam would move every trained entry by ~lr
        assert float((a["model"][k] - b["model"][k]).abs().median()) <= 1e-5, k


def test_a_cpu_run_resumes_on_cuda(data_dir, tmp_path):
    """A checkpoint of a CPU run resumes with the CUDA-graph step: its generators are
    re-seeded from their saved states (said in a note) and the run trains on."""
    from helpers import cli

    cfg = dict(epochs=1, eval_every=1, batch_size=256, negatives="resample")
    train(data_dir, tmp_path / "run", TrainConfig(device="cpu", **cfg), log=print)
    r = cli("train", "--resume", tmp_path / "run", "--epochs", "2", "--device", "cuda")
    assert r.exit_code == 0, r.output
    assert "saved on another kind of device" in r.output
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert after["epoch"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in after["model"].values())
