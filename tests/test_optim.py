"""KerasAdam against Adam written out in numpy from the Keras rule (docs/spec.md §3.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastattrec.optim import KerasAdam

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-7


def keras_adam_numpy(p0: np.ndarray, grads: list[np.ndarray], wd: float) -> np.ndarray:
    """float64: m, v from the L2-augmented gradient; p -= a_t * m / (sqrt(v) + eps)."""
    p = p0.astype(np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g + wd * p
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        a = LR * np.sqrt(1 - B2 ** t) / (1 - B1 ** t)
        p = p - a * m / (np.sqrt(v) + EPS)
    return p


def problem(seed: int = 0, steps: int = 12):
    """Gradients of mixed scale: ordinary rows and rows whose gradient is ~1e-7, where
    the placement of eps decides the step."""
    rng = np.random.default_rng(seed)
    p0 = rng.normal(0, 0.05, (6, 4)).astype(np.float32)
    q0 = rng.uniform(-0.05, 0.05, (3, 3)).astype(np.float32)
    scale = np.array([1, 1, 1e-6, 1e-7, 3e-7, 1])[:, None]
    gp = [(rng.normal(size=(6, 4)) * scale).astype(np.float32) for _ in range(steps)]
    gq = [rng.normal(size=(3, 3)).astype(np.float32) for _ in range(steps)]
    return p0, q0, gp, gq


def run_torch(p0, q0, gp, gq, capturable: bool, split: int | None = None, wd: float = 2e-6,
              cls=KerasAdam):
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    q = torch.nn.Parameter(torch.from_numpy(q0.copy()))

    def make(params):
        return cls([{"params": [params[0]], "weight_decay": wd},
                          {"params": [params[1]], "weight_decay": 0.0}],
                         lr=LR, betas=(B1, B2), eps=EPS, capturable=capturable, fused=True)

    opt = make((p, q))
    for i, (a, b) in enumerate(zip(gp, gq, strict=True)):
        if split is not None and i == split:  # checkpoint and resume into a new optimiser
            state = opt.state_dict()
            p = torch.nn.Parameter(p.detach().clone())
            q = torch.nn.Parameter(q.detach().clone())
            opt = make((p, q))
            opt.load_state_dict(state)
        p.grad, q.grad = torch.from_numpy(a), torch.from_numpy(b)
        opt.step()
    return p.detach().numpy(), q.detach().numpy()


@pytest.mark.parametrize("capturable", [False, True], ids=["fused-eps", "device-tensors"])
@pytest.mark.parametrize("triton_kernel", [True, False], ids=["triton", "foreach"])
def test_matches_keras_rule(capturable, triton_kernel):
    """Both forms of KerasAdam (eager fused with scaled eps; capturable foreach) and the
    experimental Triton form of the capturable step, against the rule in numpy."""
    from fastattrec.experimental.adam import TritonKerasAdam, fused_available

    if triton_kernel and not fused_available([torch.zeros(1)]):
        pytest.skip("the Triton kernel runs on CUDA or in the interpreter")
    p0, q0, gp, gq = problem()
    p, q = run_torch(p0, q0, gp, gq, capturable,
                     cls=TritonKerasAdam if triton_kernel else KerasAdam)
    np.testing.assert_allclose(p, keras_adam_numpy(p0, gp, 2e-6), rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(q, keras_adam_numpy(q0, gq, 0.0), rtol=2e-6, atol=1e-9)


def test_eager_step_is_pytorch_fused_adam_with_scaled_eps():
    """The eager path's own call of the fused kernel does bit for bit what
    torch.optim.Adam(fused=True) does with eps / sqrt(1 - b2^t) (optim.py's docstring)."""
    p0, q0, gp, gq = problem(seed=3)
    mine = run_torch(p0, q0, gp, gq, capturable=False)
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    q = torch.nn.Parameter(torch.from_numpy(q0.copy()))
    ref = torch.optim.Adam([{"params": [p], "weight_decay": 2e-6},
                            {"params": [q], "weight_decay": 0.0}],
                           lr=LR, betas=(B1, B2), eps=EPS, fused=True)
    for t, (a, b) in enumerate(zip(gp, gq, strict=True), start=1):
        for g in ref.param_groups:
            g["eps"] = EPS / np.sqrt(1.0 - B2 ** t)
        p.grad, q.grad = torch.from_numpy(a), torch.from_numpy(b)
        ref.step()
    np.testing.assert_array_equal(mine[0], p.detach().numpy())
    np.testing.assert_array_equal(mine[1], q.detach().numpy())


def test_the_eager_step_takes_its_own_fused_call(monkeypatch):
    """After the first step (which creates the state, through torch.optim.Adam.step) the
    direct fused call runs, so the test above compares it, not torch.optim.Adam.step,
    with PyTorch."""
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = KerasAdam([p], lr=LR, betas=(B1, B2), eps=EPS, fused=True)
    calls = []
    real = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    for _ in range(3):
        p.grad = torch.ones(3, 2)
        opt.step()
    assert calls == [1]  # the first step only


def _eager(params, wd=2e-6):
    return KerasAdam([{"params": params, "weight_decay": wd}], lr=LR, betas=(B1, B2),
                     eps=EPS, fused=True)


def test_optimiser_changes_mid_run_are_seen():
    """State replaced by hand, a group added, a deep copy: the cached lists of the direct
    call never update stale tensors, and a copy continues exactly like the original."""
    import copy

    p0, q0, gp, gq = problem(seed=4)
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = _eager([p])
    for a in gp[:3]:
        p.grad = torch.from_numpy(a)
        opt.step()
    # A copy continues like the original, bit for bit.
    p2 = copy.deepcopy(p)
    twin = _eager([p2])
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    clone = copy.deepcopy(opt)
    p3 = clone.param_groups[0]["params"][0]
    for a in gp[3:6]:
        for par, o in ((p, opt), (p2, twin), (p3, clone)):
            par.grad = torch.from_numpy(a)
            o.step()
    assert torch.equal(p, p2) and torch.equal(p, p3)
    # State replaced by hand: the new tensors are the ones updated.
    fresh = {k: v.clone() for k, v in opt.state[p].items()}
    opt.state[p] = fresh
    p.grad = torch.from_numpy(gp[6])
    opt.step()
    assert float(fresh["step"]) == 7.0 and opt.state[p] is fresh
    # A group added mid-run trains too.
    q = torch.nn.Parameter(torch.from_numpy(q0.copy()))
    opt.add_param_group({"params": [q], "weight_decay": 0.0})
    for a, b in zip(gp[7:9], gq[7:9], strict=True):
        p.grad, q.grad = torch.from_numpy(a), torch.from_numpy(b)
        opt.step()
    assert not torch.equal(q, torch.from_numpy(q0)) and float(opt.state[p]["step"]) == 9.0


def test_differs_from_pytorch_placement():
    """The rows with tiny gradients move differently under PyTorch's eps placement, so the
    comparison above can fail."""
    p0, _, gp, _ = problem()
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.Adam([p], lr=LR, betas=(B1, B2), eps=EPS, weight_decay=2e-6)
    for a in gp:
        p.grad = torch.from_numpy(a)
        opt.step()
    want = keras_adam_numpy(p0, gp, 2e-6)
    assert not np.allclose(p.detach().numpy()[3], want[3], rtol=1e-3, atol=0)


@pytest.mark.parametrize("capturable", [False, True], ids=["fused-eps", "device-tensors"])
def test_resume_mid_run_is_exact(capturable):
    p0, q0, gp, gq = problem(seed=1)
    whole = run_torch(p0, q0, gp, gq, capturable)
    resumed = run_torch(p0, q0, gp, gq, capturable, split=5)
    for a, b in zip(whole, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("capturable", [False, True], ids=["fused-eps", "device-tensors"])
def test_loading_fills_the_existing_state_tensors(capturable):
    """A load writes into the state tensors the optimiser already had (what a CUDA graph
    captured before a resume holds), and the run goes on by the Keras rule."""
    p0, q0, gp, gq = problem(seed=4)
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    q = torch.nn.Parameter(torch.from_numpy(q0.copy()))
    groups = [{"params": [p], "weight_decay": 2e-6}, {"params": [q], "weight_decay": 0.0}]
    saved = KerasAdam(groups, lr=LR, betas=(B1, B2), eps=EPS, capturable=capturable,
                      fused=True)
    for a, b in zip(gp[:5], gq[:5], strict=True):
        p.grad, q.grad = torch.from_numpy(a), torch.from_numpy(b)
        saved.step()
    state = saved.state_dict()
    p_at_5 = p.detach().clone()
    # a new optimiser that has taken one warm-up step from other values (as before capture)
    p2 = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    q2 = torch.nn.Parameter(torch.from_numpy(q0.copy()))
    opt = KerasAdam([{"params": [p2], "weight_decay": 2e-6}, {"params": [q2], "weight_decay": 0.0}],
                    lr=LR, betas=(B1, B2), eps=EPS, capturable=capturable, fused=True)
    p2.grad, q2.grad = torch.ones_like(p2), torch.ones_like(q2)
    opt.step()
    held = {k: v for k, v in opt.state[p2].items()}  # what a captured graph would hold
    opt.load_state_dict(state)
    for k, v in opt.state[p2].items():
        assert v is held[k], k
    assert float(held["step"]) == 5.0
    np.testing.assert_array_equal(held["exp_avg"].numpy(),
                                  saved.state[p]["exp_avg"].numpy())
    with torch.no_grad():
        p2.copy_(p_at_5)
    for a in gp[5:]:
        p2.grad, q2.grad = torch.from_numpy(a), torch.zeros_like(q2)
        opt.step()
    np.testing.assert_allclose(p2.detach().numpy(), keras_adam_numpy(p0, gp, 2e-6),
                               rtol=2e-6, atol=1e-9)


def test_paths_share_state_layout():
    """A checkpoint of one path resumes in the other (CUDA graph run resumed on CPU)."""
    p0, q0, gp, gq = problem(seed=2)
    want = keras_adam_numpy(p0, gp, 2e-6)
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    q = torch.nn.Parameter(torch.from_numpy(q0.copy()))
    groups = [{"params": [p], "weight_decay": 2e-6}, {"params": [q], "weight_decay": 0.0}]
    dev = KerasAdam(groups, lr=LR, betas=(B1, B2), eps=EPS, capturable=True)
    for a, b in zip(gp[:4], gq[:4], strict=True):
        p.grad, q.grad = torch.from_numpy(a), torch.from_numpy(b)
        dev.step()
    eager = KerasAdam([{"params": [p], "weight_decay": 2e-6}, {"params": [q], "weight_decay": 0.0}],
                      lr=LR, betas=(B1, B2), eps=EPS, fused=True)
    eager.load_state_dict(dev.state_dict())
    for a, b in zip(gp[4:], gq[4:], strict=True):
        p.grad, q.grad = torch.from_numpy(a), torch.from_numpy(b)
        eager.step()
    np.testing.assert_allclose(p.detach().numpy(), want, rtol=2e-6, atol=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_matches_keras_rule():
    """The capturable path recorded once as a CUDA graph and replayed, gradients copied in
    between, follows the Keras rule step by step."""
    p0, q0, gp, gq = problem(seed=3)
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()).cuda())
    q = torch.nn.Parameter(torch.from_numpy(q0.copy()).cuda())
    p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    opt = KerasAdam([{"params": [p], "weight_decay": 2e-6}, {"params": [q], "weight_decay": 0.0}],
                    lr=LR, betas=(B1, B2), eps=EPS, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up creates the state, then it is reset
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        p.copy_(torch.from_numpy(p0))
        q.copy_(torch.from_numpy(q0))
        for st in opt.state.values():
            for v in st.values():
                v.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for a, b in zip(gp, gq, strict=True):
        p.grad.copy_(torch.from_numpy(a))
        q.grad.copy_(torch.from_numpy(b))
        graph.replay()
    np.testing.assert_allclose(p.detach().cpu().numpy(), keras_adam_numpy(p0, gp, 2e-6),
                               rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(q.detach().cpu().numpy(), keras_adam_numpy(q0, gq, 0.0),
                               rtol=2e-6, atol=1e-9)


def test_fused_kernel_zeroes_the_gradient_it_read():
    pytest.importorskip("triton")
    from fastattrec.experimental.adam import fused_available
    from fastattrec.kernels.experimental.keras_adam import group_constants, keras_adam_

    if not fused_available([torch.zeros(1)]):
        pytest.skip("the Triton kernel runs on CUDA or in the interpreter")
    p0, _, gp, _ = problem(seed=5, steps=1)
    p, g = torch.from_numpy(p0.copy()).reshape(-1), torch.from_numpy(gp[0].copy()).reshape(-1)
    m, v, step = torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())
    keras_adam_([p], [g], [m], [v], [step],
                group_constants(LR, (B1, B2), EPS, 2e-6, p.device), zero_grad=True)
    assert torch.count_nonzero(g) == 0 and step.item() == 0  # counting is the caller's
    want = keras_adam_numpy(p0, gp[:1], 2e-6).reshape(-1)
    np.testing.assert_allclose(p.numpy(), want, rtol=2e-6, atol=1e-9)


def test_one_launch_takes_many_parameters_with_their_own_constants():
    """keras_adam_ over six parameters (two launches of up to four): sizes below, at and
    above a block, an empty one, and per-parameter weight decay; each against the Keras
    rule in numpy over three steps."""
    pytest.importorskip("triton")
    from fastattrec.experimental.adam import fused_available
    from fastattrec.kernels.experimental.keras_adam import BLOCK, group_constants, keras_adam_

    if not fused_available([torch.zeros(1)]):
        pytest.skip("the Triton kernel runs on CUDA or in the interpreter")
    rng = np.random.default_rng(11)
    sizes = [7, BLOCK, 0, BLOCK + 3, 2 * BLOCK + 1, 30]
    wds = [2e-6, 0.0, 2e-6, 0.5, 0.0, 1e-3]
    p0 = [rng.normal(0, 0.05, n).astype(np.float32) for n in sizes]
    grads = [[(rng.normal(size=n) * 10.0 ** rng.integers(-7, 1, n)).astype(np.float32)
              for n in sizes] for _ in range(3)]
    ps = [torch.from_numpy(a.copy()) for a in p0]
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros(()) for _ in ps]
    consts = [group_constants(LR, (B1, B2), EPS, wd, torch.device("cpu")) for wd in wds]
    for step_grads in grads:
        keras_adam_(ps, [torch.from_numpy(g.copy()) for g in step_grads], ms, vs, steps,
                    consts)
        torch._foreach_add_(steps, 1.0)
    for k, (p, wd) in enumerate(zip(ps, wds, strict=True)):
        want = keras_adam_numpy(p0[k], [g[k] for g in grads], wd)
        np.testing.assert_allclose(p.numpy(), want, rtol=2e-6, atol=1e-9, err_msg=str(k))


@pytest.mark.parametrize("zero", [True, False])
def test_device_step_zeroes_the_gradients_it_read_when_asked(zero):
    """zero_grads_after: the capturable step's kernel leaves every gradient at zero (the
    one-scatter training step relies on it instead of zeroing its buffer), and
    zeroes_grads() says so; without it, or on the eager path, gradients are kept."""
    pytest.importorskip("triton")
    from fastattrec.experimental.adam import TritonKerasAdam, fused_available

    if not fused_available([torch.zeros(1)]):
        pytest.skip("the Triton kernel runs on CUDA or in the interpreter")
    p0, q0, gp, gq = problem(seed=6, steps=1)
    for capturable in (True, False):
        p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        q = torch.nn.Parameter(torch.from_numpy(q0.copy()))
        opt = TritonKerasAdam([{"params": [p], "weight_decay": 2e-6},
                               {"params": [q], "weight_decay": 0.0}],
                              lr=LR, betas=(B1, B2), eps=EPS, capturable=capturable,
                              fused=True, zero_grads_after=zero)
        p.grad, q.grad = torch.from_numpy(gp[0].copy()), torch.from_numpy(gq[0].copy())
        opt.step()
        cleared = zero and capturable
        assert opt.zeroes_grads() == cleared
        assert (not p.grad.any() and not q.grad.any()) == cleared
        np.testing.assert_allclose(p.detach().numpy(), keras_adam_numpy(p0, gp, 2e-6),
                                   rtol=2e-6, atol=1e-9)


def test_copies_keep_the_zeroing_flag_and_device_step_needs_capturable():
    import copy

    from fastattrec.experimental.adam import TritonKerasAdam

    p = torch.nn.Parameter(torch.zeros(3))
    opt = TritonKerasAdam([p], capturable=True, zero_grads_after=True)
    dup = copy.deepcopy(opt)
    assert dup.zero_grads_after and dup.step_counters() == []
    with pytest.raises(RuntimeError, match="capturable=True"):
        TritonKerasAdam([p]).device_step()
