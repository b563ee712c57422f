"""Ctrl-C or SIGTERM during `train` or `prep`: one line saying what was kept and the
command that goes on, instead of click's bare "Aborted!" (issue 20, D12). The signal is
real: the child process sends it to itself when a chosen function is reached."""

import json
import subprocess
import sys

import pytest
import torch

from fastattrec.data.prepare import PrepOptions, prepare

from helpers import TINY_ML1M, synthetic_dataset, write

ARGS = ("--dim", "8", "--batch-size", "128", "--eval-every", "2", "--device", "cpu",
        "--no-compile")

_SIGNALLER = """
import importlib, os, signal, sys
mod_name, attr = {at!r}.rsplit(":", 1)
mod = importlib.import_module(mod_name)
orig, calls = getattr(mod, attr), [0]
def hook(*a, **k):
    calls[0] += 1
    out = orig(*a, **k)
    if calls[0] == {nth}:
        os.kill(os.getpid(), signal.{signal})
    return out
setattr(mod, attr, hook)
from fastattrec.cli import main
main({args!r}, prog_name="fastattrec")
"""


def signalled_cli(*args, at: str, nth: int, signal: str) -> subprocess.CompletedProcess:
    """The CLI in a child process that sends itself `signal` right after the `nth` call of
    `at` ("module:function") returns; the signal lands in the main thread's Python code,
    as a Ctrl-C or `kill` would."""
    code = _SIGNALLER.format(at=at, nth=nth, signal=signal, args=[str(a) for a in args])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_dataset(tmp_path_factory.mktemp("interrupts"), 60, 200, 3000, seed=3,
                             clusters=6, test_negatives=20)


def last_line(r):
    assert "Traceback" not in r.stderr and "Aborted" not in r.stderr, r.stderr
    return r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("signal,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_an_interrupted_run_says_which_epoch_it_kept(data_dir, tmp_path, signal, code):
    run = tmp_path / "run"
    # write_logs: call 1 at the start, call k+1 right after epoch k's checkpoint (in the
    # writer thread); the signal then reaches the main thread during epoch 2.
    r = signalled_cli("train", data_dir, "-o", run, "--epochs", "4", *ARGS,
                      at="fastattrec.training.checkpoint:write_logs", nth=2, signal=signal)
    assert r.returncode == code, r.stderr
    kept = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]
    assert kept >= 1
    assert last_line(r) == (f"interrupted: {run / 'checkpoint.pt'} keeps epoch {kept} of 4, "
                            f"the last one completed; continue with `fastattrec train "
                            f"--resume {run}`.")
    from helpers import cli

    assert cli("train", "--resume", run).exit_code == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 4


def test_interrupted_before_the_first_epoch_was_saved(data_dir, tmp_path):
    run = tmp_path / "run"
    r = signalled_cli("train", data_dir, "-o", run, "--epochs", "2", *ARGS,
                      at="fastattrec.training.checkpoint:write_config", nth=1, signal="SIGINT")
    assert r.returncode == 130, r.stderr
    assert not (run / "checkpoint.pt").exists()
    assert last_line(r) == (f"interrupted before the first epoch was saved: {run} keeps only "
                            f"the run's options (config.json); start it over with "
                            f"`fastattrec train --resume {run}`.")


def test_interrupted_before_the_old_run_was_replaced(data_dir, tmp_path):
    run = tmp_path / "run"
    from helpers import cli

    assert cli("train", data_dir, "-o", run, "--epochs", "1", *ARGS).exit_code == 0
    before = (run / "checkpoint.pt").read_bytes()
    r = signalled_cli("train", data_dir, "-o", run, "--force", "--epochs", "1", *ARGS,
                      at="fastattrec.training.loop:load_prepared", nth=1, signal="SIGTERM")
    assert r.returncode == 143, r.stderr
    assert last_line(r) == (f"interrupted before training started: the run already there is "
                            f"untouched ({run}); run the same command again.")
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("existing", [False, True])
def test_an_interrupted_prep_leaves_the_old_output_alone(tmp_path, existing):
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    out = tmp_path / "out"
    if existing:
        prepare(src, out, PrepOptions(test_negatives=2))
        meta = (out / "meta.json").read_bytes()
    # Interrupted after the new dataset's sequences were written to the temporary folder.
    r = signalled_cli("prep", src, "-o", out, "--test-negatives", "3", "--force",
                      at="fastattrec.data.prepare:write_parquet", nth=1, signal="SIGINT")
    assert r.returncode == 130, r.stderr
    if existing:
        assert last_line(r) == (f"interrupted: the dataset already in {out} is untouched (the "
                                f"unfinished copy was removed); run the same command again.")
        assert (out / "meta.json").read_bytes() == meta
        assert json.loads(meta)["params"]["test_negatives_per_user"] == 2
    else:
        assert last_line(r) == (f"interrupted: nothing was written to {out} (the unfinished "
                                f"copy was removed); run the same command again.")
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] in (
        [], [".out.lock"])
