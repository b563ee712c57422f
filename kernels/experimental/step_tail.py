"""A training step's bookkeeping in one launch: the batch's summed loss and the counter.

After the optimiser, a step adds its batch's summed per-sample loss to the epoch's float64
total (the mean loss times the sample count in mode inner, the sum itself in mode dist)
and counts itself. In torch ops that is four launches (a product, a cast, an addition,
an increment) doing one number's arithmetic each; here it is one program that does the
same operations in the same order, so the same bits. `step_tail_parts_` does the same
from a loss kernel's per-program sums (`pair_loss.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import KernelSpec

MAX_COUNTERS = 4  # the optimiser's step counters one `step_tail_parts_` launch counts


@triton.jit
def _step_tail(loss_ptr, count_ptr, sum_ptr, step_ptr, INNER: tl.constexpr):
    loss = tl.load(loss_ptr)  # float32: the batch's mean (inner) or sum (dist)
    if INNER:
        loss = loss * tl.load(count_ptr)
    tl.store(sum_ptr, tl.load(sum_ptr) + loss.to(tl.float64))
    tl.store(step_ptr, tl.load(step_ptr) + 1)


@triton.jit
def _step_tail_parts(part_ptr, n, sum_ptr, step_ptr, c0, c1, c2, c3,
                     COUNTERS: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for i0 in range(0, n, BLOCK):  # BLOCK partials at a time, lanes added in order
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + i, mask=i < n, other=0.0).to(tl.float64)
    tl.store(sum_ptr, tl.load(sum_ptr) + tl.sum(acc, axis=0))
    tl.store(step_ptr, tl.load(step_ptr) + 1)
    # the optimiser's float32 step counters (up to four), counted here, after its launch
    if COUNTERS > 0:
        tl.store(c0, tl.load(c0) + 1.0)
    if COUNTERS > 1:
        tl.store(c1, tl.load(c1) + 1.0)
    if COUNTERS > 2:
        tl.store(c2, tl.load(c2) + 1.0)
    if COUNTERS > 3:
        tl.store(c3, tl.load(c3) + 1.0)


def step_tail_parts_(parts: torch.Tensor, loss_sum: torch.Tensor, step: torch.Tensor,
                     counters: list[torch.Tensor] | None = None) -> None:
    """loss_sum (float64, 0-d) += the sum of parts (float32, a loss kernel's per-program
    sums of its samples' losses), in float64 and a fixed order; step (int64, 0-d) += 1;
    and each of `counters` (up to four float32 0-d tensors: an optimiser's step counts)
    += 1."""
    if parts.dim() != 1 or parts.dtype != torch.float32 or parts.device != loss_sum.device:
        raise ValueError(f"parts must be a float32 vector on {loss_sum.device}")
    if (loss_sum.numel(), loss_sum.dtype, step.numel(), step.dtype) != (
            1, torch.float64, 1, torch.int64) or step.device != loss_sum.device:
        raise ValueError("loss_sum must be one float64 number and step one int64 number, on "
                         "one device")
    counters = list(counters or [])
    if len(counters) > MAX_COUNTERS or any(
            c.numel() != 1 or c.dtype != torch.float32 or c.device != step.device
            for c in counters):
        raise ValueError(f"counters must be up to {MAX_COUNTERS} float32 numbers on "
                         f"{step.device}")
    ptrs = counters + [step] * (MAX_COUNTERS - len(counters))  # (unused slots not touched)
    block = min(256, max(16, triton.next_power_of_2(parts.shape[0])))
    _step_tail_parts[(1,)](parts, parts.shape[0], loss_sum, step, *ptrs,
                           COUNTERS=len(counters), BLOCK=block, num_warps=1)


def step_tail_(loss: torch.Tensor, count: torch.Tensor, loss_sum: torch.Tensor,
               step: torch.Tensor, inner: bool) -> None:
    """loss_sum (float64, 0-d) += float64(loss * count if inner else loss) and step
    (int64, 0-d) += 1, in place, from the 0-d float32 loss and count."""
    for name, t, dtype in (("loss", loss, torch.float32), ("count", count, torch.float32),
                           ("loss_sum", loss_sum, torch.float64), ("step", step, torch.int64)):
        if t.numel() != 1 or t.dtype != dtype or t.device != loss_sum.device:
            raise ValueError(f"{name} must be one {dtype} number on {loss_sum.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    _step_tail[(1,)](loss.detach(), count, loss_sum, step, INNER=inner, num_warps=1)


def resource_specs() -> list[KernelSpec]:
    """The kernel as `step_tail_` launches it (for benchmarks/kernel_resources.py)."""
    types = {"sum_ptr": "*fp64", "step_ptr": "*i64"}
    return [KernelSpec("step_tail", (), _step_tail, {"INNER": True}, num_warps=1,
                       types=types),
            KernelSpec("step_tail_parts", (256,), _step_tail_parts,
                       {"BLOCK": 256, "COUNTERS": 4}, num_warps=1,
                       types={**types, **{f"c{k}": "*fp32" for k in range(4)}})]


__all__ = ["resource_specs", "step_tail_", "step_tail_parts_"]
