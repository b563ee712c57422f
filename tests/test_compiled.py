"""compile_for_run: a process that compiles the step of many runs of different shapes
(fastattrec tune, benchmarks/quality.py) keeps compiling each, where plain torch.compile
reaches torch's per-function recompile limit and runs the rest eagerly."""

from __future__ import annotations

import logging

import pytest
import torch

from fastattrec.compiled import compile_for_run


def double_plus_one(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


class Step:
    def grads(self, x: torch.Tensor) -> torch.Tensor:
        return x - 1


@pytest.fixture
def dynamo_warnings():
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    yield seen
    logger.removeHandler(handler)


@pytest.mark.parametrize("compile_fn,limit_hit", [(torch.compile, True),
                                                  (compile_for_run, False)],
                         ids=["torch.compile", "compile_for_run"])
def test_many_runs_of_other_shapes_stay_compiled(dynamo_warnings, compile_fn, limit_hit):
    """Twelve 'runs', each compiling a function and a bound method anew for its own input
    size (the eager backend: dynamo's caching without Inductor's cost), all correct."""
    runs = torch._dynamo.config.recompile_limit + 4
    for n in range(1, runs + 1):
        x = torch.arange(float(n))
        f = compile_fn(double_plus_one, backend="eager", dynamic=False)
        g = compile_fn(Step().grads, backend="eager", dynamic=False)
        assert torch.equal(f(x), x * 2 + 1) and torch.equal(g(x), x - 1)
    hit = any("recompile_limit" in m for m in dynamo_warnings)
    assert hit == limit_hit, dynamo_warnings
