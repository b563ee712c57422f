"""The one-launch gather of a step's table rows against numpy lookups written out here.

The reference stacks the tables with numpy and indexes the stack: an independent
computation of "row index[i] of the flat row space". The copy is exact, so the kernel
(CUDA, or Triton's CPU interpreter set by conftest.py) and its torch form must match it
bit for bit, the sign of zero included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastattrec.kernels.experimental.embedding_gather import gather_rows_

from helpers import BOTH_FORMS as BACKENDS
from helpers import DEVICE


def tables_of(rows: list[int], d: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    ts = [rng.standard_normal((r, d)).astype(np.float32) for r in rows]
    for t in ts:  # signed zeros must survive the copy
        if t.size:
            t[0, 0] = -0.0
    return ts


def on_device(arrays: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(a).to(DEVICE) for a in arrays]


def same_bits(got: torch.Tensor, want: np.ndarray) -> bool:
    return np.array_equal(got.cpu().numpy().view(np.int32), want.view(np.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,d", [([7, 5, 5], 16), ([3, 9, 4], 100), ([6, 2], 3),
                                    ([11], 130)])
def test_one_step_equals_numpy_lookup(backend, rows, d):
    ts = tables_of(rows, d, seed=d)
    flat = np.concatenate(ts)  # the flat row space, written with numpy
    rng = np.random.default_rng(1)
    index = rng.integers(0, flat.shape[0], size=37)
    index[:len(rows)] = np.cumsum([0] + rows[:-1])  # the first row of every table
    index[-1] = flat.shape[0] - 1  # and the last row of the last one
    out = torch.full((37, d), 7.0, device=DEVICE)
    gather_rows_(out, on_device(ts), torch.from_numpy(index).to(DEVICE), backend=backend)
    assert same_bits(out, flat[index])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_each_step_reads_its_own_row_of_an_epoch_index(backend, index_dtype):
    ts = tables_of([4, 6, 6], 8, seed=3)
    flat = np.concatenate(ts)
    rng = np.random.default_rng(2)
    index = rng.integers(0, flat.shape[0], size=(5, 21))
    idx = torch.from_numpy(index).to(DEVICE, index_dtype)
    for t in (0, 3, 4):  # the step is a device tensor, read by the kernel
        out = torch.zeros((21, 8), device=DEVICE)
        gather_rows_(out, on_device(ts), idx, step=torch.tensor(t, device=DEVICE),
                     backend=backend)
        assert same_bits(out, flat[index[t]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_flags_mark_the_lookups_of_other_rows(backend):
    """flags[i] = index[i] != flag_row, from the same launch (a step's key mask: the
    window lookups that do not name the padding item's row)."""
    ts = tables_of([4, 6, 6], 5, seed=4)
    index = np.array([[0, 4, 4, 9, 4, 15, 3], [4, 4, 4, 4, 4, 4, 4]])
    idx = torch.from_numpy(index).to(DEVICE)
    for t in range(2):
        flags = torch.ones(7, dtype=torch.bool, device=DEVICE)
        out = torch.empty((7, 5), device=DEVICE)
        gather_rows_(out, on_device(ts), idx, step=torch.tensor(t, device=DEVICE),
                     backend=backend, flags=flags, flag_row=4)
        np.testing.assert_array_equal(flags.cpu().numpy(), index[t] != 4)
        assert same_bits(out, np.concatenate(ts)[index[t]])


def test_bad_arguments_are_refused_in_one_sentence():
    ts = [torch.zeros(4, 3), torch.zeros(5, 3)]
    idx = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="needs `step`"):
        gather_rows_(torch.empty(6, 3), ts, idx.view(2, 3)[:, :3].contiguous(),
                     backend="torch")
    with pytest.raises(ValueError, match="out must be"):
        gather_rows_(torch.empty(5, 3), ts, idx, backend="torch")
    with pytest.raises(ValueError, match="1 to 3 tables"):
        gather_rows_(torch.empty(6, 3), ts * 2, idx, backend="torch")
    with pytest.raises(ValueError, match="index must be"):
        gather_rows_(torch.empty(6, 3), ts, idx.float(), backend="torch")
    with pytest.raises(ValueError, match="tables must be"):
        gather_rows_(torch.empty(6, 3), [ts[0], torch.zeros(5, 4)], idx, backend="torch")
    with pytest.raises(ValueError, match="step"):
        gather_rows_(torch.empty(3, 3), ts, idx.view(2, 3), step=torch.tensor(0.5),
                     backend="torch")
    with pytest.raises(ValueError, match="flags must be"):
        gather_rows_(torch.empty(6, 3), ts, idx, backend="torch",
                     flags=torch.zeros(5, dtype=torch.bool))
