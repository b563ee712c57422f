"""`--kernel auto` on CUDA: time the candidate attention kernels inside the run's own
training step on this GPU, keep the faster (as cuDNN's benchmark mode and Triton's
autotuner do).

Each candidate's step is built as the run would build it (the compiled CUDA-graph step,
one process), run for a few warm-up steps, then timed; a candidate that fails to compile
or run is dropped with a one-line warning. The choice and every timing go into
config.json (`kernel_choice`), and a resumed run keeps the recorded choice.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fastattrec.errors import first_error_line

TIMED_STEPS = 20
WARM_STEPS = 3


def time_step(step: Callable[[int], None], device: torch.device,
              steps: int = TIMED_STEPS, warm: int = WARM_STEPS) -> float:
    """Median seconds of one call of `step` (after `warm` untimed calls); on CUDA each
    call is timed with events on the current stream."""
    for i in range(warm):
        step(i)
    times = []
    for i in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def choose_kernel(candidates: list[str], measure: Callable[[str], float],
                  combine: Callable[[dict[str, float]], dict[str, float]] | None = None
                  ) -> tuple[str, dict[str, Any]]:
    """The fastest of `candidates` by `measure(kernel) -> seconds per step`.

    Returns (kernel, the record for config.json). A candidate
    whose measure raises is dropped with a warning (its error recorded); `combine`
    merges the timings of several processes (every rank must choose the same). When
    every candidate fails, the last error is raised."""
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    last: Exception | None = None
    for k in candidates:
        try:
            seconds[k] = measure(k)
        except Exception as e:  # noqa: BLE001 - a kernel that fails here is not chosen
            first = first_error_line(e)
            warnings.warn(f"--kernel auto: the {k} attention failed on this device "
                          f"({first}); not using it", stacklevel=2)
            failed[k], last = first, e
            seconds[k] = float("inf")
    if combine is not None:
        seconds = combine(seconds)
    ok = {k: s for k, s in seconds.items() if s != float("inf")}
    if not ok:
        raise last if last is not None else RuntimeError("no kernel to choose from")
    best = min(ok, key=ok.get)
    record = {"chosen": best, "seconds_per_step": {k: ok[k] for k in ok},
              "steps_timed": TIMED_STEPS, **({"failed": failed} if failed else {})}
    return best, record
