"""The step's prologue (gather, key-mask flags and P W in one launch) against the two
kernels it combines and against numpy: the same bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from fastattrec.kernels.launch import interpreted  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreted():
    pytest.skip("the kernel runs on CUDA or in the interpreter", allow_module_level=True)

from fastattrec.kernels.experimental.embedding_gather import gather_rows_  # noqa: E402
from fastattrec.kernels.experimental.step_prologue import step_prologue_  # noqa: E402
from fastattrec.kernels.position_terms import position_projection_fused  # noqa: E402


@pytest.mark.parametrize("d,length", [(100, 5), (7, 3), (130, 2)])
def test_prologue_equals_its_parts(d, length):
    rng = np.random.default_rng(d)
    tables = [torch.from_numpy(rng.normal(size=(r, d)).astype(np.float32)).to(DEVICE)
              for r in (5, 9, 9)]
    index = torch.from_numpy(rng.integers(0, 23, size=(3, 50))).to(DEVICE)
    pos = torch.from_numpy(rng.normal(size=(length, d)).astype(np.float32)).to(DEVICE)
    w = torch.from_numpy(rng.normal(size=(d, d)).astype(np.float32)).to(DEVICE)
    step = torch.tensor(2, device=DEVICE)
    rows, flags = torch.empty((50, d), device=DEVICE), torch.empty(50, dtype=torch.bool,
                                                                   device=DEVICE)
    pw = step_prologue_(rows, tables, index, step, flags, 5, pos, w)
    want_rows, want_flags = torch.empty_like(rows), torch.empty_like(flags)
    gather_rows_(want_rows, tables, index, step=step, flags=want_flags, flag_row=5)
    assert torch.equal(rows, want_rows) and torch.equal(flags, want_flags)
    assert torch.equal(pw, position_projection_fused(pos, w))
    flat = torch.cat(tables).cpu().numpy()  # and against numpy directly
    np.testing.assert_array_equal(rows.cpu().numpy(), flat[index[2].cpu().numpy()])
    np.testing.assert_allclose(pw.cpu().numpy(), pos.double().cpu().numpy()
                               @ w.double().cpu().numpy(), rtol=1e-6, atol=1e-6)
