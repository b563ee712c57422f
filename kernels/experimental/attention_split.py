"""Short-term attention with the projections in cuBLAS and the rest fused in Triton.

A second layout of the same computation as `attention.py`, kept beside it so that one
GPU run can time both (`benchmarks/bench_kernel.py --impls triton split`). Why: at
d = 100 the three d x d products (the projection, dH W^T and the dW reduction) are almost
all of the arithmetic, and in IEEE float32 they run on the FMA units, where cuBLAS's tuned
SGEMM is the fastest code there is; everything else is a few passes over memory.

Forward:  Hx = X_flat W (cuBLAS), PW = P W (L x d, tiny), then one Triton pass per block
          of windows: Q = relu(Hx + PW), S = Q Q^T / sqrt(d), masked softmax, p_bar,
          short = p_bar^T X. Hx is kept for the backward (B L d floats, like X).
Backward: one Triton pass recomputes A from Hx, writes dH = (M Q) * [H > 0] and the value
          path p_bar g^T into dX; then cuBLAS adds dH W^T into dX in place, and
          dW = X_flat^T dH_flat + P^T (sum_b dH_b) is one more product. No atomics.

Precision: cuBLAS has no 3-pass mode, so in tf32x3 and bf16x3 its products run in full
float32 (TF32 only in mode "tf32"); the Triton part uses the mode as the other layouts do.
Windows up to 64 rows (next power of two) only; longer ones use `attention.py`'s long
kernels.

Experimental: not measured to win on a GPU yet. It reaches the default path only through
public names (`attention.py`, `block_layout.py`), and lists its kernels in
`attention.resource_specs(..., layout="all")` by registering them when imported.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..attention import layout_for, register_layout_specs, short_term_attention_triton
from ..block_layout import (
    block_meta,
    block_rows,
    block_score_grad,
    block_softmax,
    cublas_tf32,
    interp_block_choice,
    load_rows,
    paired_specs,
    store_short,
    weight_grad,
)
from ..launch import KernelSpec, check_inputs, checked_grad, mask_bytes, pick
from ..precision import check_precision, mm, position_projection


@triton.jit
def _split_probs(h_ptr, pw_ptr, mask_ptr, B, scale,
                 L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                 INTERP: tl.constexpr):
    """The program's block (first window b0): the softmax matrix A of its windows from the
    saved projection Hx (+ P W), p_bar (BLOCK_R,) and the row bookkeeping; the prologue
    both split kernels share."""
    b0 = tl.program_id(0) * WPB
    wl, gw, grow, prow, row_ok, key_ok = block_rows(mask_ptr, b0, B, L, WPB, BLOCK_R)
    s = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_D):
        h = load_rows(h_ptr, grow, row_ok, n0, D, BLOCK_D)
        h += load_rows(pw_ptr, prow, row_ok, n0, D, BLOCK_D)
        q = tl.maximum(h, 0.0)
        s = mm(q, tl.trans(q), s, PREC, INTERP)
    a, same = block_softmax(s * scale, wl, row_ok, key_ok)
    p_bar = tl.sum(a, axis=0) / L  # column means within each window
    return b0, a, p_bar, wl, gw, grow, prow, row_ok, key_ok, same


@triton.jit
def _split_fwd(h_ptr, pw_ptr, x_ptr, mask_ptr, out_ptr, B, scale,
               L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr, WB: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
               INTERP: tl.constexpr):
    """out[b] = p_bar_b^T X_b for the WPB windows of this program."""
    b0, a, p_bar, wl, gw, grow, prow, row_ok, key_ok, same = _split_probs(
        h_ptr, pw_ptr, mask_ptr, B, scale, L, D, WPB, BLOCK_R, BLOCK_D, PREC, INTERP)
    store_short(x_ptr, out_ptr, p_bar, wl, grow, row_ok, b0, B, D, WPB, WB, BLOCK_D)


@triton.jit
def _split_bwd(h_ptr, pw_ptr, x_ptr, mask_ptr, g_ptr, dx_ptr, dh_ptr, B, scale,
               L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
               INTERP: tl.constexpr):
    """dH and the value path of dX (p_bar_j g_{w(j)}); dH W^T is added by cuBLAS."""
    b0, a, p_bar, wl, gw, grow, prow, row_ok, key_ok, same = _split_probs(
        h_ptr, pw_ptr, mask_ptr, B, scale, L, D, WPB, BLOCK_R, BLOCK_D, PREC, INTERP)
    msym = block_score_grad(a, x_ptr, g_ptr, grow, gw, row_ok, key_ok, same, scale, L, D,
                            BLOCK_R, BLOCK_D)
    for n0 in range(0, D, BLOCK_D):
        h = load_rows(h_ptr, grow, row_ok, n0, D, BLOCK_D)
        h += load_rows(pw_ptr, prow, row_ok, n0, D, BLOCK_D)
        dq = mm(msym, tl.maximum(h, 0.0), tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32),
                PREC, INTERP)
        cols = n0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        tl.store(dh_ptr + grow[:, None] * D + cols[None, :], tl.where(h > 0, dq, 0.0), mask=ok)
        value = p_bar[:, None] * load_rows(g_ptr, gw, row_ok, n0, D, BLOCK_D)
        tl.store(dx_ptr + grow[:, None] * D + cols[None, :], value, mask=ok)


def split_candidates(length: int, dim: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_R, BLOCK_D, num_warps, num_stages): without the projection in the program,
    a small block (little block-diagonal waste in Q Q^T); BLOCK_D 16 and 8 warps keep
    every precision out of local memory (4 warps, or 64 rows at L <= 32, spilled in the
    offline report)."""
    need = max(16, triton.next_power_of_2(length))
    return [(max(need, 32), 16, 8, 1)]


def _projections(x: torch.Tensor, w: torch.Tensor, pos: torch.Tensor, precision: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hx = X_flat W in cuBLAS (TF32 in mode "tf32" only; full float32 for the float32-level
    modes, which cuBLAS has no 3-pass form of) and P W in float64 (the P-split)."""
    b, length, dim = x.shape
    with cublas_tf32(precision == "tf32"):
        hx = (x.view(b * length, dim) @ w).view(b, length, dim)
    return hx, position_projection(pos, w)


def split_forward(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, pos: torch.Tensor,
                  precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(short (B, d), Hx (B, L, d) = X W, kept for the backward)."""
    check_inputs(x, mask, w, pos)
    check_precision(precision)
    b, length, dim = x.shape
    hx, pw = _projections(x, w, pos, precision)
    out = torch.empty((b, dim), dtype=x.dtype, device=x.device)
    if b == 0:
        return out, hx
    mask8 = mask_bytes(mask)

    def run(cfg):
        meta = block_meta(cfg, length, precision)
        grid = (triton.cdiv(b, meta["WPB"]),)
        _split_fwd[grid](hx, pw, x, mask8, out, b, 1.0 / math.sqrt(dim), L=length, D=dim,
                         **meta)

    run(pick("split_fwd", length, dim, precision, b, run, split_candidates(length, dim),
             interp_block_choice))
    return out, hx


def split_backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                   pos: torch.Tensor, hx: torch.Tensor,
                   precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, L, d), dw (d, d)) for upstream gradient `grad` (B, d)."""
    b, length, dim = x.shape
    grad = checked_grad(grad, x)
    dx, dh = torch.empty_like(x), torch.empty_like(x)
    if b == 0:
        return dx, torch.zeros_like(w)
    mask8 = mask_bytes(mask)
    pw = position_projection(pos, w)

    def run(cfg):
        meta = block_meta(cfg, length, precision)
        meta.pop("WB")
        grid = (triton.cdiv(b, meta["WPB"]),)
        _split_bwd[grid](hx, pw, x, mask8, grad, dx, dh, b, 1.0 / math.sqrt(dim), L=length,
                         D=dim, **meta)

    run(pick("split_bwd", length, dim, precision, b, run, split_candidates(length, dim),
             interp_block_choice))
    with cublas_tf32(precision == "tf32"):
        dx.view(b * length, dim).addmm_(dh.view(b * length, dim), w.T)  # dX += dH W^T
    return dx, weight_grad(x, pos, dh, precision)


def split_resource_specs(length: int, dim: int, precision: str) -> list[KernelSpec]:
    """The split layout's Triton kernels, one per candidate, for the resource report."""
    return paired_specs(split_candidates(length, dim), length, dim, precision,
                        ("split_fwd", _split_fwd), ("split_bwd", _split_bwd))


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
    if layout_for(x.shape[1]) == "long":  # the long kernels of attention.py
        return short_term_attention_triton(x, mask, w, pos, precision)
    return _SplitAttention.apply(x, mask, w, pos, precision)


register_layout_specs("split", split_resource_specs)

__all__ = ["short_term_attention_split", "split_backward", "split_candidates", "split_forward",
           "split_resource_specs"]
