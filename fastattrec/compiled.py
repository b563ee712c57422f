"""torch.compile for one training run.

torch keeps at most `torch._dynamo.config.recompile_limit` (8) compiled versions of a
function's code per process and then runs that function eagerly, with one logged
warning. A process that trains many runs of different shapes (`fastattrec tune`,
benchmarks/quality.py, a user's own loop over `fastattrec.train`) would so train its
later runs uncompiled, at a fraction of the speed. `compile_for_run` first forgets what
earlier runs compiled of the function's code, so every run compiles its own versions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def compile_for_run(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """torch.compile(fn, **options), after dropping the compiled versions of fn's code
    that earlier calls left in this process (a step still holding one compiles it again
    on its next call: the same result, a recompilation later)."""
    code = getattr(fn, "__code__", None)
    forget = getattr(torch._dynamo, "reset_code", None)  # (present in torch >= 2.1)
    if code is not None and forget is not None:
        forget(code)
    return torch.compile(fn, **options)
