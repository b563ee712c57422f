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


def structured_forward(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                       pos: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """(B, L, d) window rows -> (B, d) short-term interest, and what the backward needs."""
    b, l, d = x.shape
    z = x + pos  # (B, L, d)
    h = (z.reshape(b * l, d) @ w).reshape(b, l, d)  # one projection for Q and K
    q = torch.relu(h)
    s = torch.bmm(q, q.transpose(1, 2)) * (1.0 / math.sqrt(d))  # (B, L, L)
    s = s.masked_fill(~mask[:, None, :], MASKED_LOGIT)
    a = torch.softmax(s, dim=-1)
    p_bar = a.mean(dim=1)  # (B, L) column means
    out = torch.bmm(p_bar[:, None, :], x)[:, 0]  # (B, d) = p_bar^T X
    return out, (x, mask, w, z, h, a, p_bar)


def structured_backward(saved: tuple, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dX (B, L, d) and dW (d, d) from dL/dshort (B, d); see the module docstring."""
    x, mask, w, z, h, a, p_bar = saved
    b, l, d = x.shape
    grad = grad.contiguous()
    da = torch.bmm(x, grad[:, :, None])[:, :, 0] / l  # (B, L): dA_ij, the same for every i
    rows = (a * da[:, None, :]).sum(-1, keepdim=True)  # (B, L, 1)
    ds = (a * (da[:, None, :] - rows)).masked_fill(~mask[:, None, :], 0.0)
    m = (ds + ds.transpose(1, 2)) * (1.0 / math.sqrt(d))  # (B, L, L)
    dh = torch.bmm(m, torch.relu(h)) * (h > 0)  # (B, L, d)
    dh_flat = dh.reshape(b * l, d)
    dx = (dh_flat @ w.T).reshape(b, l, d) + p_bar[:, :, None] * grad[:, None, :]
    dw = z.reshape(b * l, d).T @ dh_flat
    return dx, dw


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
