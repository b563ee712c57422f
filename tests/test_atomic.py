"""`fastattrec.atomic.atomic_path`: writes go to a temporary `.NAME.tmp-XXXXXXXX` beside the
target and reach the target only by a rename on success, so a failure, or a kill in the
middle of a checkpoint write, leaves the old file whole (README "Usage", docs/formats.md
§2: checkpoint.pt is the commit point)."""

import json
import re
import subprocess
import sys

import pytest
import torch

from fastattrec.atomic import atomic_path, atomic_write_bytes

from helpers import cli, synthetic_dataset

OLD = b"old bytes\x00\x01 of the committed file\n"


def beside(p):
    """Everything in p's folder other than p."""
    return sorted(x.name for x in p.parent.iterdir() if x != p)


def test_failure_inside_the_block_keeps_the_old_file(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(OLD)
    with pytest.raises(RuntimeError, match="boom"), atomic_path(p) as t:
        t.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert p.read_bytes() == OLD
    assert beside(p) == []  # the temporary is gone too


def test_interrupt_before_any_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(OLD)
    with pytest.raises(KeyboardInterrupt), atomic_path(p):
        raise KeyboardInterrupt
    assert p.read_bytes() == OLD
    assert beside(p) == []


def test_the_yielded_path_is_a_temporary_beside_the_target(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(OLD)
    with atomic_path(p) as t:
        assert t != p and t.resolve() != p.resolve()
        assert t.parent == p.parent
        # The exact name docs/formats.md §3 gives: the clean-up after a kill removes only
        # names of this form.
        assert re.fullmatch(r"\.out\.bin\.tmp-[a-z0-9_]{8}", t.name), t.name
        t.write_bytes(b"new")
        assert p.read_bytes() == OLD  # nothing reaches the target before the rename
        assert beside(p) == [t.name]
    assert p.read_bytes() == b"new"
    assert beside(p) == []


def test_success_replaces_the_file_and_creates_a_missing_one(tmp_path):
    p = tmp_path / "out.bin"
    p.write_bytes(OLD)
    with atomic_path(p) as t:
        t.write_bytes(b"new contents")
    assert p.read_bytes() == b"new contents"
    q = tmp_path / "sub" / "fresh.bin"
    atomic_write_bytes(q, b"fresh")
    assert q.read_bytes() == b"fresh"
    assert beside(p) == ["sub"] and beside(q) == []


# ---- a training run killed in the middle of writing a checkpoint ----------------------

ARGS = ["--dim", "8", "--batch-size", "128", "--eval-every", "2", "--device", "cpu",
        "--no-compile", "--no-progress"]

# In the child: the 2nd torch.save of checkpoint.pt (epoch 2's, from CheckpointWriter's
# thread) opens the path it is given, writes the first half of the real bytes and the
# process dies like `kill -9` (os._exit: no cleanup, no finally blocks).
_KILL_MID_WRITE = """
import io, os, torch
orig, calls = torch.save, [0]
def save(obj, f, *a, **k):
    if "checkpoint.pt" not in str(f):
        return orig(obj, f, *a, **k)
    calls[0] += 1
    if calls[0] < 2:
        return orig(obj, f, *a, **k)
    buf = io.BytesIO()
    orig(obj, buf)
    data = buf.getvalue()
    with open(f, "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
    print("HALF", len(data) // 2, flush=True)
    os._exit(137)
torch.save = save
from fastattrec.cli import main
main({args!r}, prog_name="fastattrec")
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    return synthetic_dataset(root, 60, 200, 3000, seed=3, clusters=6, test_negatives=20)


def test_kill_in_the_middle_of_a_checkpoint_write_then_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", str(data_dir), "-o", str(run), "--epochs", "3", *ARGS]
    r = subprocess.run([sys.executable, "-c", _KILL_MID_WRITE.format(args=args)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 137, r.stdout + r.stderr
    half = int(r.stdout.split("HALF")[1].split()[0])
    # checkpoint.pt is still epoch 1's, complete; the partial bytes went to a temporary,
    # which the kill left behind.
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1
    assert [h["epoch"] for h in ckpt["history"]] == [1]
    tmps = list(run.glob(".checkpoint.pt.tmp-*"))
    assert len(tmps) == 1 and tmps[0].stat().st_size == half
    # Resume continues after epoch 1 and finishes; the temporary is cleaned up.
    r = cli("train", "--resume", run)
    assert r.exit_code == 0, r.output
    assert "after epoch 1 of 3" in r.output
    assert not list(run.glob(".*.tmp-*"))
    done = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert done["epoch"] == 3
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]
    # ... to the weights of a run never interrupted.
    r = cli("train", data_dir, "-o", tmp_path / "whole", "--epochs", "3", *ARGS)
    assert r.exit_code == 0, r.output
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", map_location="cpu",
                       weights_only=True)
    for k, v in whole["model"].items():
        assert torch.equal(v, done["model"][k]), k
