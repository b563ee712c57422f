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


class _StructuredAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, w, pos):
        b, l, d = x.shape
        z = x + pos  # (B, L, d)
        h = (z.reshape(b * l, d) @ w).reshape(b, l, d)  # one projection for Q and K
        q = torch.relu(h)
        s = torch.einsum("bid,bjd->bij", q, q) * (1.0 / math.sqrt(d))  # (B, L, L)
        s = s.masked_fill(~mask[:, None, :], MASKED_LOGIT)
        a = torch.softmax(s, dim=-1)
        p_bar = a.mean(dim=1)  # (B, L) column means
        ctx.save_for_backward(x, mask, w, z, h, a, p_bar)
        return torch.einsum("bl,bld->bd", p_bar, x)  # (B, d)

    @staticmethod
    def backward(ctx, grad):
        x, mask, w, z, h, a, p_bar = ctx.saved_tensors
        b, l, d = x.shape
        grad = grad.contiguous()
        da = (x * grad[:, None, :]).sum(-1) / l  # (B, L): dA_ij, the same for every i
        rows = (a * da[:, None, :]).sum(-1, keepdim=True)  # (B, L, 1)
        ds = (a * (da[:, None, :] - rows)).masked_fill(~mask[:, None, :], 0.0)
        m = (ds + ds.transpose(1, 2)) * (1.0 / math.sqrt(d))  # (B, L, L)
        dh = torch.bmm(m, torch.relu(h)) * (h > 0)  # (B, L, d)
        dh_flat = dh.reshape(b * l, d)
        dx = (dh_flat @ w.T).reshape(b, l, d) + p_bar[:, :, None] * grad[:, None, :]
        dw = z.reshape(b * l, d).T @ dh_flat
        return dx, None, dw, None


def short_term_attention_structured(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                                    pos: torch.Tensor) -> torch.Tensor:
    """Same contract as `short_term_attention_reference`; (B, L, d) -> (B, d)."""
    return _StructuredAttention.apply(x, mask, w, pos)
