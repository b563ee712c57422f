"""Short-term attention with the projections in cuBLAS and the rest fused in Triton.

A second layout of the same computation as `attention.py`, kept beside it so that one
GPU run can time both (`benchmarks/bench_kernel.py --variants fused split`). Why: at
d = 100 the three d x d products (the projection, dH W^T and the dW reduction) are almost
all of the arithmetic, and in IEEE float32 they run on the FMA units, where cuBLAS's tuned
SGEMM is the fastest code there is; everything else is a few passes over memory.

Forward:  Hx = X_flat W (cuBLAS), PW = P W (L x d, tiny), then one Triton pass per block
          of windows: Q = relu(Hx + PW), S = Q Q^T / sqrt(d), masked softmax, p_bar,
          short = p_bar^T X. Hx is kept for the backward (B L d floats, like X).
Backward: one Triton pass recomputes A from Hx, writes dH = (M Q) * [H > 0] and the value
          path p_bar g^T into dX; then cuBLAS adds dH W^T into dX in place, and
          dW = X_flat^T dH_flat + P^T (sum_b dH_b) is one more product. No atomics.

Windows up to 64 rows (next power of two) only; longer ones use `attention.py`'s long
kernels.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .attention import (
    PRECISIONS,
    _as_bytes,
    _block_rows,
    _block_softmax,
    _check,
    _grad_buffers,
    _is_long,
    _load_rows,
    _matmul_precision,
    _meta,
    _pick,
    _score_grad,
    _store_short,
    _weight_grad,
    short_term_attention_triton,
)


@triton.jit
def _split_probs(h_ptr, pw_ptr, mask_ptr, b0, B, scale,
                 L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax matrix A of the block's windows from the saved projection Hx (+ P W)."""
    wl, gw, grow, prow, row_ok, key_ok = _block_rows(mask_ptr, b0, B, L, WPB, BLOCK_R)
    s = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_D):
        h = _load_rows(h_ptr, grow, row_ok, n0, D, BLOCK_D)
        h += _load_rows(pw_ptr, prow, row_ok, n0, D, BLOCK_D)
        q = tl.maximum(h, 0.0)
        s += tl.dot(q, tl.trans(q), input_precision=PRECISION)
    a, same = _block_softmax(s * scale, wl, row_ok, key_ok)
    return a, wl, gw, grow, prow, row_ok, key_ok, same


@triton.jit
def _split_fwd(h_ptr, pw_ptr, x_ptr, mask_ptr, out_ptr, B, scale,
               L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr, WB: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    b0 = tl.program_id(0) * WPB
    a, wl, gw, grow, prow, row_ok, key_ok, same = _split_probs(
        h_ptr, pw_ptr, mask_ptr, b0, B, scale, L, D, WPB, BLOCK_R, BLOCK_D, PRECISION)
    p_bar = tl.sum(a, axis=0) / L
    _store_short(x_ptr, out_ptr, p_bar, wl, grow, row_ok, b0, B, D, WPB, WB, BLOCK_D,
                 PRECISION)


@triton.jit
def _split_bwd(h_ptr, pw_ptr, x_ptr, mask_ptr, g_ptr, dx_ptr, dh_ptr, B, scale,
               L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dH and the value path of dX (p_bar_j g_{w(j)}); dH W^T is added by cuBLAS."""
    b0 = tl.program_id(0) * WPB
    a, wl, gw, grow, prow, row_ok, key_ok, same = _split_probs(
        h_ptr, pw_ptr, mask_ptr, b0, B, scale, L, D, WPB, BLOCK_R, BLOCK_D, PRECISION)
    p_bar = tl.sum(a, axis=0) / L
    msym = _score_grad(a, x_ptr, g_ptr, grow, gw, row_ok, key_ok, same, scale, L, D, BLOCK_R,
                       BLOCK_D)
    for n0 in range(0, D, BLOCK_D):
        h = _load_rows(h_ptr, grow, row_ok, n0, D, BLOCK_D)
        h += _load_rows(pw_ptr, prow, row_ok, n0, D, BLOCK_D)
        dq = tl.dot(msym, tl.maximum(h, 0.0), input_precision=PRECISION)
        cols = n0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        tl.store(dh_ptr + grow[:, None] * D + cols[None, :], tl.where(h > 0, dq, 0.0), mask=ok)
        value = p_bar[:, None] * _load_rows(g_ptr, gw, row_ok, n0, D, BLOCK_D)
        tl.store(dx_ptr + grow[:, None] * D + cols[None, :], value, mask=ok)


def _split_candidates(length: int, dim: int) -> list[tuple[int, int, int]]:
    """(BLOCK_R, BLOCK_D, num_warps): without the projection in the program, small blocks
    (little block-diagonal waste in Q Q^T) are worth trying."""
    full_d = max(16, triton.next_power_of_2(dim))
    need = max(16, triton.next_power_of_2(length))
    shapes = {(r, min(full_d, 128)) for r in (16, 32) if r >= need}
    shapes.add((max(need, 64), min(full_d, 64)))
    return [(r, bd, 4 if r * bd <= 2048 else 8) for r, bd in sorted(shapes)]


def split_forward(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, pos: torch.Tensor,
                  precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(short (B, d), Hx (B, L, d) = X W, kept for the backward)."""
    _check(x, mask, w, pos)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    b, length, dim = x.shape
    with _matmul_precision(precision):
        hx = (x.view(b * length, dim) @ w).view(b, length, dim)  # cuBLAS
        pw = (pos @ w).contiguous()  # (L, d)
    out = torch.empty((b, dim), dtype=x.dtype, device=x.device)
    if b == 0:
        return out, hx
    mask8 = _as_bytes(mask)

    def run(cfg):
        meta = _meta(cfg, length)
        grid = (triton.cdiv(b, meta["WPB"]),)
        _split_fwd[grid](hx, pw, x, mask8, out, b, 1.0 / math.sqrt(dim), L=length, D=dim,
                         PRECISION=precision, **meta)

    run(_pick("split_fwd", length, dim, precision, b, run, _split_candidates(length, dim)))
    return out, hx


def split_backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                   pos: torch.Tensor, hx: torch.Tensor,
                   precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, L, d), dw (d, d)) for upstream gradient `grad` (B, d)."""
    b, length, dim = x.shape
    grad, dx, dh = _grad_buffers(grad, x)
    if b == 0:
        return dx, torch.zeros_like(w)
    mask8 = _as_bytes(mask)
    with _matmul_precision(precision):
        pw = (pos @ w).contiguous()

    def run(cfg):
        meta = _meta(cfg, length)
        meta.pop("WB")
        grid = (triton.cdiv(b, meta["WPB"]),)
        _split_bwd[grid](hx, pw, x, mask8, grad, dx, dh, b, 1.0 / math.sqrt(dim), L=length,
                         D=dim, PRECISION=precision, **meta)

    run(_pick("split_bwd", length, dim, precision, b, run, _split_candidates(length, dim)))
    with _matmul_precision(precision):
        dx.view(b * length, dim).addmm_(dh.view(b * length, dim), w.T)  # dX += dH W^T
    return dx, _weight_grad(x, pos, dh, precision)


class _SplitAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, w, pos, precision):
        out, hx = split_forward(x, mask, w, pos, precision)
        ctx.save_for_backward(x, mask, w, pos, hx)
        ctx.precision = precision
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mask, w, pos, hx = ctx.saved_tensors
        dx, dw = split_backward(grad, x, mask, w, pos, hx, ctx.precision)
        return dx, None, dw, None, None


def short_term_attention_split(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                               pos: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """Same contract as `short_term_attention_triton`; projections in cuBLAS."""
    if _is_long(x.shape[1]):  # the long kernels of attention.py
        return short_term_attention_triton(x, mask, w, pos, precision)
    return _SplitAttention.apply(x, mask, w, pos, precision)
