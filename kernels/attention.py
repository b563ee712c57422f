"""Fused short-term attention in Triton: forward and backward (SPEC section 2).

Four layers, as in Liger-Kernel's ops: `@triton.jit` kernels; launchers that check,
allocate and launch; one thin `torch.autograd.Function`; one function for callers.

The structure that makes it fast:

- K = Q: one projection per window, and S = Q Q^T / sqrt(d).
- short = mean_i (A X)_i = p_bar^T X with p_bar_j = mean_i A_ij, so the (L, d) output O
  is never formed: the kernel reduces A to p_bar and contracts p_bar with X.
- Several windows per program: a program takes BLOCK_R consecutive rows of the flattened
  (B * L, d) input, i.e. BLOCK_R // L whole windows, so the projection is a real
  (BLOCK_R x d) @ (d x d) matrix product. Q Q^T is computed for the whole block and
  masked to its block diagonal (entries of different windows never enter a softmax).
- d is tiled by BLOCK_D with masks, so d = 100 needs no padding in memory, and any d fits.
- The backward recomputes S and A (nothing but the inputs is saved), writes dH = dL/d(XW)
  once, and dW = sum over windows of (X + P)^T dH is one large matrix product
  X_flat^T dH_flat + P^T (sum_b dH_b) afterwards: no atomics, deterministic.

Block sizes come from a small set of candidates per (L, d); on CUDA each candidate is
timed once with `triton.testing.do_bench` and the fastest is kept (under
TRITON_INTERPRET=1 the first candidate is used).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from .reference import MASKED_LOGIT

# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _load_rows(base_ptr, grow, row_ok, c0, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_R, BLOCK_D) tile of a row-major (rows, D) tensor; zeros outside."""
    cols = c0 + tl.arange(0, BLOCK_D)
    ptrs = base_ptr + grow[:, None] * D + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _projection_block(x_ptr, w_ptr, pos_ptr, grow, prow, row_ok, n0,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                      PRECISION: tl.constexpr):
    """H[:, n0:n0+BLOCK_D] = (X + P) @ W[:, n0:n0+BLOCK_D] for the block's rows."""
    h = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    ncols = n0 + tl.arange(0, BLOCK_D)
    for k0 in range(0, D, BLOCK_D):
        z = _load_rows(x_ptr, grow, row_ok, k0, D, BLOCK_D)
        z += _load_rows(pos_ptr, prow, row_ok, k0, D, BLOCK_D)
        krows = k0 + tl.arange(0, BLOCK_D)
        wt = tl.load(w_ptr + krows[:, None] * D + ncols[None, :],
                     mask=(krows < D)[:, None] & (ncols < D)[None, :], other=0.0)
        h += tl.dot(z, wt, input_precision=PRECISION)
    return h


@triton.jit
def _attention_probs(x_ptr, mask_ptr, w_ptr, pos_ptr, b0, B, scale,
                     L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax matrix A (BLOCK_R, BLOCK_R) of the block's windows, block-diagonal.

    Returns A, the row bookkeeping and the key mask, shared by forward and backward.
    """
    wl, gw, grow, prow, row_ok, key_ok = _block_rows(mask_ptr, b0, B, L, WPB, BLOCK_R)
    s = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_D):
        q = tl.maximum(_projection_block(x_ptr, w_ptr, pos_ptr, grow, prow, row_ok, n0,
                                         D, BLOCK_R, BLOCK_D, PRECISION), 0.0)
        s += tl.dot(q, tl.trans(q), input_precision=PRECISION)
    a, same = _block_softmax(s * scale, wl, row_ok, key_ok)
    return a, wl, gw, grow, prow, row_ok, key_ok, same


@triton.jit
def _block_rows(mask_ptr, b0, B, L: tl.constexpr, WPB: tl.constexpr, BLOCK_R: tl.constexpr):
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
def _block_softmax(s, wl, row_ok, key_ok):
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
def _store_short(x_ptr, out_ptr, p_bar, wl, grow, row_ok, b0, B,
                 D: tl.constexpr, WPB: tl.constexpr, WB: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """out[b] = p_bar_b^T X_b for the block's windows."""
    wo = tl.arange(0, WB)
    sel = tl.where(wo[:, None] == wl[None, :], p_bar[None, :], 0.0)  # (WB, BLOCK_R)
    out_rows = (b0 + wo).to(tl.int64)
    out_ok = (wo < WPB) & (out_rows < B)
    for d0 in range(0, D, BLOCK_D):
        xt = _load_rows(x_ptr, grow, row_ok, d0, D, BLOCK_D)
        o = tl.dot(sel, xt, input_precision=PRECISION)  # (WB, BLOCK_D)
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_ptr + out_rows[:, None] * D + cols[None, :], o,
                 mask=out_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _score_grad(a, x_ptr, g_ptr, grow, gw, row_ok, key_ok, same, scale,
                L: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """M = (dS + dS^T) * scale for upstream gradient g: the gradient reaching Q through
    both the query and the key side of S = Q Q^T."""
    # dp_bar_j = <g_{w(j)}, x_j>; dA_ij = dp_bar_j / L for every query row i.
    dp = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        xt = _load_rows(x_ptr, grow, row_ok, d0, D, BLOCK_D)
        gt = _load_rows(g_ptr, gw, row_ok, d0, D, BLOCK_D)
        dp += tl.sum(xt * gt, axis=1)
    c = dp / L
    rows = tl.sum(a * c[None, :], axis=1)
    ds = a * (c[None, :] - rows[:, None])
    ds = tl.where(key_ok[None, :] & same, ds, 0.0) * scale
    return ds + tl.trans(ds)


@triton.jit
def _attn_fwd(x_ptr, mask_ptr, w_ptr, pos_ptr, out_ptr,
              B, scale,
              L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr, WB: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """out[b] = p_bar_b^T X_b for the WPB windows of this program."""
    b0 = tl.program_id(0) * WPB
    a, wl, gw, grow, prow, row_ok, key_ok, same = _attention_probs(
        x_ptr, mask_ptr, w_ptr, pos_ptr, b0, B, scale, L, D, WPB, BLOCK_R, BLOCK_D, PRECISION)
    p_bar = tl.sum(a, axis=0) / L  # (BLOCK_R,) column means within each window
    _store_short(x_ptr, out_ptr, p_bar, wl, grow, row_ok, b0, B, D, WPB, WB, BLOCK_D,
                 PRECISION)


@triton.jit
def _attn_bwd(x_ptr, mask_ptr, w_ptr, pos_ptr, g_ptr, dx_ptr, dh_ptr,
              B, scale,
              L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dX and dH = dL/d((X + P) W) for the WPB windows of this program (dW comes later)."""
    b0 = tl.program_id(0) * WPB
    a, wl, gw, grow, prow, row_ok, key_ok, same = _attention_probs(
        x_ptr, mask_ptr, w_ptr, pos_ptr, b0, B, scale, L, D, WPB, BLOCK_R, BLOCK_D, PRECISION)
    p_bar = tl.sum(a, axis=0) / L
    msym = _score_grad(a, x_ptr, g_ptr, grow, gw, row_ok, key_ok, same, scale, L, D, BLOCK_R,
                       BLOCK_D)
    for n0 in range(0, D, BLOCK_D):
        h = _projection_block(x_ptr, w_ptr, pos_ptr, grow, prow, row_ok, n0,
                              D, BLOCK_R, BLOCK_D, PRECISION)
        dq = tl.dot(msym, tl.maximum(h, 0.0), input_precision=PRECISION)
        dh = tl.where(h > 0, dq, 0.0)
        cols = n0 + tl.arange(0, BLOCK_D)
        tl.store(dh_ptr + grow[:, None] * D + cols[None, :], dh,
                 mask=row_ok[:, None] & (cols < D)[None, :])
    tl.debug_barrier()  # this program's dH stores are read back by its other threads
    _store_dx(dh_ptr, w_ptr, g_ptr, dx_ptr, p_bar, grow, gw, row_ok, D, BLOCK_R, BLOCK_D,
              PRECISION)


@triton.jit
def _store_dx(dh_ptr, w_ptr, g_ptr, dx_ptr, p_bar, grow, gw, row_ok,
              D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
    """dX = dH W^T (dH read back from dh_ptr) + p_bar_j g_{w(j)} (the value path)."""
    for k0 in range(0, D, BLOCK_D):
        acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        krows = k0 + tl.arange(0, BLOCK_D)
        for n0 in range(0, D, BLOCK_D):
            dh = _load_rows(dh_ptr, grow, row_ok, n0, D, BLOCK_D)
            ncols = n0 + tl.arange(0, BLOCK_D)
            wt = tl.load(w_ptr + krows[:, None] * D + ncols[None, :],
                         mask=(krows < D)[:, None] & (ncols < D)[None, :], other=0.0)
            acc += tl.dot(dh, tl.trans(wt), input_precision=PRECISION)  # dH W^T
        acc += p_bar[:, None] * _load_rows(g_ptr, gw, row_ok, k0, D, BLOCK_D)  # value path
        tl.store(dx_ptr + grow[:, None] * D + krows[None, :], acc,
                 mask=row_ok[:, None] & (krows < D)[None, :])


# Long windows (next power of two of L above 64): one window per program. Its whole
# (L x L) score matrix would not fit on chip, so Q goes to a scratch buffer once and the
# scores are formed BLOCK_M query rows at a time against all keys.


@triton.jit
def _store_q_long(x_ptr, w_ptr, pos_ptr, q_ptr, kgrow, kr, k_ok,
                  D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Q = relu((X + P) W) of the window's rows, written tile by tile to the scratch."""
    for n0 in range(0, D, BLOCK_D):
        q = tl.maximum(_projection_block(x_ptr, w_ptr, pos_ptr, kgrow, kr, k_ok, n0,
                                         D, R, BLOCK_D, PRECISION), 0.0)
        cols = n0 + tl.arange(0, BLOCK_D)
        tl.store(q_ptr + kgrow[:, None] * D + cols[None, :], q,
                 mask=k_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _probs_long(q_ptr, key_ok, kgrow, k_ok, i0, base, L, scale,
                D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax rows i0 .. i0 + BLOCK_M of one window against all its keys: (BLOCK_M, R)."""
    qr = i0 + tl.arange(0, BLOCK_M)
    q_ok = qr < L
    qgrow = base + qr
    s = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for m0 in range(0, D, BLOCK_D):
        qi = _load_rows(q_ptr, qgrow, q_ok, m0, D, BLOCK_D)
        qk = _load_rows(q_ptr, kgrow, k_ok, m0, D, BLOCK_D)
        s += tl.dot(qi, tl.trans(qk), input_precision=PRECISION)
    s = s * scale
    valid = q_ok[:, None] & k_ok[None, :]
    s = tl.where(key_ok[None, :], s, -4294967295.0)
    s = tl.where(valid, s, float("-inf"))
    m = tl.where(q_ok, tl.max(s, axis=1), 0.0)
    e = tl.where(valid, tl.exp(s - m[:, None]), 0.0)
    denom = tl.where(q_ok, tl.sum(e, axis=1), 1.0)
    return e / denom[:, None], qgrow, q_ok, valid


@triton.jit
def _long_window(x_ptr, mask_ptr, w_ptr, pos_ptr, q_ptr, b, L, scale,
                 D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Window b: its rows, key mask, Q written to the scratch buffer, and p_bar (R,)."""
    base = b * L
    kr = tl.arange(0, R)
    k_ok = kr < L
    kgrow = base + kr
    key_ok = tl.load(mask_ptr + kgrow, mask=k_ok, other=0) != 0
    _store_q_long(x_ptr, w_ptr, pos_ptr, q_ptr, kgrow, kr.to(tl.int64), k_ok,
                  D, R, BLOCK_D, PRECISION)
    tl.debug_barrier()  # Q is read back by the program's other threads
    p_bar = tl.zeros((R,), dtype=tl.float32)
    for i0 in range(0, R, BLOCK_M):
        a, qgrow, q_ok, valid = _probs_long(q_ptr, key_ok, kgrow, k_ok, i0, base, L, scale,
                                            D, R, BLOCK_M, BLOCK_D, PRECISION)
        p_bar += tl.sum(a, axis=0)
    return base, kr, k_ok, kgrow, key_ok, p_bar / L


@triton.jit
def _attn_fwd_long(x_ptr, mask_ptr, w_ptr, pos_ptr, q_ptr, out_ptr,
                   L, scale,
                   D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base, kr, k_ok, kgrow, key_ok, p_bar = _long_window(
        x_ptr, mask_ptr, w_ptr, pos_ptr, q_ptr, b, L, scale, D, R, BLOCK_M, BLOCK_D, PRECISION)
    for d0 in range(0, D, BLOCK_D):
        xt = _load_rows(x_ptr, kgrow, k_ok, d0, D, BLOCK_D)
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_ptr + b * D + cols, tl.sum(p_bar[:, None] * xt, axis=0), mask=cols < D)


@triton.jit
def _attn_bwd_long(x_ptr, mask_ptr, w_ptr, pos_ptr, g_ptr, q_ptr, dx_ptr, dh_ptr,
                   L, scale,
                   D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base, kr, k_ok, kgrow, key_ok, p_bar = _long_window(
        x_ptr, mask_ptr, w_ptr, pos_ptr, q_ptr, b, L, scale, D, R, BLOCK_M, BLOCK_D, PRECISION)
    brow = kr * 0 + b  # every row reads the window's upstream gradient row
    dp = tl.zeros((R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        xt = _load_rows(x_ptr, kgrow, k_ok, d0, D, BLOCK_D)
        gt = _load_rows(g_ptr, brow, k_ok, d0, D, BLOCK_D)
        dp += tl.sum(xt * gt, axis=1)
    c = dp / L
    for n0 in range(0, D, BLOCK_D):
        cols = n0 + tl.arange(0, BLOCK_D)
        q_all = _load_rows(q_ptr, kgrow, k_ok, n0, D, BLOCK_D)  # (R, BLOCK_D)
        acc_t = tl.zeros((R, BLOCK_D), dtype=tl.float32)  # sum over blocks of dS_I^T Q_I
        for i0 in range(0, R, BLOCK_M):
            a, qgrow, q_ok, valid = _probs_long(q_ptr, key_ok, kgrow, k_ok, i0, base, L,
                                                scale, D, R, BLOCK_M, BLOCK_D, PRECISION)
            rows = tl.sum(a * c[None, :], axis=1)
            ds = a * (c[None, :] - rows[:, None])
            ds = tl.where(valid & key_ok[None, :], ds, 0.0) * scale
            t_a = tl.dot(ds, q_all, input_precision=PRECISION)  # dS_I Q, rows of block I
            tl.store(dh_ptr + qgrow[:, None] * D + cols[None, :], t_a,
                     mask=q_ok[:, None] & (cols < D)[None, :])
            q_i = _load_rows(q_ptr, qgrow, q_ok, n0, D, BLOCK_D)
            acc_t += tl.dot(tl.trans(ds), q_i, input_precision=PRECISION)
        tl.debug_barrier()
        dq = _load_rows(dh_ptr, kgrow, k_ok, n0, D, BLOCK_D) + acc_t
        tl.debug_barrier()
        tl.store(dh_ptr + kgrow[:, None] * D + cols[None, :], tl.where(q_all > 0, dq, 0.0),
                 mask=k_ok[:, None] & (cols < D)[None, :])
    tl.debug_barrier()
    _store_dx(dh_ptr, w_ptr, g_ptr, dx_ptr, p_bar, kgrow, brow, k_ok, D, R, BLOCK_D, PRECISION)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

PRECISIONS = ("ieee", "tf32")
_chosen: dict[tuple, tuple[int, int, int]] = {}
_autotune = [True]


def set_autotune(enabled: bool) -> None:
    """Turn the timing of candidate block sizes on or off (off: the first candidate).

    Tests switch it off so that each shape compiles one configuration, not several."""
    _autotune[0] = bool(enabled)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _candidates(length: int, dim: int) -> list[tuple[int, int, int]]:
    """(BLOCK_R, BLOCK_D, num_warps) to try for windows of `length` rows of `dim`.

    Few on purpose: each one is compiled and timed once per (L, d) on first use.
    """
    full_d = max(16, triton.next_power_of_2(dim))
    need = max(16, triton.next_power_of_2(length))  # a block holds whole windows
    if need <= 32:
        shapes = sorted({(max(need, 32), min(full_d, 128)), (64, min(full_d, 64))})
    else:  # one window per program
        shapes = [(64, bd) for bd in sorted({min(full_d, 32), min(full_d, 64)})]
    return [(r, bd, 4 if r * bd <= 2048 else (8 if r < 256 else 16)) for r, bd in shapes]


LONG = 64  # windows longer than this (rounded up to a power of two) use the long kernels


def _long_meta(length: int, dim: int) -> dict:
    r = triton.next_power_of_2(length)
    return {"R": r, "BLOCK_M": 32, "BLOCK_D": min(max(16, triton.next_power_of_2(dim)), 32),
            "num_warps": 8}


def _is_long(length: int) -> bool:
    return triton.next_power_of_2(length) > LONG


def _check(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, pos: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, d), got shape {tuple(x.shape)}")
    b, length, dim = x.shape
    if mask.shape != (b, length):
        raise ValueError(f"mask must be (B, L) = {(b, length)}, got {tuple(mask.shape)}")
    if w.shape != (dim, dim):
        raise ValueError(f"w must be (d, d) = {(dim, dim)}, got {tuple(w.shape)}")
    if pos.shape != (length, dim):
        raise ValueError(f"pos must be (L, d) = {(length, dim)}, got {tuple(pos.shape)}")
    for name, t in (("x", x), ("w", w), ("pos", pos)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if mask.dtype not in (torch.bool, torch.uint8, torch.int8):
        raise ValueError(f"mask must be bool or uint8, got {mask.dtype}")
    if not mask.is_contiguous():
        raise ValueError("mask must be contiguous (call .contiguous() first)")
    devices = {t.device for t in (x, mask, w, pos)}
    if len(devices) != 1:
        names = sorted(map(str, devices))
        raise ValueError(f"x, mask, w and pos must be on one device, got {names}")
    if x.device.type != "cuda" and not _interpreted():
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                         "it on CPU in Triton's interpreter)")


def _as_bytes(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _meta(cfg: tuple[int, int, int], length: int) -> dict:
    block_r, block_d, warps = cfg
    wpb = block_r // length
    return {"WPB": wpb, "BLOCK_R": block_r, "BLOCK_D": block_d, "num_warps": warps,
            "WB": max(16, triton.next_power_of_2(wpb))}


def _pick(kind: str, length: int, dim: int, precision: str, b: int, run,
          cands: list[tuple[int, int, int]] | None = None) -> tuple:
    """The fastest candidate for this (kind, L, d, precision, size class), timed once."""
    key = (kind, length, dim, precision, b >= 16384, _interpreted())
    if key in _chosen:
        return _chosen[key]
    cands = cands if cands is not None else _candidates(length, dim)
    if _interpreted():  # the interpreter's cost is per program and per loop trip
        best = max(cands, key=lambda c: (c[1], c[0]))
    elif len(cands) == 1 or not _autotune[0]:
        best = cands[0]
    else:
        from triton.testing import do_bench

        times = []
        for c in cands:
            try:
                times.append((do_bench(lambda c=c: run(c), warmup=5, rep=20), c))
            except Exception:  # a candidate that does not fit this GPU (resources)
                continue
        if not times:
            raise RuntimeError(f"no Triton configuration compiled for L={length}, d={dim}")
        best = min(times)[1]
    _chosen[key] = best
    return best


def chosen_configs() -> dict[tuple, tuple[int, int, int]]:
    """The block sizes picked so far, for benchmark reports."""
    return dict(_chosen)


def attention_forward(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                      pos: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """short (B, d) = mean over rows of softmax(masked Q Q^T / sqrt(d)) X."""
    _check(x, mask, w, pos)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    b, length, dim = x.shape
    out = torch.empty((b, dim), dtype=x.dtype, device=x.device)
    if b == 0:
        return out
    mask8 = _as_bytes(mask)
    if _is_long(length):
        q = torch.empty_like(x)
        _attn_fwd_long[(b,)](x, mask8, w, pos, q, out, length, 1.0 / math.sqrt(dim), D=dim,
                             PRECISION=precision, **_long_meta(length, dim))
        return out

    def run(cfg):
        meta = _meta(cfg, length)
        grid = (triton.cdiv(b, meta["WPB"]),)
        _attn_fwd[grid](x, mask8, w, pos, out, b, 1.0 / math.sqrt(dim), L=length, D=dim,
                        PRECISION=precision,
                        **meta)

    run(_pick("fwd", length, dim, precision, b, run))
    return out


@contextlib.contextmanager
def _matmul_precision(precision: str):
    if precision != "tf32" or not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def attention_backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                       w: torch.Tensor, pos: torch.Tensor,
                       precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, L, d), dw (d, d)) for upstream gradient `grad` (B, d)."""
    _check(x, mask, w, pos)
    b, length, dim = x.shape
    grad, dx, dh = _grad_buffers(grad, x)
    if b == 0:
        return dx, torch.zeros_like(w)
    mask8 = _as_bytes(mask)
    if _is_long(length):
        q = torch.empty_like(x)
        _attn_bwd_long[(b,)](x, mask8, w, pos, grad, q, dx, dh, length, 1.0 / math.sqrt(dim),
                             D=dim, PRECISION=precision, **_long_meta(length, dim))
    else:
        _run_bwd(x, mask8, w, pos, grad, dx, dh, precision)
    return dx, _weight_grad(x, pos, dh, precision)


def _grad_buffers(grad: torch.Tensor, x: torch.Tensor):
    """The checked upstream gradient (B, d), and empty dX and dH shaped like x."""
    b, _, dim = x.shape
    grad = grad.contiguous()
    if grad.shape != (b, dim) or grad.dtype != torch.float32:
        raise ValueError(f"grad must be float32 (B, d) = {(b, dim)}, got {tuple(grad.shape)}")
    return grad, torch.empty_like(x), torch.empty_like(x)


def _weight_grad(x: torch.Tensor, pos: torch.Tensor, dh: torch.Tensor,
                 precision: str) -> torch.Tensor:
    """dW = sum_b (X_b + P)^T dH_b = X_flat^T dH_flat + P^T (sum_b dH_b): one product."""
    b, length, dim = x.shape
    with _matmul_precision(precision):
        return torch.addmm(pos.T @ dh.sum(dim=0), x.view(b * length, dim).T,
                           dh.view(b * length, dim))


def _run_bwd(x, mask8, w, pos, grad, dx, dh, precision) -> None:
    b, length, dim = x.shape

    def run(cfg):
        meta = _meta(cfg, length)
        meta.pop("WB")
        grid = (triton.cdiv(b, meta["WPB"]),)
        _attn_bwd[grid](x, mask8, w, pos, grad, dx, dh, b, 1.0 / math.sqrt(dim), L=length, D=dim,
                        PRECISION=precision, **meta)

    run(_pick("bwd", length, dim, precision, b, run))


# --------------------------------------------------------------------------------------
# Autograd and entry point
# --------------------------------------------------------------------------------------


class _ShortTermAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, w, pos, precision):
        ctx.save_for_backward(x, mask, w, pos)
        ctx.precision = precision
        return attention_forward(x, mask, w, pos, precision)

    @staticmethod
    def backward(ctx, grad):
        x, mask, w, pos = ctx.saved_tensors
        dx, dw = attention_backward(grad, x, mask, w, pos, ctx.precision)
        return dx, None, dw, None, None


def short_term_attention_triton(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                                pos: torch.Tensor, precision: str = "ieee") -> torch.Tensor:
    """Fused short-term attention (B, d); differentiable in x and w."""
    return _ShortTermAttention.apply(x, mask, w, pos, precision)


__all__ = ["MASKED_LOGIT", "attention_backward", "attention_forward", "chosen_configs",
           "set_autotune", "short_term_attention_triton"]
