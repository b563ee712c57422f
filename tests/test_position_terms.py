"""The one-launch position terms against numpy: the float64 formulas (to rounding), and
numpy loops doing the kernels' additions in the kernels' order (bit for bit).

The kernels run on CUDA when present, otherwise in Triton's CPU interpreter
(TRITON_INTERPRET=1, set by conftest.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from fastattrec.kernels.launch import interpreted  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreted():
    pytest.skip("the kernels run on CUDA or in the interpreter", allow_module_level=True)

from fastattrec.kernels.position_terms import (  # noqa: E402
    position_projection_fused,
    reduce_weight_grad,
)


def rand(shape, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    mags = 10.0 ** rng.integers(-2, 3, size=shape)  # mixed magnitudes: order shows
    return (rng.standard_normal(shape) * mags * scale).astype(np.float32)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("length,dim", [(5, 100), (3, 7), (8, 130)])
def test_position_projection(length, dim):
    pos, w = rand((length, dim), 1), rand((dim, dim), 2)
    got = position_projection_fused(torch.from_numpy(pos).to(DEVICE),
                                    torch.from_numpy(w).to(DEVICE)).cpu().numpy()
    exact = pos.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_allclose(got, exact, rtol=1e-7, atol=1e-12 * np.abs(exact).max())
    # the kernel's order: for each entry, float64 products added over k in order
    seq = np.zeros((length, dim), np.float64)
    for k in range(dim):
        seq += pos[:, k:k + 1].astype(np.float64) * w[k].astype(np.float64)
    np.testing.assert_array_equal(bits(got), bits(seq.astype(np.float32)))


@pytest.mark.parametrize("g,length,dim", [(3, 5, 100), (1, 2, 7), (5, 8, 40)])
def test_reduce_weight_grad(g, length, dim):
    dwp, dhs, pos = rand((g, dim, dim), 3), rand((g, length, dim), 4), rand((length, dim), 5)
    got = reduce_weight_grad(*(torch.from_numpy(a).to(DEVICE) for a in (dwp, dhs, pos)))
    got = got.cpu().numpy()
    f64 = dwp.astype(np.float64).sum(0) + pos.astype(np.float64).T @ dhs.astype(
        np.float64).sum(0)
    np.testing.assert_allclose(got, f64, rtol=1e-5, atol=1e-5 * np.abs(f64).max())
    # the kernel's order: partials in program order (float32), column sums of dH in
    # program order (float32), then P^T s in float64 over positions in order
    acc = np.zeros((dim, dim), np.float32)
    for i in range(g):
        acc = acc + dwp[i]
    pos_part = np.zeros((dim, dim), np.float64)
    for p in range(length):
        s = np.zeros(dim, np.float32)
        for i in range(g):
            s = s + dhs[i, p]
        pos_part += pos[p].astype(np.float64)[:, None] * s.astype(np.float64)[None, :]
    want = acc + pos_part.astype(np.float32)
    np.testing.assert_array_equal(bits(got), bits(want))
