"""A numpy model of each precision mode's operand rounding: what error a mode must have.

Triton's interpreter computes every `tl.dot` in full float32, whatever its input precision,
so the rounding error of a tensor-core mode cannot be seen on a CPU by running the kernel.
This module computes the kernel's formula in float32 numpy with each low-precision product
modelled by rounding its operands first, the way the tensor cores see them:

- "ieee": no rounding (float32 products, float32 accumulation);
- "tf32": both operands rounded to TF32 (10 explicit mantissa bits);
- "tf32x3": each operand split into hi = tf32(a), lo = tf32(a - hi); the product is
  lo_a hi_b + hi_a lo_b + hi_a hi_b (the lo lo term, ~2^-22 relative, is dropped);
- "bf16x3": the same with bfloat16 (7 explicit mantissa bits) halves.

`p_split=True` is the kernel's layout: H = X W + (P W) with P W computed once in float64
and rounded to float32, and dW = X^T dH + P^T (sum_b dH_b) with the position term in
float32. With `p_split=False` the position encoding is folded into X before the
low-precision product, so its rounding error repeats identically in every window and
adds up in dW instead of averaging out. Tests compare this model against float64 to show
which modes are float32-level; `benchmarks/precision_check.py` prints it on any machine.
"""

from __future__ import annotations

import math

import numpy as np

from ..modes import PRECISIONS as MODES


def round_tf32(a: np.ndarray) -> np.ndarray:
    """Round float32 values to TF32 (10 explicit mantissa bits), ties away from zero, as
    PTX's cvt.rna.tf32.f32 does; the result is a float32 with the low 13 bits zero."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (7 explicit mantissa bits), ties to even, as a
    float32 with the low 16 bits zero (finite inputs)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    bias = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    return ((u + bias) & np.uint32(0xFFFF0000)).view(np.float32)


def matmul(a: np.ndarray, b: np.ndarray, mode: str) -> np.ndarray:
    """a @ b (float32 accumulation) with the operands rounded as `mode`'s products see
    them."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if mode == "ieee":
        return a @ b
    if mode == "tf32":
        return round_tf32(a) @ round_tf32(b)
    if mode in ("tf32x3", "bf16x3"):
        rnd = round_tf32 if mode == "tf32x3" else round_bf16
        a_hi, b_hi = rnd(a), rnd(b)
        a_lo, b_lo = rnd(a - a_hi), rnd(b - b_hi)
        return (a_lo @ b_hi + a_hi @ b_lo) + a_hi @ b_hi
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def attention_emulated(x: np.ndarray, mask: np.ndarray, w: np.ndarray, pos: np.ndarray,
                       grad: np.ndarray, mode: str, p_split: bool = True
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(out (B, d), dx (B, L, d), dw (d, d)) of the short-term attention, computed in
    float32 with the kernel's three d x d products rounded as `mode` rounds them.

    The per-window L x L work (scores, softmax, p_bar, dS, M, dQ = M Q) and the value
    path p_bar^T X are plain float32, as in the kernel. x: (B, L, d), mask: (B, L) bool,
    w: (d, d), pos: (L, d), grad: (B, d) upstream gradient.
    """
    x = np.asarray(x, dtype=np.float32)
    w = np.asarray(w, dtype=np.float32)
    pos32 = np.asarray(pos, dtype=np.float32)
    grad = np.asarray(grad, dtype=np.float32)
    b, length, d = x.shape
    scale = np.float32(1.0 / math.sqrt(d))
    x_flat = x.reshape(b * length, d)
    if p_split:
        pw = (pos32.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)  # (L, d)
        h = matmul(x_flat, w, mode).reshape(b, length, d) + pw[None]
    else:
        z = (x + pos32[None]).reshape(b * length, d)
        h = matmul(z, w, mode).reshape(b, length, d)
    q = np.maximum(h, 0)  # (B, L, d)
    s = np.einsum("bid,bjd->bij", q, q) * scale  # (B, L, L)
    s = np.where(mask[:, None, :], s, np.float32(-(2.0**32) + 1.0))
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    a = e / e.sum(axis=-1, keepdims=True)  # (B, L, L)
    p_bar = a.mean(axis=1)  # (B, L)
    out = np.einsum("bl,bld->bd", p_bar, x)
    c = np.einsum("bld,bd->bl", x, grad) / np.float32(length)  # dA_ij = c_j
    rows = (a * c[:, None, :]).sum(-1, keepdims=True)
    ds = np.where(mask[:, None, :], a * (c[:, None, :] - rows), 0)
    m = (ds + ds.transpose(0, 2, 1)) * scale  # (B, L, L)
    dh = np.einsum("bij,bjd->bid", m, q) * (h > 0)  # (B, L, d)
    dh_flat = dh.reshape(b * length, d)
    dx = matmul(dh_flat, w.T, mode).reshape(b, length, d) + p_bar[:, :, None] * grad[:, None]
    if p_split:
        # sum over windows pairwise (numpy sums a contiguous axis pairwise), as the
        # kernel's per-program partial sums do
        dh_sum = np.ascontiguousarray(dh.reshape(b, length * d).T).sum(axis=1)
        dw = matmul(x_flat.T, dh_flat, mode) + pos32.T @ dh_sum.reshape(length, d)
    else:
        dw = matmul((x + pos32[None]).reshape(b * length, d).T, dh_flat, mode)
    return out, dx, dw.astype(np.float32)


__all__ = ["MODES", "attention_emulated", "matmul", "round_bf16", "round_tf32"]
