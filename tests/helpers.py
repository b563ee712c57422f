"""Small helpers shared by the tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fastattrec.cli import main

# A hand-written MovieLens-1M style log. User 1 has a timestamp tie (items 10 and 30 at
# t=100; file order puts 10 first), user 3 has one item only (dropped), user 4 has two
# (test sample only).
TINY_ML1M = """\
1::10::5::100
1::20::3::50
1::30::4::100
1::40::1::200
2::10::4::10
2::50::2::20
2::60::5::30
3::20::5::5
4::70::3::1
4::10::3::2
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cli(*args: str):
    """Run the fastattrec CLI in-process; returns click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


_KILLER = """
import importlib, os, sys
mod_name, attr = {at!r}.rsplit(":", 1)
mod = importlib.import_module(mod_name)
orig, calls = getattr(mod, attr), [0]
{setup}
def hook(*a, **k):
    if {match!r} not in repr(a):
        return orig(*a, **k)
    calls[0] += 1
    if calls[0] == {nth} and {before}:
        os._exit(137)
    out = orig(*a, **k)
    if calls[0] == {nth}:
        os._exit(137)
    return out
setattr(mod, attr, hook)
from fastattrec.cli import main
main({args!r}, prog_name="fastattrec")
"""


def killed_cli(*args: str, at: str, nth: int = 1, before: bool = False, match: str = "",
               setup: str = "") -> subprocess.CompletedProcess:
    """Run the CLI in a child process that dies like `kill -9` (os._exit: no cleanup, no
    finally blocks) at the `nth` call of `at` ("module:function") whose arguments mention
    `match`, just before or just after it runs. `setup` is extra code run first."""
    code = _KILLER.format(at=at, nth=nth, before=before, setup=setup, match=match,
                          args=[str(a) for a in args])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel tests run


def kernel_available() -> bool:
    """Triton kernels can run here: Triton installed, and CUDA or the interpreter."""
    try:
        import triton  # noqa: F401

        from fastattrec.kernels.launch import interpreted
    except ImportError:
        return False
    return DEVICE == "cuda" or interpreted()


# The two forms of a kernel offered as both (gather, scatter), for parametrize.
BOTH_FORMS = [pytest.param("triton", marks=pytest.mark.skipif(
    not kernel_available(), reason="the Triton kernel runs on CUDA or in the interpreter")),
    "torch"]


def synthetic_dataset(root: Path, users: int, items: int, interactions: int, seed: int,
                      clusters: int | None = None, test_negatives: int = 50) -> Path:
    """A synthetic log (`fastattrec synth`'s generator) prepared into root/"data"."""
    from fastattrec.data.prepare import PrepOptions, prepare
    from fastattrec.data.synth import synthesize

    synthesize(root / "r.dat", users, items, interactions, seed=seed, clusters=clusters)
    prepare(root / "r.dat", root / "data", PrepOptions(test_negatives=test_negatives))
    return root / "data"


def trained_on_histories(root: Path, history: dict, text_ids: bool = False,
                         **options) -> Path:
    """A tiny run trained on hand-written histories {user: [items, oldest first]} (one
    interaction a time step), on the CPU, uncompiled: root/"run". `text_ids`: a CSV, so ids
    stay text; else a MovieLens `::` log of integers."""
    from fastattrec.data.prepare import PrepOptions, prepare
    from fastattrec.training import TrainConfig, train

    rows = [(u, i, t) for u, h in history.items() for t, i in enumerate(h, start=1)]
    if text_ids:
        log = write(root / "r.csv", "user,item,time\n" + "".join(f"{u},{i},{t}\n"
                                                                 for u, i, t in rows))
    else:
        log = write(root / "r.dat", "".join(f"{u}::{i}::5::{t}\n" for u, i, t in rows))
    prepare(log, root / "data", PrepOptions(test_negatives=2))
    train(root / "data", root / "run", TrainConfig(**{"epochs": 2, "dim": 8, "batch_size": 4,
                                                     "device": "cpu", "compile": False,
                                                     **options}), log=lambda s: None)
    return root / "run"
