"""Test-wide set-up: Triton kernels run in Triton's CPU interpreter when no GPU is here.

The interpreter is chosen when Triton decorates the kernels, so the variable is set
before any test imports `fastattrec.kernels.attention`.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


