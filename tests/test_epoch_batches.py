"""An epoch's batches cut and planned at once, against the batch definition written out.

The reference below builds every step slot by slot in Python from the definition (slot
j of step t holds sample perm[min(t B + j, T - 1)], valid when t B + j < T), which
is independent of the vectorised `EpochBatches.fill`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastattrec.experimental import epoch_batches
from fastattrec.experimental.epoch_batches import EpochBatches, lookups

N_USERS, N_ITEMS = 4, 6  # table rows, padding row 0 included


def per_sample(n: int, length: int, seed: int):
    rng = np.random.default_rng(seed)
    users = rng.integers(1, N_USERS, n)
    windows = rng.integers(0, N_ITEMS, (n, length))
    windows[0, :] = 0  # an all-padding window
    targets = rng.integers(1, N_ITEMS, n)
    negs = rng.integers(1, N_ITEMS, n)
    return users, windows, targets, negs


def expected(perm, users, windows, targets, negs, batch: int):
    """index, mask, valid, count of every step, slot by slot."""
    n = len(perm)
    steps = -(-n // batch)
    index, mask, valid, count = [], [], [], []
    for t in range(steps):
        slots = [min(t * batch + j, n - 1) for j in range(batch)]
        s = [perm[p] for p in slots]
        row = [users[i] for i in s]
        row += [N_USERS + w for i in s for w in windows[i]]
        row += [N_USERS + x for i in s for x in (targets[i], negs[i])]
        row += [N_USERS + N_ITEMS + x for i in s for x in (targets[i], negs[i])]
        index.append(row)
        mask.append([[w != 0 for w in windows[i]] for i in s])
        valid.append([float(t * batch + j < n) for j in range(batch)])
        count.append(float(min(batch, n - t * batch)))
    return np.array(index), np.array(mask), np.array(valid), np.array(count)


@pytest.mark.parametrize("chunk", [512, 2])
def test_fill_cuts_every_step_as_defined_and_plans_it(monkeypatch, chunk):
    """Planned whole, and in chunks of 2 steps (the last chunk shorter)."""
    monkeypatch.setattr(epoch_batches, "CHUNK", chunk)
    n, batch, length = 11, 4, 3  # 3 steps, the last one with 3 samples and 1 padding slot
    users, windows, targets, negs = per_sample(n, length, seed=0)
    eb = EpochBatches(n, batch, length, N_USERS, N_ITEMS, torch.device("cpu"))
    assert eb.n_steps == 3 and eb.n_lookups == sum(lookups(batch, length)) == batch * 8
    ptrs = [t.data_ptr() for t in (eb.index, eb.order, eb.rows, eb.starts)]
    for seed in (1, 2):  # a second epoch overwrites the same buffers
        perm = np.random.default_rng(seed).permutation(n)
        eb.fill(torch.from_numpy(perm), *(torch.from_numpy(a).to(torch.int32)
                                          for a in (users, windows, targets, negs)))
        index, mask, valid, count = expected(perm, users, windows, targets, negs, batch)
        np.testing.assert_array_equal(eb.index.numpy(), index)
        for t in range(eb.n_steps):  # each step's plan: a stable sort of its rows
            rows, counts = np.unique(index[t], return_counts=True)
            s = len(rows)
            assert int(eb.segments[t]) == s
            np.testing.assert_array_equal(eb.order[t].numpy(),
                                          np.argsort(index[t], kind="stable"))
            np.testing.assert_array_equal(eb.rows[t, :s].numpy(), rows)
            np.testing.assert_array_equal(eb.starts[t, :s + 1].numpy(),
                                          np.concatenate([[0], np.cumsum(counts)]))
            v, c = eb.step_aux(torch.tensor(t))
            np.testing.assert_array_equal(v.numpy(), valid[t])
            assert float(c) == count[t]
            # the key mask: the window slots among the lookups not naming the padding row
            flags = torch.from_numpy(index[t] != eb.padding_row)
            np.testing.assert_array_equal(eb.window_mask(flags).numpy(), mask[t])
    assert ptrs == [t.data_ptr() for t in (eb.index, eb.order, eb.rows, eb.starts)]


def test_whole_batches_have_no_padding():
    n, batch, length = 8, 4, 2
    users, windows, targets, negs = per_sample(n, length, seed=3)
    eb = EpochBatches(n, batch, length, N_USERS, N_ITEMS, torch.device("cpu"))
    eb.fill(torch.arange(n), *(torch.from_numpy(a) for a in (users, windows, targets, negs)))
    steps = [eb.step_aux(torch.tensor(t)) for t in range(eb.n_steps)]
    assert eb.n_steps == 2 and all(bool((v == 1).all()) for v, _ in steps)
    assert [float(c) for _, c in steps] == [4.0, 4.0]
