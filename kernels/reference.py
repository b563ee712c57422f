"""The short-term attention of SPEC section 2 in plain torch: the executable spec.

Every other implementation (the Triton kernel) is checked against this one. It is written
to read like the SPEC, not to be fast:

    Q = relu((X + P) W)          one projection W, no bias; keys are the same Q
    S = Q Q^T / sqrt(d)          key column j set to -(2^32) + 1 where mask_j == 0
    O = softmax(S) X             values are X without the position encoding
    short = mean over all L rows of O   (padded query rows included)
"""

from __future__ import annotations

import math

import torch

MASKED_LOGIT = -(2.0**32) + 1.0  # rounds to -2^32 in float32, as in the original


def position_encoding(length: int, dim: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Sinusoidal encoding (L, d): P[p, 2i] = sin(p / 10000^(2i/d)), P[p, 2i+1] = cos(...).

    Positions count from the oldest slot of the window (p = 0 at the left edge).
    Computed in float64 and rounded once to `dtype`.
    """
    pos = torch.arange(length, dtype=torch.float64)[:, None]  # (L, 1)
    col = torch.arange(dim, dtype=torch.float64)[None, :]  # (1, d)
    angle = pos / torch.pow(10000.0, (2 * torch.div(col, 2, rounding_mode="floor")) / dim)
    enc = torch.where(col.long() % 2 == 0, torch.sin(angle), torch.cos(angle))  # (L, d)
    return enc.to(dtype=dtype, device=device)


def short_term_attention_reference(
    x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Short-term interest of each window.

    x: (B, L, d) window embeddings; mask: (B, L) bool, True where the slot holds an item;
    w: (d, d) projection; pos: (L, d) position encoding. Returns (B, d).
    """
    d = x.shape[-1]
    q = torch.relu((x + pos) @ w)  # (B, L, d); keys are identical
    s = q @ q.transpose(1, 2) / math.sqrt(d)  # (B, L, L)
    s = s.masked_fill(~mask[:, None, :], MASKED_LOGIT)  # mask key columns
    a = torch.softmax(s, dim=-1)  # (B, L, L)
    o = a @ x  # (B, L, d)
    return o.mean(dim=1)  # (B, d)
