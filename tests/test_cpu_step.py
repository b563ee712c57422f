"""The hand-written CPU step against autograd of the plain reference model: the same loss
and the same gradient of every table, in both modes, with padded windows, items repeated
across the window and the candidates, masked samples and rows of every norm."""

import pytest
import torch

from fastattrec.model import AttRec, AttRecConfig
from fastattrec.training.cpu_step import ManualStep


def make(mode: str, seed: int, scale: float, objective: str = "pair",
         n_negatives: int = 1) -> AttRec:
    cfg = AttRecConfig(n_users=9, n_items=13, dim=6, maxlen=4, mode=mode, w=0.3, gamma=0.5,
                       kernel="torch", objective=objective, n_negatives=n_negatives,
                       gbce_t=0.6)
    m = AttRec(cfg, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():  # rows longer and shorter than 1, so clipping is exercised
        for t in m.tables():
            t.mul_(scale * (1 + torch.rand(t.shape[0], 1, generator=torch.Generator()
                                           .manual_seed(seed + 7), dtype=t.dtype) * 20))
    return m


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    b = 11
    users = torch.randint(1, 9, (b,), generator=g)
    windows = torch.randint(1, 13, (b, 4), generator=g)
    windows[0] = 0  # a window of padding only
    windows[1, :3] = 0  # left padding
    windows[2] = 5  # one item repeated
    pos = torch.randint(1, 13, (b,), generator=g)
    neg = torch.randint(1, 13, (b,), generator=g)
    pos[3] = windows[3, 0]  # the target also in the window
    neg[4] = pos[4]  # positive and negative equal
    valid = torch.ones(b, dtype=torch.float64)
    valid[-2:] = 0  # padding samples of a last batch
    count = torch.tensor(9.0, dtype=torch.float64)
    return users, windows, pos, neg, valid, count


@pytest.mark.parametrize("mode", ["inner", "dist"])
@pytest.mark.parametrize("scale", [0.05, 2.0])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("table", [True, False])
def test_manual_step_equals_autograd_of_the_reference(mode, scale, index_dtype, table):
    ref = make(mode, 1, scale)
    mine = make(mode, 1, scale)
    mine.cfg.kernel = "structured"
    users, windows, pos, neg, valid, count = batch(3)
    loss_ref = ref(users, windows, pos, neg, valid, count)
    loss_ref.backward()
    step = ManualStep(mine, table=table)
    with torch.no_grad():  # stale gradients must not leak into the next step
        for p in mine.parameters():
            p.grad.fill_(123.0)
    ix = [t.to(index_dtype) for t in (users, windows, pos, neg)]
    loss = step(*ix, valid, count)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(ref.named_parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)
    if scale > 1:  # clipping was really exercised: rows on both sides of length 1
        n = torch.linalg.vector_norm(mine.item_emb.detach()[pos], dim=1)
        assert (n > 1).any() and (n < 1).any()


@pytest.mark.parametrize("objective,n", [("pair", 3), ("bce", 1), ("bce", 4), ("gbce", 4),
                                         ("sampled-softmax", 1), ("sampled-softmax", 5)])
@pytest.mark.parametrize("mode", ["inner", "dist"])
@pytest.mark.parametrize("table", [True, False])
def test_every_objective_with_n_negatives_equals_autograd(objective, n, mode, table):
    """bce, gbce, sampled softmax and the pair loss with N negatives per sample (B, N):
    the step's loss and gradients are autograd's of the model's own loss, float64."""
    ref = make(mode, 2, 2.0, objective, n)
    mine = make(mode, 2, 2.0, objective, n)
    mine.cfg.kernel = "structured"
    assert (ref.beta != 1.0) == (objective == "gbce")  # gbce's power is exercised
    users, windows, pos, _, valid, count = batch(4)
    neg = torch.randint(1, 13, (users.shape[0], n), generator=torch.Generator().manual_seed(9))
    neg[5, 0] = pos[5]  # a negative equal to its target counts as drawn
    neg[6] = neg[6, :1]  # one negative drawn N times
    loss_ref = ref(users, windows, pos, neg, valid, count)
    loss_ref.backward()
    loss = ManualStep(mine, table=table)(users, windows, pos, neg, valid, count)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(ref.named_parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("objective,n,mode", [("bce", 4, "inner"), ("pair", 1, "inner"),
                                              ("sampled-softmax", 3, "dist")])
def test_dropout_equals_autograd_with_the_same_masks(objective, n, mode):
    """With dropout the step draws the model's masks (the same generator, the same order)
    and its loss and gradients are autograd's of the model's forward, float64; the two
    generators end in the same state, so the next step's masks agree too. The masks are
    real: without the same seed the gradients differ."""
    grads = []
    for seed in (5, 5, 6):
        ref = make(mode, 2, 2.0, objective, n)
        mine = make(mode, 2, 2.0, objective, n)
        for m in (ref, mine):
            m.cfg.dropout = 0.3
        mine.cfg.kernel = "structured"
        ref.dropout_generator = torch.Generator().manual_seed(5)
        mine.dropout_generator = torch.Generator().manual_seed(seed)
        users, windows, pos, _, valid, count = batch(4)
        neg = torch.randint(1, 13, (users.shape[0], n),
                            generator=torch.Generator().manual_seed(9))
        loss_ref = ref(users, windows, pos, neg.squeeze(1) if n == 1 else neg, valid, count)
        loss_ref.backward()
        loss = ManualStep(mine, table=False)(users, windows, pos,
                                            neg.squeeze(1) if n == 1 else neg, valid, count)
        grads.append([b.grad.clone() for b in mine.parameters()])
        if seed == 5:
            torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-12, atol=1e-12)
            for (name, a), b in zip(ref.named_parameters(), mine.parameters(), strict=True):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)
            assert torch.equal(ref.dropout_generator.get_state(),
                               mine.dropout_generator.get_state())
    assert not torch.allclose(grads[0][0], grads[2][0])  # other masks, other gradients


@pytest.mark.parametrize("objective,mode", [("sampled-softmax", "inner"), ("bce", "dist")])
def test_score_gradients_equal_central_differences(objective, mode):
    """score_grads against finite differences of the objectives' formulas written here in
    float64 numpy, independent of model.py (the gradient's definition, not its code)."""
    import numpy as np

    from fastattrec.training.cpu_step import score_grads

    g = np.random.default_rng(3)
    s = g.normal(size=(5, 4)) * 2
    valid = np.array([1.0, 1, 0, 1, 1])
    count = 4.0

    def loss(s):
        lg = s if mode == "inner" else -s
        if objective == "bce":
            sp = lambda v: np.log1p(np.exp(v))  # noqa: E731 - softplus
            t = sp(-lg[:, 0]) + sp(lg[:, 1:]).sum(1)
        else:
            t = np.log(np.exp(lg).sum(1)) - lg[:, 0]
        return (t * valid).sum() / count

    eps, num = 1e-6, np.zeros_like(s)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            d = np.zeros_like(s)
            d[i, j] = eps
            num[i, j] = (loss(s + d) - loss(s - d)) / (2 * eps)
    got = score_grads(torch.tensor(s), objective, mode, 0.5, 1.0, torch.tensor(valid),
                      torch.tensor(count))
    np.testing.assert_allclose(got.numpy(), num, rtol=1e-6, atol=1e-9)


def test_unit_rows_take_the_radial_term_as_autograd_does():
    """Table rows of norm exactly 1 (basis vectors), dist mode: autograd's clamp(min=1)
    passes the norm's gradient at equality, and so must the hand-written step."""
    ref, mine = make("dist", 4, 1.0), make("dist", 4, 1.0)
    mine.cfg.kernel = "structured"
    with torch.no_grad():
        for m in (ref, mine):
            for t in m.tables():
                t.copy_(torch.eye(6, dtype=t.dtype)[torch.arange(t.shape[0]) % 6])
            m.cfg.gamma = 2.0  # every margin active
    users, windows, pos, neg, valid, count = batch(6)
    ref(users, windows, pos, neg, valid, count).backward()
    ManualStep(mine)(users, windows, pos, neg, valid, count)
    for (name, a), b in zip(ref.named_parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-9, atol=1e-12, msg=name)


def test_manual_step_trains_like_autograd_in_float32():
    """A few optimiser steps in float32 stay within float32 rounding of autograd's."""
    from fastattrec.optim import KerasAdam

    ref, mine = make("inner", 2, 0.05).float(), make("inner", 2, 0.05).float()
    mine.cfg.kernel = "structured"
    users, windows, pos, neg, valid, count = batch(5)
    valid, count = valid.float(), count.float()
    opt_r = KerasAdam(ref.parameters(), lr=1e-2, eps=1e-7)
    opt_m = KerasAdam(mine.parameters(), lr=1e-2, eps=1e-7)
    step = ManualStep(mine)
    for _ in range(5):
        opt_r.zero_grad()
        ref(users, windows, pos, neg, valid, count).backward()
        opt_r.step()
        step(users, windows, pos, neg, valid, count)
        opt_m.step()
    for a, b in zip(ref.parameters(), mine.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("table,dropout", [(True, 0.0), (False, 0.0), (False, 0.3)])
def test_compiled_step_matches_the_uncompiled_one(table, dropout):
    """--compile on CPU fuses the step's arithmetic (Inductor C++), dropout's masks
    included: the same loss and gradients to float32 rounding, and a warning plus the
    uncompiled step if the compiler cannot run."""
    a, b = make("inner", 3, 0.05).float(), make("inner", 3, 0.05).float()
    a.cfg.kernel = b.cfg.kernel = "structured"
    if dropout:
        for m in (a, b):
            m.cfg.dropout = dropout
            m.dropout_generator = torch.Generator().manual_seed(8)
    users, windows, pos, neg, valid, count = batch(7)
    valid, count = valid.float(), count.float()
    eager = ManualStep(a, table=table)(users, windows, pos, neg, valid, count)
    step = ManualStep(b, compile=True, table=table)
    compiled = step(users, windows, pos, neg, valid, count)
    assert step.compiled  # (a compiler failure would have fallen back to the eager step)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-7)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7)


def test_a_failing_compiler_falls_back_with_a_warning():
    m = make("dist", 4, 0.05).float()
    m.cfg.kernel = "structured"
    step = ManualStep(m, compile=True)

    def broken(*a):
        raise RuntimeError("no C++ compiler here")

    step.grads = broken  # the compiled function, failing as a missing compiler would
    users, windows, pos, neg, valid, count = batch(8)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        loss = step(users, windows, pos, neg, valid.float(), count.float())
    assert not step.compiled and torch.isfinite(loss)
    step(users, windows, pos, neg, valid.float(), count.float())  # eager from now on


def test_an_eager_error_is_raised_not_taken_for_a_compiler_failure():
    """Without compilation a bad index is the caller's mistake: it is raised as is, with
    no warning about a compiler."""
    import warnings

    m = make("inner", 4, 0.05).float()
    m.cfg.kernel = "structured"
    users, windows, pos, neg, valid, count = batch(8)
    users[0] = 99  # the user table has 9 rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(IndexError):
            ManualStep(m)(users, windows, pos, neg, valid.float(), count.float())


@pytest.mark.parametrize("table", [True, False])
def test_gathered_rows_equal_the_batch_given_whole(table):
    """`gathered(idx, arrays)` (the gathers inside the step) gives what calling the step
    with the rows already cut gives, compiled, for both projection layouts."""
    users, windows, pos, neg, valid, count = batch(10)
    g = torch.Generator().manual_seed(11)
    idx = torch.randperm(users.shape[0], generator=g)[:7]  # rows in any order
    a, b = make("inner", 7, 0.05).float(), make("inner", 7, 0.05).float()
    a.cfg.kernel = b.cfg.kernel = "structured"
    whole = ManualStep(a, compile=True, table=table)(
        users[idx], windows[idx], pos[idx], neg[idx], valid[:7].float(), count.float())
    cut = ManualStep(b, compile=True, table=table).gathered(
        idx, users.to(torch.int32), windows.to(torch.int32), pos.to(torch.int32),
        neg.to(torch.int32), valid[:7].float(), count.float())
    torch.testing.assert_close(cut, whole, rtol=1e-6, atol=1e-7)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7)
