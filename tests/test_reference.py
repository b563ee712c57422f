"""The torch reference (the executable spec) against numbers computed independently with
numpy from docs/spec.md §2.3, and its autograd against finite differences."""

import math

import numpy as np
import torch

from fastattrec.kernels import position_encoding, short_term_attention_reference


def numpy_short_term(x, mask, w, p):
    """docs/spec.md §2.3, written directly in numpy for one window at a time."""
    b, length, d = x.shape
    out = np.zeros((b, d))
    for k in range(b):
        q = np.maximum((x[k] + p) @ w, 0)
        s = q @ q.T / math.sqrt(d)
        s[:, ~mask[k]] = -(2.0**32) + 1
        a = np.exp(s - s.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)
        out[k] = (a @ x[k]).mean(axis=0)
    return out


def test_position_encoding_formula():
    p = position_encoding(3, 4).double().numpy()
    # P[pos, 2i] = sin(pos / 10000^(2i/d)), P[pos, 2i+1] = cos(pos / 10000^(2i/d)), d = 4
    want = np.array([[math.sin(pos / 10000 ** (2 * i / 4)) if c % 2 == 0
                      else math.cos(pos / 10000 ** (2 * i / 4))
                      for c, i in ((0, 0), (1, 0), (2, 1), (3, 1))] for pos in range(3)])
    assert np.allclose(p, want, atol=1e-7)
    assert p[0].tolist() == [0.0, 1.0, 0.0, 1.0]


def test_hand_worked_two_slot_window():
    """d = 2, L = 2, W = I, P = 0: Q = relu(X), S = Q Q^T / sqrt(2)."""
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    w = torch.eye(2, dtype=torch.float64)
    p = torch.zeros(2, 2, dtype=torch.float64)
    both = short_term_attention_reference(x, torch.tensor([[True, True]]), w, p)
    e1, e4 = math.exp(1 / math.sqrt(2)), math.exp(4 / math.sqrt(2))
    a = np.array([[e1 / (e1 + 1), 1 / (e1 + 1)], [1 / (1 + e4), e4 / (1 + e4)]])
    want = (a @ np.array([[1.0, 0.0], [0.0, 2.0]])).mean(axis=0)
    assert np.allclose(both[0].numpy(), want, rtol=1e-12)
    # Masking the first slot: every row attends to slot 2 only -> short = x_2.
    left = short_term_attention_reference(x, torch.tensor([[False, True]]), w, p)
    assert np.allclose(left[0].numpy(), [0.0, 2.0])
    # Nothing valid: uniform attention -> short = mean of the rows.
    none = short_term_attention_reference(x, torch.tensor([[False, False]]), w, p)
    assert np.allclose(none[0].numpy(), [0.5, 1.0])


def test_reference_matches_numpy_on_random_windows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5, 12))
    w = rng.uniform(-0.3, 0.3, size=(12, 12))
    mask = rng.random((6, 5)) > 0.4
    mask[0] = False
    p = position_encoding(5, 12, dtype=torch.float64).numpy()
    got = short_term_attention_reference(torch.tensor(x), torch.tensor(mask), torch.tensor(w),
                                         torch.tensor(p)).numpy()
    assert np.allclose(got, numpy_short_term(x, mask, w, p), rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(6, 6, dtype=torch.float64, generator=g)).requires_grad_(True)
    mask = torch.tensor([[True, False, True, True], [False] * 4, [True] * 4])
    p = position_encoding(4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: short_term_attention_reference(a, mask, b, p), (x, w))
