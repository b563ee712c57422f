"""The fused kernel's algorithm in plain torch ops, with its analytic backward.

This is the CPU fast path. It computes exactly what `reference.py` computes, but uses the
structure the Triton kernel uses: keys equal queries (one projection), the mean over
query rows is p_bar^T X with p_bar the column means of the softmax (the (L, d) output O is
never formed), and the backward is written out by hand, so autograd never differentiates
the batched Q Q^T product (whose generic backward runs slow, oddly-strided batched
matrix products on CPU). Checked against the reference by the same tests as the kernel.

Backward, per window (c = dL/dshort):
    dp_bar_j = <c, x_j>;  dA_ij = dp_bar_j / L;  dS = A * (dA - rowsum(A * dA))
    dS[:, j] = 0 where key j is masked;  M = (dS + dS^T) / sqrt(d)
    dQ = M Q;  dH = dQ * [H > 0];  dX = dH W^T + p_bar c^T;  dW = sum_b (X_b + P)^T dH_b
"""

from __future__ import annotations

import math

import torch

from .reference import MASKED_LOGIT

# Windows up to this length use broadcast sums inside torch.compile; longer ones `bmm`.
# Measured on 2 CPU cores, ML-100K, the compiled CPU step side by side (docs/RESULTS.md):
# at L = 5 the broadcast form is faster (0.40-0.53 s against 0.55-0.59 s an epoch), at
# L = 50 bmm is (3.7-4.7 s against 5.4-5.9 s).
FUSED_MAX_L = 8


def pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, I, K) x (B, J, K) -> (B, I, J), summed over K: inside torch.compile, for short
    windows, a broadcast sum, which Inductor fuses into its loops; else `bmm` (eagerly the
    broadcast would allocate (B, I, J, K))."""
    if torch.compiler.is_compiling() and a.shape[1] <= FUSED_MAX_L:
        return (a[:, :, None, :] * b[:, None, :, :]).sum(-1)
    return torch.bmm(a, b.transpose(1, 2))


def mix(m: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B, L, L) x (B, L, d) -> (B, L, d), the batched product m q (fused as `pairwise`)."""
    if torch.compiler.is_compiling() and m.shape[1] <= FUSED_MAX_L:
        return (m[:, :, :, None] * q[:, None, :, :]).sum(2)
    return torch.bmm(m, q)


def attend(x: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """The attention after the projection: window rows x (B, L, d), key mask (B, L) and
    h = (X + P) W (B, L, d) -> (B, d) short-term interest, and what `attend_backward`
    needs. Callers project as suits them (the CPU step through the item table)."""
    d = x.shape[-1]
    q = torch.relu(h)
    s = pairwise(q, q) * (1.0 / math.sqrt(d))  # (B, L, L), keys = queries
    s = s.masked_fill(~mask[:, None, :], MASKED_LOGIT)
    a = torch.softmax(s, dim=-1)
    p_bar = a.mean(dim=1)  # (B, L) column means
    out = (p_bar[:, :, None] * x).sum(1)  # (B, d) = p_bar^T X
    return out, (x, mask, h, q, a, p_bar)


def attend_backward(saved: tuple, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From c = dL/dshort (B, d): dH (B, L, d), the gradient at h, and p_bar c^T (B, L, d),
    the direct part of dX; then dX = dH W^T + p_bar c^T and dW = (X + P)^T dH."""
    x, mask, h, q, a, p_bar = saved
    l, d = x.shape[1], x.shape[2]
    da = (x * c[:, None, :]).sum(-1) / l  # (B, L): dA_ij, the same for every i
    rows = (a * da[:, None, :]).sum(-1, keepdim=True)  # (B, L, 1)
    ds = (a * (da[:, None, :] - rows)).masked_fill(~mask[:, None, :], 0.0)
    m = (ds + ds.transpose(1, 2)) * (1.0 / math.sqrt(d))  # (B, L, L)
    dh = mix(m, q) * (h > 0)  # (B, L, d)
    return dh, p_bar[:, :, None] * c[:, None, :]


def structured_forward(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                       pos: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(B, L, d) window rows -> (B, d) short-term interest, and what the backward needs."""
    b, l, d = x.shape
    z = (x + pos).reshape(b * l, d)  # (B·L, d)
    h = (z @ w).reshape(b, l, d)  # one projection for Q and K
    out, saved = attend(x, mask, h)
    return out, (*saved, z, w)


def structured_backward(saved: tuple, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dX (B, L, d) and dW (d, d) from dL/dshort (B, d); see the module docstring."""
    *inner, z, w = saved
    b, l, d = inner[0].shape
    dh, direct = attend_backward(tuple(inner), grad.contiguous())
    dh_flat = dh.reshape(b * l, d)
    dx = (dh_flat @ w.T).reshape(b, l, d) + direct
    return dx, z.T @ dh_flat


class _StructuredAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, w, pos):
        out, saved = structured_forward(x, mask, w, pos)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        dx, dw = structured_backward(ctx.saved_tensors, grad)
        return dx, None, dw, None


def short_term_attention_structured(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                                    pos: torch.Tensor) -> torch.Tensor:
    """Same contract as `short_term_attention_reference`; (B, L, d) -> (B, d)."""
    return _StructuredAttention.apply(x, mask, w, pos)
