"""AttRec scores, losses and the L2 term against numpy; the weight-decay form of the L2
gradient against autograd of the explicit term."""

import numpy as np
import pytest
import torch

from fastattrec.model import AttRec, AttRecConfig


def make(mode, seed=0, **kw):
    cfg = AttRecConfig(n_users=7, n_items=11, dim=6, maxlen=3, mode=mode, kernel="torch", **kw)
    return AttRec(cfg, generator=torch.Generator().manual_seed(seed)).double()


def np_clip(v):
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1.0)


@pytest.mark.parametrize("mode", ["inner", "dist"])
def test_scores_and_losses_match_numpy(mode):
    m = make(mode, w=0.3, gamma=0.7)
    with torch.no_grad():  # make some rows longer than 1 so clipping matters in dist mode
        m.item_emb[3] *= 40
        m.user_emb[2] *= 40
    users = torch.tensor([1, 2, 6])
    windows = torch.tensor([[0, 3, 4], [5, 6, 7], [0, 0, 0]])
    pos, neg = torch.tensor([3, 8, 10]), torch.tensor([9, 1, 2])
    short = m.short_term(windows).detach().numpy()
    U, E, E2 = (t.detach().numpy() for t in (m.user_emb, m.item_emb, m.item2_emb))
    u = U[users.numpy()]

    def np_score(items):
        e, e2 = E[items.numpy()], E2[items.numpy()]
        if mode == "inner":
            return 0.3 * (u * e2).sum(1) + 0.7 * (short * e).sum(1)
        uc, ec, e2c = np_clip(u), np_clip(e), np_clip(e2)
        return 0.3 * ((uc - e2c) ** 2).sum(1) + 0.7 * ((short - ec) ** 2).sum(1)

    sp, sn = np_score(pos), np_score(neg)
    got = m.score(users, m.short_term(windows), pos).detach().numpy()
    assert np.allclose(got, sp, rtol=1e-10)
    loss = m(users, windows, pos, neg).item()
    if mode == "inner":
        want = np.mean(-np.log(1 / (1 + np.exp(-(sp - sn)))))
    else:
        want = np.sum(np.maximum(sp - sn + 0.7, 0))
    assert loss == pytest.approx(want, rel=1e-10)
    # A masked-out (valid = 0) sample changes neither the sum nor the mean's denominator.
    valid = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    partial = m(users, windows, pos, neg, valid).item()
    losses = (np.log1p(np.exp(sn - sp)) if mode == "inner"
              else np.maximum(sp - sn + 0.7, 0))[:2]
    assert partial == pytest.approx(losses.mean() if mode == "inner" else losses.sum(),
                                    rel=1e-10)


def test_goodness_all_agrees_with_score():
    for mode in ("inner", "dist"):
        m = make(mode)
        users = torch.tensor([1, 4])
        short = m.short_term(torch.tensor([[0, 1, 2], [3, 4, 5]]))
        allg = m.goodness_all(users, short)
        items = torch.arange(11).expand(2, -1)
        direct = m.score(users, short, items)
        sign = 1 if mode == "inner" else -1
        assert torch.allclose(allg, sign * direct, rtol=1e-9, atol=1e-12)


def test_reg_loss_is_whole_table_l2():
    m = make("inner", embed_reg=1e-3)
    want = 1e-3 * sum((t.detach().numpy() ** 2).sum() for t in (m.user_emb, m.item_emb,
                                                                  m.item2_emb))
    assert m.reg_loss().item() == pytest.approx(want, rel=1e-12)


def test_initialisation_and_padding_row_trainable():
    cfg = AttRecConfig(n_users=3000, n_items=3000, dim=20)
    m = AttRec(cfg, generator=torch.Generator().manual_seed(0))
    for t in m.tables():
        assert t.requires_grad and abs(t.std().item() - 0.05) < 0.002
    assert m.proj.abs().max().item() <= 0.05
    # Padded query rows are averaged in (docs/spec.md §2.3 step 6), so with two valid keys
    # their softmax rows, and hence row 0 of E, get a gradient: the padding row is an
    # ordinary learned row.
    windows = torch.tensor([[0, 0, 0, 4, 5]])
    m(torch.tensor([1]), windows, torch.tensor([2]), torch.tensor([3])).backward()
    assert m.item_emb.grad[0].abs().sum() > 0


def test_adam_weight_decay_equals_explicit_l2_gradient():
    """The trainer adds lambda * ||T||^2 through Adam's weight_decay = 2 lambda; one step
    must equal one step on the loss with the explicit term."""
    from fastattrec.config import TrainConfig
    from fastattrec.optim import KerasAdam, make_optimizer

    batch = (torch.tensor([1, 2]), torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([6, 7]),
             torch.tensor([8, 9]))
    a, b = make("inner", embed_reg=1e-2).float(), make("inner", embed_reg=1e-2).float()
    opt_a = make_optimizer(a, TrainConfig(embed_reg=1e-2), torch.device("cpu"), False)
    opt_b = KerasAdam(b.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
    for _ in range(3):
        opt_a.zero_grad()
        a(*batch).backward()
        opt_a.step()
        opt_b.zero_grad()
        (b(*batch) + b.reg_loss()).backward()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-7)


def test_compiled_loss_matches_eager():
    """--compile fuses the score-and-loss arithmetic and dropout's masks with torch.compile
    on CUDA; the compiled functions must give the same loss and gradients (checked here on
    CPU), with the same masks from the same generator state."""
    m = make("inner").float()
    m.cfg.dropout = 0.3
    args = (torch.tensor([1, 2, 3]), torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 6]]),
            torch.tensor([7, 8, 9]), torch.tensor([10, 1, 2]), torch.tensor([1.0, 1.0, 0.0]),
            torch.tensor(2.0))
    m.dropout_generator = torch.Generator().manual_seed(4)
    eager = m(*args)
    g_eager = torch.autograd.grad(eager, list(m.parameters()))
    m.compile_loss()
    m.dropout_generator = torch.Generator().manual_seed(4)
    compiled = m(*args)
    g_comp = torch.autograd.grad(compiled, list(m.parameters()))
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)
    for a, b in zip(g_eager, g_comp, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
