"""The precision modes' names and properties, importable without Triton.

What each mode computes is in `precision.py` (the kernels' `mm`) and, as a numpy model
of its rounding, in `experimental/emulation.py`.
"""

from __future__ import annotations

PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3")
TENSOR_CORE = ("tf32", "tf32x3", "bf16x3")  # modes whose products must use tensor cores
# float32-level (relative error <= 1e-5 against float64 on out, dX and dW) by the numpy
# emulation at the training scale; the GPU check measures it again on the device
FLOAT32_LEVEL = ("ieee", "tf32x3", "bf16x3")


def check_precision(precision: str) -> None:
    """Raise ValueError naming the choices when `precision` is not a mode."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


__all__ = ["FLOAT32_LEVEL", "PRECISIONS", "TENSOR_CORE", "check_precision"]
