"""The one-launch embedding-gradient scatter against numpy references written out here.

Two references, both independent of the code under test: float64 `np.add.at` (the sum,
to rounding), and a float32 loop over the source positions in increasing order, which is
the summation order the kernel promises; the kernel must match the latter bit for bit.
The kernel runs on CUDA when present, otherwise in Triton's CPU interpreter
(TRITON_INTERPRET=1, set by conftest.py), so the shapes stay small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastattrec.kernels.experimental.embedding_scatter import (
    plan_segments,
    scatter_rows_,
    scatter_rows_torch_,
    table_offsets,
)

from helpers import BOTH_FORMS as BACKENDS
from helpers import DEVICE, kernel_available


def sequential_f32(out0: np.ndarray, index: np.ndarray, src: np.ndarray,
                   accumulate: bool) -> np.ndarray:
    """float32, one source row at a time in position order: acc[r] starts at -0.0 (the
    additive identity), then out[r] + acc[r] (or acc[r]) for every row r in index."""
    out = out0.copy()
    acc: dict[int, np.ndarray] = {}
    for p, r in enumerate(index.tolist()):
        acc[r] = acc.get(r, np.full(src.shape[1], -0.0, np.float32)) + src[p]
    for r, a in acc.items():
        out[r] = out[r] + a if accumulate else a
    return out


def add_at_f64(out0: np.ndarray, index: np.ndarray, src: np.ndarray,
               accumulate: bool) -> np.ndarray:
    """float64 np.add.at: out[r] = out0[r] (or 0) + the sum of src[p] with index[p] = r."""
    out = out0.astype(np.float64)
    if not accumulate:
        out[np.unique(index)] = 0.0
    np.add.at(out, index, src.astype(np.float64))
    return out


def data(n: int, d: int, n_rows: int, seed: int, index: np.ndarray | None = None):
    """Source rows of mixed magnitude (so the order of the additions shows in the last
    bits), random destinations (or `index`), and a random starting `out`."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-3, 4, size=(n, 1))
    src = (rng.normal(size=(n, d)) * scale).astype(np.float32)
    if index is None:
        index = rng.integers(0, n_rows, size=n)
    out0 = rng.normal(size=(n_rows, d)).astype(np.float32)
    return out0, index.astype(np.int64), src


def run(out0, index, src, backend: str, accumulate: bool, n_rows: int | None = None):
    """The scatter under test, on DEVICE, back as numpy."""
    out = torch.from_numpy(out0.copy()).to(DEVICE)
    idx = torch.from_numpy(index).to(DEVICE)
    plan = plan_segments(idx, n_rows if n_rows is not None else out0.shape[0])
    scatter_rows_(out, torch.from_numpy(src).to(DEVICE), plan, accumulate=accumulate,
                  backend=backend)
    return out.cpu().numpy()


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# (name, N, d, rows, index): repeated rows and rows that never appear; one segment of all
# N rows (not a multiple of the unrolling); d not a multiple of the column block (37 ->
# 64, 65 -> 128, 3 -> 4); d = 64 exactly; every row once; an empty index.
CASES = [
    ("random", 200, 37, 50, None),
    ("one-segment", 257, 16, 9, np.full(257, 4)),
    ("sparse", 150, 65, 400, None),
    ("d-64", 96, 64, 12, None),
    ("d-3", 40, 3, 7, None),
    ("permutation", 30, 8, 30, np.random.default_rng(9).permutation(30)),
    ("empty", 0, 8, 5, np.zeros(0, np.int64)),
]


@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulate", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_references(case, backend, accumulate):
    _, n, d, n_rows, index = case
    out0, index, src = data(n, d, n_rows, seed=n + d, index=index)
    got = run(out0, index, src, backend, accumulate)
    np.testing.assert_allclose(got, add_at_f64(out0, index, src, accumulate),
                               rtol=1e-5, atol=1e-5 * np.abs(src).max(initial=1.0))
    np.testing.assert_array_equal(bits(got), bits(sequential_f32(out0, index, src,
                                                                accumulate)))
    untouched = np.setdiff1d(np.arange(n_rows), index)
    np.testing.assert_array_equal(bits(got[untouched]), bits(out0[untouched]))


def test_order_of_additions_shows_in_the_bits():
    """The bit-exact check above can fail: the same sums in reverse position order give
    other bits for this data, so only the promised order passes."""
    out0, index, src = data(200, 37, 50, seed=237)
    forward = sequential_f32(out0, index, src, True)
    backward = sequential_f32(out0, index[::-1].copy(), src[::-1].copy(), True)
    np.testing.assert_allclose(forward, backward, rtol=1e-4, atol=1e-2)
    assert (bits(forward) != bits(backward)).sum() > 50


def test_rows_never_named_stay_zero():
    out0, index, src = data(120, 20, 40, seed=3, index=np.arange(120) % 13 * 3)
    out0[:] = 0.0
    got = run(out0, index, src, "auto", accumulate=True)
    named = np.zeros(40, bool)
    named[index] = True
    assert not got[~named].any() and np.all(np.abs(got[named]).sum(1) > 0)


def test_two_runs_are_bit_identical():
    out0, index, src = data(300, 48, 20, seed=4)
    a = run(out0, index, src, "auto", accumulate=True)
    b = run(out0, index, src, "auto", accumulate=True)
    np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_agrees_with_index_add(backend):
    out0, index, src = data(250, 33, 60, seed=5)
    got = run(out0, index, src, backend, accumulate=True)
    want = torch.from_numpy(out0.copy()).index_add_(0, torch.from_numpy(index),
                                                     torch.from_numpy(src))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5,
                               atol=1e-5 * np.abs(src).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_tables_in_one_buffer(backend):
    """AttRec's layout: user, item and item2 gradients as views of one buffer, the item
    table reached by two lookups (windows and items), one plan and one launch."""
    rng = np.random.default_rng(6)
    n_users, n_items, b, length, d = 7, 11, 6, 5, 10
    users = rng.integers(0, n_users, b)
    windows = rng.integers(0, n_items, (b, length)).reshape(-1)
    items = rng.integers(0, n_items, (b, 2)).reshape(-1)
    du, dx = rng.normal(size=(b, d)), rng.normal(size=(b * length, d))
    de, de2 = rng.normal(size=(2 * b, d)), rng.normal(size=(2 * b, d))
    off = table_offsets([n_users, n_items, n_items])
    assert off == [0, 7, 18, 29]
    index = np.concatenate([users, off[1] + windows, off[1] + items, off[2] + items])
    src = np.concatenate([du, dx, de, de2]).astype(np.float32)
    buf = torch.zeros(off[-1], d, device=DEVICE)
    user_g, item_g, item2_g = buf[:off[1]], buf[off[1]:off[2]], buf[off[2]:]
    plan = plan_segments(torch.from_numpy(index).to(DEVICE), off[-1])
    scatter_rows_(buf, torch.from_numpy(src).to(DEVICE), plan, backend=backend)
    for table, idx, g in ((user_g, users, du), (item_g, np.concatenate([windows, items]),
                                                np.concatenate([dx, de])),
                          (item2_g, items, de2)):
        want = np.zeros((table.shape[0], d))
        np.add.at(want, idx, g.astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(table.cpu().numpy(), want, rtol=1e-5, atol=1e-6)


def test_plan_matches_numpy():
    index = np.array([5, 2, 5, 0, 2, 5, 9, 2])
    plan = plan_segments(torch.from_numpy(index), 10)
    np.testing.assert_array_equal(plan.order.numpy(), [3, 1, 4, 7, 0, 2, 5, 6])
    np.testing.assert_array_equal(plan.rows.numpy(), [0, 2, 5, 9])
    np.testing.assert_array_equal(plan.starts.numpy(), [0, 1, 4, 7, 8])
    assert int(plan.count) == 4
    rng = np.random.default_rng(7)
    index = rng.integers(0, 30, 200)
    plan = plan_segments(torch.from_numpy(index), 30)
    rows, counts = np.unique(index, return_counts=True)
    np.testing.assert_array_equal(plan.order.numpy(), np.argsort(index, kind="stable"))
    np.testing.assert_array_equal(plan.rows.numpy(), rows)
    np.testing.assert_array_equal(plan.starts.numpy(), np.concatenate([[0], np.cumsum(counts)]))


def test_plan_of_several_steps_is_padded_per_step():
    """A (T, N) index: each step's padded plan holds that step's exact plan, padding after
    it, and scatters exactly what the step's own index does (rows past `count` are never
    written, even without accumulate)."""
    rng = np.random.default_rng(8)
    index = rng.integers(1, 6, (3, 40))
    index[1] = 3  # one step with a single segment
    plans = plan_segments(torch.from_numpy(index).to(DEVICE), 6)
    assert plans.steps == 3 and plans.rows.shape == (3, 40) and plans.starts.shape == (3, 41)
    src = rng.normal(size=(40, 9)).astype(np.float32)
    for t in range(3):
        rows, counts = np.unique(index[t], return_counts=True)
        p = plans.step(t)
        s = int(p.count)
        assert s == len(rows)
        np.testing.assert_array_equal(p.order.cpu().numpy(), np.argsort(index[t], kind="stable"))
        np.testing.assert_array_equal(p.rows[:s].cpu().numpy(), rows)
        np.testing.assert_array_equal(p.starts[: s + 1].cpu().numpy(),
                                      np.concatenate([[0], np.cumsum(counts)]))
        assert (p.starts[s:] == 40).all()
        out0 = np.full((6, 9), 7.0, np.float32)  # row 0 is never named: stays 7
        out = torch.from_numpy(out0.copy()).to(DEVICE)
        scatter_rows_(out, torch.from_numpy(src).to(DEVICE), p, accumulate=False)
        np.testing.assert_array_equal(bits(out.cpu().numpy()),
                                      bits(sequential_f32(out0, index[t], src, False)))


@pytest.mark.parametrize("accumulate", [True, False], ids=["accumulate", "write"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_step_named_by_a_device_tensor(backend, accumulate):
    """scatter_rows_(..., step=t) with the whole padded plan (how a captured training
    step calls it: the kernel reads t from the device) sums exactly step t's rows, in
    the promised order."""
    rng = np.random.default_rng(11)
    index = rng.integers(0, 9, (4, 50))
    index[2] = 5  # one step with a single segment
    plans = plan_segments(torch.from_numpy(index).to(DEVICE), 9)
    for t in (0, 2, 3):
        out0, _, src = data(50, 20, 9, seed=20 + t, index=index[t])
        out = torch.from_numpy(out0.copy()).to(DEVICE)
        scatter_rows_(out, torch.from_numpy(src).to(DEVICE), plans, backend=backend,
                      accumulate=accumulate, step=torch.tensor(t, device=DEVICE))
        np.testing.assert_array_equal(bits(out.cpu().numpy()),
                                      bits(sequential_f32(out0, index[t], src, accumulate)))


def test_fallback_gives_the_kernels_bits():
    if not kernel_available():
        pytest.skip("the Triton kernel runs on CUDA or in the interpreter")
    out0, index, src = data(180, 24, 15, seed=10)
    a = run(out0, index, src, "triton", accumulate=True)
    out = torch.from_numpy(out0.copy())
    scatter_rows_torch_(out, torch.from_numpy(src), plan_segments(torch.from_numpy(index), 15))
    np.testing.assert_array_equal(bits(a), bits(out.numpy()))


def test_bad_arguments_are_refused():
    idx = torch.tensor([0, 3, 1])
    with pytest.raises(ValueError, match="lie in"):
        plan_segments(idx, 3)
    with pytest.raises(ValueError, match="lie in"):
        plan_segments(torch.tensor([-1, 0]), 3)
    with pytest.raises(ValueError, match="integers"):
        plan_segments(idx.float(), 4)
    plan = plan_segments(idx, 4)
    with pytest.raises(ValueError, match="rows"):
        scatter_rows_(torch.zeros(4, 5), torch.zeros(2, 5), plan)
    with pytest.raises(ValueError, match="float32"):
        scatter_rows_(torch.zeros(4, 5, dtype=torch.float64), torch.zeros(3, 5), plan)
    with pytest.raises(ValueError, match="out has"):
        scatter_rows_(torch.zeros(3, 5), torch.zeros(3, 5), plan)
    with pytest.raises(ValueError, match="one step at a time"):
        scatter_rows_(torch.zeros(4, 5), torch.zeros(3, 5), plan_segments(idx[None], 4))
    with pytest.raises(ValueError, match="step= takes"):  # a single plan has no steps
        scatter_rows_(torch.zeros(4, 5), torch.zeros(3, 5), plan, step=torch.tensor(0))
    with pytest.raises(ValueError, match="step= takes"):
        scatter_rows_(torch.zeros(4, 5), torch.zeros(3, 5), plan_segments(idx[None], 4),
                      step=torch.tensor(0.0))
