"""Two CPU processes (torchrun, gloo) train to the same weights as one process with the
same global batch (dropout included), within float tolerance; rank 0 alone writes the run
folder."""

import subprocess
import sys

import torch

from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.splits import SplitOptions
from fastattrec.data.synth import synthesize
from fastattrec.training import TrainConfig, train


def test_two_processes_match_one(tmp_path):
    synthesize(tmp_path / "r.dat", 80, 300, 5000, seed=4)
    prepare(tmp_path / "r.dat", tmp_path / "data", PrepOptions(test_negatives=20))
    # with dropout: each process masks its own rows of the global batch's mask
    opts = dict(epochs=2, dim=16, batch_size=200, eval_every=2, device="cpu",
                negatives="resample", dropout=0.3)
    single = train(tmp_path / "data", tmp_path / "one", TrainConfig(**opts), log=print)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "fastattrec", "train", str(tmp_path / "data"), "-o", str(tmp_path / "two"),
           "--epochs", "2", "--dim", "16", "--batch-size", "200", "--eval-every", "2",
           "--device", "cpu", "--negatives", "resample", "--dropout", "0.3", "--no-progress",
           "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 processes" in out.stderr
    a = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6), k
    ha, hb = single.history[-1], b["history"][-1]
    assert hb["train_loss"] == pytest_approx(ha["train_loss"])
    # Sharded evaluation gathers every user: the same metrics as one process.
    for proto in ("sampled", "full"):
        assert hb["test"][proto]["users"] == ha["test"][proto]["users"]
        assert abs(hb["test"][proto]["HR@10"] - ha["test"][proto]["HR@10"]) <= 1 / 80


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-4)


def test_sharded_evaluation_of_several_targets_gathers_every_user(tmp_path):
    """A time split (several test targets per user, docs/spec.md §4.9): each process ranks
    its share of the users; the gathered metrics are those of one process."""
    synthesize(tmp_path / "r.dat", 60, 200, 3000, seed=5)
    prepare(tmp_path / "r.dat", tmp_path / "data", PrepOptions(split=SplitOptions("time")))
    single = train(tmp_path / "data", tmp_path / "one", TrainConfig(
        epochs=1, dim=8, batch_size=100, device="cpu"), log=print)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "fastattrec", "train", str(tmp_path / "data"), "-o", str(tmp_path / "two"),
           "--epochs", "1", "--dim", "8", "--batch-size", "100", "--device", "cpu",
           "--no-progress", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    ha = single.history[-1]
    hb = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["history"][-1]
    assert set(hb["test"]) == {"full"}
    a, b = ha["test"]["full"], hb["test"]["full"]
    assert b["users"] == a["users"] > 0
    for name in ("HR@10", "Recall@10", "NDCG@10", "MRR"):
        assert abs(b[name] - a[name]) <= 1 / a["users"], name  # one user's rank at most


def test_a_time_budget_stops_every_process_after_the_same_epoch(tmp_path):
    """Under torchrun the budget's decision goes through a collective (each process times
    itself): both processes stop after epoch 1 and the run ends cleanly."""
    synthesize(tmp_path / "r.dat", 40, 120, 1500, seed=5)
    prepare(tmp_path / "r.dat", tmp_path / "data", PrepOptions(test_negatives=20))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "fastattrec", "train", str(tmp_path / "data"), "-o", str(tmp_path / "two"),
           "--epochs", "3", "--dim", "8", "--batch-size", "100", "--device", "cpu",
           "--time-budget", "1e-9", "--no-progress", "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "would end past --time-budget" in out.stderr + out.stdout
    assert torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["epoch"] == 1
