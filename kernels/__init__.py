"""Short-term attention kernels, behind one entry point.

`short_term_attention(x, mask, w, pos, backend=...)` computes SPEC section 2's short-term
interest. Backends:

- "torch": the reference in `reference.py` (any device): the executable spec;
- "triton": the fused kernel in `attention.py` (CUDA tensors, or CPU tensors under
  TRITON_INTERPRET=1);
- "structured": the kernel's algorithm in torch ops with a hand-written backward
  (`structured.py`), about 1.3x faster than the reference on CPU;
- "auto": Triton on CUDA tensors when Triton imports, "structured" elsewhere.

`resolve_backend` says which one a call will use, so callers can log it.
"""

from __future__ import annotations

import os

import torch

from .modes import FLOAT32_LEVEL, PRECISIONS, TENSOR_CORE, check_precision
from .reference import (
    MASKED_LOGIT,
    position_encoding,
    short_term_attention_reference,
)

BACKENDS = ("auto", "triton", "torch", "structured")

__all__ = [
    "BACKENDS",
    "FLOAT32_LEVEL",
    "MASKED_LOGIT",
    "PRECISIONS",
    "TENSOR_CORE",
    "position_encoding",
    "resolve_backend",
    "short_term_attention",
    "short_term_attention_reference",
    "triton_available",
]


def triton_available() -> bool:
    """True when the Triton kernel can be imported here (Triton installed)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that `short_term_attention` will run for tensors on `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "structured"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package; install it or "
                               "use backend 'torch'")
        if device.type != "cuda" and not _interpreted():
            raise RuntimeError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                               "to run the kernel on CPU in Triton's interpreter)")
    return backend


def short_term_attention(
    x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, pos: torch.Tensor,
    backend: str = "auto", precision: str = "ieee",
) -> torch.Tensor:
    """Short-term interest (B, d) of windows x (B, L, d) with key mask (B, L).

    w: (d, d) projection, pos: (L, d) position encoding. `precision` applies to the Triton
    backend's d x d products (`precision.py`): "ieee" (float32 on the FMA units, the
    default), "tf32x3" and "bf16x3" (split operands on tensor cores, float32-level by the
    emulation), or "tf32" (one tensor-core pass, about 3e-3 relative error on dW). The
    other backends compute in the inputs' dtype and ignore it.
    """
    check_precision(precision)
    chosen = resolve_backend(backend, x.device)
    if chosen == "torch":
        return short_term_attention_reference(x, mask, w, pos)
    if chosen == "structured":
        from .structured import short_term_attention_structured

        return short_term_attention_structured(x, mask, w, pos)
    from .attention import short_term_attention_triton

    return short_term_attention_triton(x, mask, w, pos, precision=precision)
