"""Block-layout helpers shared by the block kernels and the split layout.

The block layout (`attention.py`) and the split layout (`experimental/attention_split.py`)
both flatten the (B, L, d) windows to (B * L, d) rows and give a program BLOCK_R
consecutive rows, i.e. BLOCK_R // L whole windows; Q Q^T is formed for the whole block and
masked to its block diagonal. What they share lives here, public, so that neither imports
the other's private names: the row loads and bookkeeping, the block-diagonal softmax, the
score gradient, the short-term output store (Triton), and on the host the launch metadata,
the resource-spec pairing, the cuBLAS TF32 switch and the P-split weight gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, interpreted
from .precision import position_weight_grad

# --------------------------------------------------------------------------------------
# Kernels (device helpers, inlined into the block and split kernels)
# --------------------------------------------------------------------------------------


@triton.jit
def load_rows(base_ptr, grow, row_ok, c0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_R, BLOCK_D) tile of a row-major (rows, D) tensor; zeros outside."""
    cols = c0 + tl.arange(0, BLOCK_D)
    ptrs = base_ptr + grow[:, None] * D + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def block_rows(mask_ptr, b0, B, L: tl.constexpr, WPB: tl.constexpr, BLOCK_R: tl.constexpr):
    """Bookkeeping of a block of BLOCK_R flattened rows holding windows b0 .. b0+WPB-1."""
    r = tl.arange(0, BLOCK_R)
    wl = r // L  # window of each row, within the block
    p = r % L  # position of each row in its window
    gw = (b0 + wl).to(tl.int64)
    row_ok = (wl < WPB) & (gw < B)
    grow = gw * L + p  # row in the flattened (B * L, D) input
    key_ok = tl.load(mask_ptr + grow, mask=row_ok, other=0) != 0
    return wl, gw, grow, p.to(tl.int64), row_ok, key_ok


@triton.jit
def block_softmax(s, wl, row_ok, key_ok):
    """Row softmax of the scaled scores s (BLOCK_R, BLOCK_R), masked keys at -(2^32) + 1,
    entries of different windows excluded (block-diagonal). Returns A and that pattern."""
    same = (wl[:, None] == wl[None, :]) & row_ok[:, None] & row_ok[None, :]
    s = tl.where(key_ok[None, :], s, -4294967295.0)  # masked keys: -(2^32) + 1
    s = tl.where(same, s, float("-inf"))
    m = tl.max(s, axis=1)
    m = tl.where(row_ok, m, 0.0)
    e = tl.where(same, tl.exp(s - m[:, None]), 0.0)
    denom = tl.sum(e, axis=1)
    denom = tl.where(row_ok, denom, 1.0)
    return e / denom[:, None], same


@triton.jit
def store_short(x_ptr, out_ptr, p_bar, wl, grow, row_ok, b0, B,
                D: tl.constexpr, WPB: tl.constexpr, WB: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """out[b] = p_bar_b^T X_b for the block's windows (float32 in every mode)."""
    wo = tl.arange(0, WB)
    sel = tl.where(wo[:, None] == wl[None, :], p_bar[None, :], 0.0)  # (WB, BLOCK_R)
    out_rows = (b0 + wo).to(tl.int64)
    out_ok = (wo < WPB) & (out_rows < B)
    for d0 in range(0, D, BLOCK_D):
        xt = load_rows(x_ptr, grow, row_ok, d0, D, BLOCK_D)
        o = tl.dot(sel, xt, input_precision="ieee")  # (WB, BLOCK_D)
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_ptr + out_rows[:, None] * D + cols[None, :], o,
                 mask=out_ok[:, None] & (cols < D)[None, :])


@triton.jit
def value_path_grad(x_ptr, g_ptr, x_rows, g_rows, ok, L, D: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """c (ROWS,): c_j = dp_bar_j / L with dp_bar_j = <g_{w(j)}, x_j>, for the rows x_rows
    of X (g_rows: the row of g of each one's window); dA_ij = c_j for every query row i.
    Shared by the block layout's score gradient and the long kernels' backward."""
    dp = tl.zeros((ROWS,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        xt = load_rows(x_ptr, x_rows, ok, d0, D, BLOCK_D)
        gt = load_rows(g_ptr, g_rows, ok, d0, D, BLOCK_D)
        dp += tl.sum(xt * gt, axis=1)
    return dp / L


@triton.jit
def block_score_grad(a, x_ptr, g_ptr, grow, gw, row_ok, key_ok, same, scale,
                     L: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """M = (dS + dS^T) * scale for upstream gradient g: the gradient reaching Q through
    both the query and the key side of S = Q Q^T."""
    c = value_path_grad(x_ptr, g_ptr, grow, gw, row_ok, L, D, BLOCK_R, BLOCK_D)  # (BLOCK_R,)
    rows = tl.sum(a * c[None, :], axis=1)
    ds = a * (c[None, :] - rows[:, None])
    ds = tl.where(key_ok[None, :] & same, ds, 0.0) * scale
    return ds + tl.trans(ds)


# --------------------------------------------------------------------------------------
# Host helpers
# --------------------------------------------------------------------------------------


def block_meta(cfg: tuple[int, int, int, int], length: int, precision: str) -> dict:
    """Launch metadata of a (BLOCK_R, BLOCK_D, num_warps, num_stages) candidate for
    windows of `length`: WPB whole windows per block, WB their power-of-two count."""
    block_r, block_d, warps, stages = cfg
    wpb = block_r // length
    return {"WPB": wpb, "BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": warps,
            "num_stages": stages, "WB": max(16, triton.next_power_of_2(wpb)),
            "PREC": precision, "INTERP": interpreted()}


def interp_block_choice(cands: Sequence[tuple[int, int, int, int]]
                        ) -> tuple[int, int, int, int]:
    """The candidate the interpreter runs (no timing there): the widest tiles."""
    return max(cands, key=lambda c: (c[1], c[0]))  # fewest interpreter loop trips


@contextlib.contextmanager
def cublas_tf32(enabled: bool) -> Iterator[None]:
    """cuBLAS float32 products in TF32 (enabled) or full float32, restored afterwards: the
    x3 and ieee modes must not inherit a global TF32 switch."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def weight_grad(x: torch.Tensor, pos: torch.Tensor, dh: torch.Tensor,
                precision: str) -> torch.Tensor:
    """dW = X_flat^T dH_flat (cuBLAS; TF32 only in mode "tf32", full float32 otherwise)
    + P^T (sum_b dH_b) (float64): the P-split of the weight gradient."""
    b, length, dim = x.shape
    with cublas_tf32(precision == "tf32"):
        dw = x.view(b * length, dim).T @ dh.view(b * length, dim)
    return dw + position_weight_grad(pos, dh.sum(dim=0))


def paired_specs(candidates: Sequence[tuple[int, int, int, int]], length: int, dim: int,
                 precision: str, fwd: tuple[str, Callable], bwd: tuple[str, Callable]
                 ) -> list[KernelSpec]:
    """A forward and a backward KernelSpec per candidate of a block-metadata layout (the
    block and split layouts); `fwd`/`bwd` are (kind, kernel)."""
    specs = []
    for cfg in candidates:
        meta = block_meta(cfg, length, precision)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        meta["INTERP"] = False
        specs.append(KernelSpec(fwd[0], cfg, fwd[1], {"L": length, "D": dim, **meta},
                                warps, stages))
        meta.pop("WB")
        specs.append(KernelSpec(bwd[0], cfg, bwd[1], {"L": length, "D": dim, **meta},
                                warps, stages))
    return specs


__all__ = ["block_meta", "block_rows", "block_score_grad", "block_softmax", "cublas_tf32",
           "interp_block_choice", "load_rows", "paired_specs", "store_short", "value_path_grad",
           "weight_grad"]
