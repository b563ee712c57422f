"""The one-launch step bookkeeping against the arithmetic written out in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
from fastattrec.kernels.launch import interpreted  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreted():
    pytest.skip("the kernel runs on CUDA or in the interpreter", allow_module_level=True)

from fastattrec.kernels.experimental.step_tail import step_tail_  # noqa: E402


@pytest.mark.parametrize("inner", [True, False], ids=["inner", "dist"])
def test_adds_the_batch_sum_and_counts_the_step(inner):
    loss, count = np.float32(0.3), np.float32(7.0)
    total = torch.tensor(0.25, dtype=torch.float64, device=DEVICE)
    step = torch.tensor(4, device=DEVICE)
    for _ in range(2):
        step_tail_(torch.tensor(loss, device=DEVICE), torch.tensor(count, device=DEVICE),
                   total, step, inner)
    batch = np.float64(loss * count) if inner else np.float64(loss)  # float32 product
    assert total.item() == 0.25 + batch + batch
    assert step.item() == 6


def test_bad_arguments_are_refused():
    one = torch.tensor(1.0, device=DEVICE)
    total = torch.zeros((), dtype=torch.float64, device=DEVICE)
    step = torch.zeros((), dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="loss_sum must be"):
        step_tail_(one, one, total.float(), step, True)
    with pytest.raises(ValueError, match="count must be"):
        step_tail_(one, torch.ones(2, device=DEVICE), total, step, True)
    with pytest.raises(ValueError, match="step must be"):
        step_tail_(one, one, total, step.int(), True)


def test_partial_sums_are_added_in_float64():
    from fastattrec.kernels.experimental.step_tail import step_tail_parts_

    parts = np.random.default_rng(0).normal(size=700).astype(np.float32)  # 3 loop trips
    total = torch.tensor(1.0, dtype=torch.float64, device=DEVICE)
    step = torch.tensor(2, device=DEVICE)
    step_tail_parts_(torch.from_numpy(parts).to(DEVICE), total, step)
    assert total.item() == pytest.approx(1.0 + parts.astype(np.float64).sum(), rel=1e-15)
    assert step.item() == 3
    with pytest.raises(ValueError, match="parts must be"):
        step_tail_parts_(torch.zeros(3, dtype=torch.float64, device=DEVICE), total, step)


def test_optimiser_counters_are_counted_too():
    from fastattrec.kernels.experimental.step_tail import step_tail_parts_

    total = torch.zeros((), dtype=torch.float64, device=DEVICE)
    step = torch.tensor(0, device=DEVICE)
    counters = [torch.tensor(float(k), device=DEVICE) for k in (3, 3, 5)]
    for _ in range(2):
        step_tail_parts_(torch.ones(3, device=DEVICE), total, step, counters)
    assert [c.item() for c in counters] == [5.0, 5.0, 7.0]
    assert step.item() == 2 and total.item() == 6.0
    with pytest.raises(ValueError, match="counters must be"):
        step_tail_parts_(torch.ones(3, device=DEVICE), total, step, counters * 2)
