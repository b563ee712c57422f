"""Training on CUDA: the CUDA-graph step against the eager step, and the Triton kernel
against the torch reference inside the whole model. Skipped without a GPU."""

import pytest
import torch

from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.synth import synthesize
from fastattrec.train import TrainConfig, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    synthesize(root / "r.dat", 300, 800, 30000, seed=5)
    prepare(root / "r.dat", root / "data", PrepOptions(test_negatives=50))
    return root / "data"


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_graph_step_matches_eager_step(data_dir, tmp_path, mode):
    common = dict(device="cuda", epochs=2, eval_every=2, mode=mode, kernel="triton",
                  batch_size=256)
    a = train(data_dir, tmp_path / "graph", TrainConfig(compile=True, **common), log=print)
    b = train(data_dir, tmp_path / "eager", TrainConfig(compile=False, **common), log=print)
    wa, wb = weights(tmp_path / "graph"), weights(tmp_path / "eager")
    # Same maths in a different order (compiled loss): equal up to float rounding.
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5), k
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-3)


def test_triton_model_matches_reference_model(data_dir, tmp_path):
    common = dict(device="cuda", epochs=1, eval_every=1, compile=False, batch_size=256)
    a = train(data_dir, tmp_path / "t", TrainConfig(kernel="triton", **common), log=print)
    b = train(data_dir, tmp_path / "r", TrainConfig(kernel="torch", **common), log=print)
    assert a.backend == "triton" and b.backend == "torch"
    assert a.history[-1]["train_loss"] == pytest.approx(b.history[-1]["train_loss"], rel=1e-4)
    sa, sb = a.history[-1]["test"]["sampled"], b.history[-1]["test"]["sampled"]
    assert sa["HR@10"] == pytest.approx(sb["HR@10"], abs=0.02)
