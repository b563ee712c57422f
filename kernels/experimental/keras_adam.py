"""Adam with Keras's epsilon placement: one Triton launch for up to four parameters.

The CUDA-graph training step used to run the optimiser as ~35 foreach launches (weight
decay, two moment updates, sqrt, eps, bias correction on the device, the update). This
kernel does all of it in one pass over each parameter: it reads the step count from the
device, so it can be captured in a CUDA graph, computes the bias correction in float64
from the per-group constants, updates m, v and the parameter in float32 exactly as the
foreach path does, and can zero the gradient after reading it. One launch covers up to
SLOTS parameters, each with its own constants (so both of AttRec's groups, the tables
with weight decay and the projection without, go in one launch): program ranges are
assigned to the parameters in turn. The step counters are incremented by the caller
afterwards (one foreach launch), so every program of every launch sees the same step.

    m = m + (1 - b1) (g + wd p - m);   v = b2 v + (1 - b2) (g + wd p)^2
    p = p - lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
"""

from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from ..launch import KernelSpec

BLOCK = 1024
SLOTS = 4  # parameters one launch updates
# Layout of the per-group constants tensor (float64). 1 - b1 and 1 - b2 are computed on
# the host in float64: in float32, 1 - 0.999 loses five digits to cancellation.
LR, ONE_MINUS_B1, B2, ONE_MINUS_B2, LOG_B1, LOG_B2, EPS, WD = range(8)


@triton.jit
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, c_ptr, n, block,
                ZERO_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """Block `block` of one parameter of n elements."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    t = tl.load(step_ptr).to(tl.float64) + 1.0  # the step being taken
    lr = tl.load(c_ptr + 0)
    w1 = tl.load(c_ptr + 1).to(tl.float32)  # 1 - b1
    b2 = tl.load(c_ptr + 2).to(tl.float32)
    w2 = tl.load(c_ptr + 3).to(tl.float32)  # 1 - b2
    eps = tl.load(c_ptr + 6).to(tl.float32)
    wd = tl.load(c_ptr + 7).to(tl.float32)
    corr1 = 1.0 - tl.exp(t * tl.load(c_ptr + 4))  # 1 - b1^t, in float64
    corr2 = 1.0 - tl.exp(t * tl.load(c_ptr + 5))
    alpha = (lr * tl.sqrt(corr2) / corr1).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0) + wd * p
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    m = m + w1 * (g - m)
    v = v * b2 + w2 * (g * g)
    p = p - (m * alpha) / (tl.sqrt(v) + eps)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)
    if ZERO_GRAD:
        tl.store(g_ptr + offs, tl.zeros_like(g), mask=mask)


@triton.jit
def _keras_adam(p0, g0, m0, v0, s0, c0, n0, p1, g1, m1, v1, s1, c1, n1,
                p2, g2, m2, v2, s2, c2, n2, p3, g3, m3, v3, s3, c3, n3, e0, e1, e2,
                ZERO_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    # up to SLOTS parameters in one launch: programs [0, e0) update parameter 0,
    # [e0, e1) parameter 1, [e1, e2) parameter 2, the rest parameter 3
    pid = tl.program_id(0)
    if pid < e0:
        _adam_block(p0, g0, m0, v0, s0, c0, n0, pid, ZERO_GRAD, BLOCK)
    elif pid < e1:
        _adam_block(p1, g1, m1, v1, s1, c1, n1, pid - e0, ZERO_GRAD, BLOCK)
    elif pid < e2:
        _adam_block(p2, g2, m2, v2, s2, c2, n2, pid - e1, ZERO_GRAD, BLOCK)
    else:
        _adam_block(p3, g3, m3, v3, s3, c3, n3, pid - e2, ZERO_GRAD, BLOCK)


def group_constants(lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                    device: torch.device) -> torch.Tensor:
    """The float64 constants a group's launches read (log(b) precomputed exactly)."""
    b1, b2 = betas
    return torch.tensor([lr, 1.0 - b1, b2, 1.0 - b2, math.log(b1), math.log(b2), eps,
                         weight_decay], dtype=torch.float64, device=device)


def keras_adam_(params: list[torch.Tensor], grads: list[torch.Tensor],
                exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                steps: list[torch.Tensor], consts: torch.Tensor | list[torch.Tensor],
                zero_grad: bool = False) -> None:
    """One Keras-Adam step of every parameter in place, SLOTS parameters per launch (one
    launch for AttRec's four); `steps` are the parameters' step counters, read but not
    incremented here; `consts` the group constants (`group_constants`), one tensor for
    all parameters or one per parameter."""
    consts = list(consts) if isinstance(consts, list | tuple) else [consts] * len(params)
    rows = list(zip(params, grads, exp_avgs, exp_avg_sqs, steps, consts, strict=True))
    for p, g, m, v, _, _ in rows:
        if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous()
                and v.is_contiguous()):
            raise ValueError("keras_adam_ needs contiguous parameters, gradients and moments")
        if p.dtype != torch.float32 or g.dtype != torch.float32:
            raise ValueError("keras_adam_ updates float32 parameters")
    rows = [r for r in rows if r[0].numel()]
    for i in range(0, len(rows), SLOTS):
        chunk = rows[i:i + SLOTS]
        ends = list(itertools.accumulate(triton.cdiv(r[0].numel(), BLOCK) for r in chunk))
        args = []
        for p, g, m, v, st, c in chunk + [chunk[0]] * (SLOTS - len(chunk)):
            args += [p, g, m, v, st, c, p.numel()]  # (unused slots repeat the first)
        bounds = (ends + [ends[-1]] * SLOTS)[:SLOTS - 1]
        _keras_adam[(ends[-1],)](*args, *bounds, ZERO_GRAD=zero_grad, BLOCK=BLOCK)


def resource_specs() -> list[KernelSpec]:
    """The kernel as `keras_adam_` launches it (for benchmarks/kernel_resources.py)."""
    ptrs = {f"{a}{k}": "*fp32" for a in "pgmvs" for k in range(SLOTS)}
    ptrs.update({f"c{k}": "*fp64" for k in range(SLOTS)})
    return [KernelSpec("keras_adam", (BLOCK,), _keras_adam, {"ZERO_GRAD": False,
                                                              "BLOCK": BLOCK},
                       num_warps=4, types=ptrs)]
