"""The one-launch pairwise loss against autograd of the model's loss in float64.

The reference is `fastattrec.model.batch_loss` (the model's own loss, a torch function)
differentiated by autograd in float64: independent of the kernel's hand-written chain
rule. Rows of mixed length exercise both sides of the dist mode's clipping; padding
samples (valid 0) must get no gradient.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from fastattrec.kernels.launch import interpreted  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreted():
    pytest.skip("the kernel runs on CUDA or in the interpreter", allow_module_level=True)

from fastattrec.kernels.experimental.pair_loss import pair_loss_, programs  # noqa: E402
from fastattrec.model import batch_loss  # noqa: E402


def case(b: int, length: int, d: int, seed: int):
    """Rows (N, d) in the step layout, short (B, d), aux (2, B + 1) with step 1 padded."""
    rng = np.random.default_rng(seed)
    n = b * (length + 5)
    rows = rng.normal(0, 0.6, (n, d)) * rng.choice([0.2, 1.0, 3.0], size=(n, 1))
    short = rng.normal(0, 0.5, (b, d))
    aux = np.ones((2, b + 1))
    aux[0, b] = b
    real = b - 3  # the second step's last three slots are padding
    aux[1, real:b] = 0.0
    aux[1, b] = real
    return rows.astype(np.float32), short.astype(np.float32), aux.astype(np.float32)


def reference(rows, short, valid, count, b, length, mode, w, gamma):
    """Loss and gradients by autograd of the model's batch_loss, float64."""
    r = torch.tensor(rows, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(short, dtype=torch.float64, requires_grad=True)
    d = rows.shape[1]
    u = r[:b]
    e = r[b * (1 + length): b * (3 + length)].view(b, 2, d)
    e2 = r[b * (3 + length):].view(b, 2, d)
    loss = batch_loss(u, e, e2, s, torch.tensor(valid, dtype=torch.float64),
                      torch.tensor(float(count), dtype=torch.float64), mode, w, gamma)
    loss.backward()
    return loss.item(), r.grad.numpy(), s.grad.numpy()


@pytest.mark.parametrize("mode", ["inner", "dist"])
@pytest.mark.parametrize("b,length,d", [(21, 5, 100), (16, 3, 7), (5, 5, 33)])
def test_loss_and_gradients_match_autograd(mode, b, length, d):
    rows, short, aux = case(b, length, d, seed=b + d)
    w, gamma = 0.3, 0.5
    t = lambda a: torch.from_numpy(a).to(DEVICE)  # noqa: E731
    for step in (0, 1):
        grad = torch.full(rows.shape, 9.0, device=DEVICE)  # window rows must stay 9
        dshort = torch.empty(short.shape, device=DEVICE)
        parts = torch.empty(programs(b), device=DEVICE)
        pair_loss_(t(rows), t(short), t(aux), torch.tensor(step, device=DEVICE), grad,
                   dshort, parts, length, mode, w, gamma)
        valid, count = aux[step, :b], aux[step, b]
        want_loss, want_grad, want_dshort = reference(rows, short, valid, count, b, length,
                                                      mode, w, gamma)
        got_loss = parts.sum().item() / (count if mode == "inner" else 1.0)
        assert got_loss == pytest.approx(want_loss, rel=1e-5)
        g = grad.cpu().numpy()
        window = slice(b, b * (1 + length))
        assert (g[window] == 9.0).all()
        keep = np.ones(len(g), bool)
        keep[window] = False
        scale = np.abs(want_grad).max()
        np.testing.assert_allclose(g[keep], want_grad[keep], rtol=1e-4, atol=1e-6 * scale)
        np.testing.assert_allclose(dshort.cpu().numpy(), want_dshort, rtol=1e-4,
                                   atol=1e-6 * np.abs(want_dshort).max())
        if step == 1:  # padding samples: no gradient at all
            assert not g[b - 3:b].any() and not dshort.cpu().numpy()[b - 3:].any()


def test_unit_rows_take_the_radial_term_as_autograd_does():
    """Rows of norm exactly 1 (basis vectors): autograd's clamp(min=1) passes the norm's
    gradient at equality, so the clipping's radial term counts there too (dist mode)."""
    b, length, d = 6, 2, 8
    rows, short, aux = case(b, length, d, seed=3)
    eye = np.eye(d, dtype=np.float32)
    rows[:b] = eye[:b]  # users
    rows[b * (1 + length):] = eye[np.arange(4 * b) % d]  # every candidate in both tables
    t = lambda a: torch.from_numpy(a).to(DEVICE)  # noqa: E731
    grad = torch.zeros(rows.shape, device=DEVICE)
    dshort = torch.empty(short.shape, device=DEVICE)
    pair_loss_(t(rows), t(short), t(aux), torch.tensor(0, device=DEVICE), grad, dshort,
               torch.empty(programs(b), device=DEVICE), length, "dist", 0.3, 2.0)
    _, want, _ = reference(rows, short, aux[0, :b], aux[0, b], b, length, "dist", 0.3, 2.0)
    keep = np.ones(len(rows), bool)
    keep[b:b * (1 + length)] = False
    assert np.abs(want[keep]).max() > 0.1  # the margin is active: gradients flow
    np.testing.assert_allclose(grad.cpu().numpy()[keep], want[keep], rtol=1e-4, atol=1e-6)


def test_bad_shapes_are_refused():
    rows, short, aux = case(4, 2, 8, seed=0)
    t = lambda a: torch.from_numpy(a).to(DEVICE)  # noqa: E731
    with pytest.raises(ValueError, match="rows must be"):
        pair_loss_(t(rows), t(short), t(aux), torch.tensor(0, device=DEVICE),
                   torch.empty_like(t(rows)), torch.empty_like(t(short)),
                   torch.empty(programs(4), device=DEVICE), 3, "inner", 0.5, 0.5)
