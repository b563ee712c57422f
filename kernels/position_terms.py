"""The position terms of the attention's projection, each in one launch (float64 inside).

Every layout splits the projection as H = X W + P W (the P-split, `precision.py`): the
position part P W (L, d) is the same for every window, so it is computed once per call
in float64 and rounded once to float32, and the weight gradient's position part
P^T (sum_b dH_b) likewise. In torch ops each is four launches (two casts to float64, the
product, the cast back), and the tile layout's backward adds two reductions of its
per-program partials and a sum: eleven launches of almost no work in a GPU step whose
cost is its launches. Here:

- `position_projection_fused(pos, w)`: P W in one launch, float64 products (exact: a
  product of two float32 numbers fits in float64) summed over k in order, rounded once;
- `reduce_weight_grad(dwp, dhs, pos)`: dW = sum_g dwp[g] (float32, programs in order)
  + round(P^T (sum_g dhs[g])) (the column sums in float32, the product in float64), the
  tile backward's whole epilogue in one launch.

Both compute what `precision.position_projection` / `position_weight_grad` compute, with
the sums in a fixed order (tests/test_position_terms.py checks them against float64
numpy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import KernelSpec

BLOCK_N = 128  # columns of P W per program
BLOCK_M = 16  # rows of dW per program (32 spilled 8 bytes under Triton 3.6)
BLOCK_W = 32  # columns of dW per program


@triton.jit
def _position_projection(pos_ptr, w_ptr, out_ptr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    projection_block(tl.program_id(0), tl.program_id(1), pos_ptr, w_ptr, out_ptr, D,
                     BLOCK_N)


@triton.jit
def projection_block(row, block, pos_ptr, w_ptr, out_ptr, D: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """PW[row, block BLOCK_N : (block + 1) BLOCK_N] (also called by the training step's
    prologue kernel, `experimental/step_prologue.py`)."""
    row = row.to(tl.int64)
    n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = n < D
    acc = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for k in range(D):
        p = tl.load(pos_ptr + row * D + k).to(tl.float64)
        wk = tl.load(w_ptr + k * D + n, mask=ok, other=0.0).to(tl.float64)
        acc += p * wk
    tl.store(out_ptr + row * D + n, acc.to(tl.float32), mask=ok)


@triton.jit
def _reduce_weight_grad(dwp_ptr, dhs_ptr, pos_ptr, out_ptr, G, L,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    # program (i, j): dW[i BLOCK_M : (i + 1) BLOCK_M, j BLOCK_W : (j + 1) BLOCK_W]
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mok, nok = m < D, n < D
    both = mok[:, None] & nok[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    part = dwp_ptr + m[:, None] * D + n[None, :]  # program g's partial is D * D further
    for _ in range(G):  # the programs' partials X^T dH, in program order
        acc += tl.load(part, mask=both, other=0.0)
        part += D * D
    pos = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float64)
    for p in range(L):
        s = tl.zeros((BLOCK_W,), dtype=tl.float32)  # column sums of dH at position p
        col = dhs_ptr + p * D + n  # program g's row p is L * D further
        for _ in range(G):
            s += tl.load(col, mask=nok, other=0.0)
            col += L * D
        pm = tl.load(pos_ptr + p * D + m, mask=mok, other=0.0).to(tl.float64)
        pos += pm[:, None] * s.to(tl.float64)[None, :]
    tl.store(out_ptr + m[:, None] * D + n[None, :], acc + pos.to(tl.float32), mask=both)


def position_projection_fused(pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """P W (L, d) float32 from pos (L, d) and w (d, d), float32 contiguous, in one launch."""
    length, dim = pos.shape
    out = torch.empty((length, dim), dtype=torch.float32, device=pos.device)
    if length and dim:
        _position_projection[(length, triton.cdiv(dim, BLOCK_N))](pos, w, out, D=dim,
                                                                  BLOCK_N=BLOCK_N)
    return out


def reduce_weight_grad(dwp: torch.Tensor, dhs: torch.Tensor, pos: torch.Tensor
                       ) -> torch.Tensor:
    """dW (d, d) from the tile backward's partials dwp (G, d, d) and dhs (G, L, d) and the
    position encoding pos (L, d), in one launch."""
    g, dim, _ = dwp.shape
    length = pos.shape[0]
    out = torch.empty((dim, dim), dtype=torch.float32, device=dwp.device)
    grid = (triton.cdiv(dim, BLOCK_M), triton.cdiv(dim, BLOCK_W))
    _reduce_weight_grad[grid](dwp, dhs, pos, out, g, length, D=dim, BLOCK_M=BLOCK_M,
                              BLOCK_W=BLOCK_W)
    return out


def resource_specs(dim: int) -> list[KernelSpec]:
    """Both kernels at row width `dim` (for benchmarks/kernel_resources.py)."""
    return [KernelSpec("position_projection", (BLOCK_N,), _position_projection,
                       {"D": dim, "BLOCK_N": BLOCK_N}, num_warps=4),
            KernelSpec("reduce_weight_grad", (BLOCK_M, BLOCK_W), _reduce_weight_grad,
                       {"D": dim, "BLOCK_M": BLOCK_M, "BLOCK_W": BLOCK_W}, num_warps=4)]


__all__ = ["BLOCK_N", "position_projection_fused", "projection_block", "reduce_weight_grad",
           "resource_specs"]
