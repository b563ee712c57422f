"""Dropout's masks (docs/spec.md §2.5): the counter-based draw against an independent
uint32 computation of its formula, and the statistics a dropout mask needs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastattrec.model import dropout_rows, dropout_scale, dropout_seeds


def lowbias32(x: np.ndarray) -> np.ndarray:
    """C. Wellons' lowbias32 in numpy uint32 arithmetic (its products wrap mod 2^32)."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


@pytest.mark.parametrize("seeds,p,shard", [((0, 0), 0.2, 0), ((2**32 - 1, 123456789), 0.5, 0),
                                           ((987654321, 2**31 + 7), 0.05, 0),
                                           ((2**32 - 50, 99), 0.3, 1)])
def test_mask_is_the_documented_hash(seeds, p, shard):
    """Entry k keeps iff the top 24 bits of lowbias32(lowbias32((k + s0) mod 2^32) XOR s1)
    reach ceil(p 2^24), and kept entries are scaled by 1 / (1 - p); process `shard`'s
    entries are numbered after those of the shards before it."""
    shape = (7, 3, 5)
    n = math.prod(shape)
    k = np.arange(shard * n, (shard + 1) * n, dtype=np.uint64)
    start = ((k + np.uint64(seeds[0])) % np.uint64(2**32)).astype(np.uint32)
    h = lowbias32(lowbias32(start) ^ np.uint32(seeds[1]))
    keep = (h >> np.uint32(8)) >= math.ceil(p * 2**24)
    want = torch.from_numpy(keep.reshape(shape) / (1.0 - p))
    got = dropout_scale(torch.tensor(seeds), shape, p, torch.float64, shard)
    assert got.shape == shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_masks_drop_at_rate_p_independently(p):
    """Over 2^20 entries: the dropped fraction is p, neighbours are dropped together at
    rate p^2 (no run structure), and two masks of the same generator agree only by chance
    (both dropped at rate p^2); each within 5 standard deviations."""
    n = 2**20
    gen = torch.Generator().manual_seed(11)
    a = dropout_rows(torch.ones(n, dtype=torch.float64), p, gen) == 0
    b = dropout_rows(torch.ones(n, dtype=torch.float64), p, gen) == 0

    def near(observed: torch.Tensor, rate: float) -> None:
        m = observed.numel()
        sd = math.sqrt(rate * (1 - rate) / m)
        assert abs(observed.double().mean().item() - rate) < 5 * sd

    near(a, p)
    near(b, p)
    near(a[1:] & a[:-1], p * p)
    near(a & b, p * p)


def test_seeds_come_from_the_generator():
    """The same generator state gives the same mask; a different state another one."""
    def mask(seed: int) -> torch.Tensor:
        return dropout_rows(torch.ones(64, 10), 0.5, torch.Generator().manual_seed(seed))

    assert torch.equal(mask(3), mask(3))
    assert not torch.equal(mask(3), mask(4))
    s = dropout_seeds(torch.Generator().manual_seed(3), torch.device("cpu"))
    assert s.shape == (2,) and s.dtype == torch.int64
    assert int(s.min()) >= 0 and int(s.max()) < 2**32
