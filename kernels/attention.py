"""Fused short-term attention in Triton: forward and backward (SPEC section 2).

Four layers, as in Liger-Kernel's ops: `@triton.jit` kernels; launchers that check,
allocate and launch; one thin `torch.autograd.Function`; one function for callers.

Three layouts, chosen by the window length L (`layout_for`):

- "tiles" (L <= 8, `attention_tiles.py`): position-major tiles; per-window work
  elementwise, tensor cores only for the three d x d products. The default L = 5 runs here.
- "blocks" (next power of two of L <= 64, this file): a program takes BLOCK_R
  consecutive rows of the flattened (B * L, d) input, i.e. BLOCK_R // L whole windows, so
  the projection is a (BLOCK_R x d) @ (d x d) product; Q Q^T is computed for the whole
  block and masked to its block diagonal. The backward recomputes S and A, writes
  dH = dL/dH once; dW = X_flat^T dH + P^T (sum_b dH_b) afterwards (no atomics). Its
  device helpers, shared with the experimental split layout, are in `block_layout.py`.
- "long" (longer windows, this file): one window per program; Q goes to a scratch buffer
  and scores are formed BLOCK_M query rows at a time against all keys.

Structure used everywhere: K = Q (one projection), and the mean over query rows is
p_bar^T X with p_bar the column means of the softmax, so the (L, d) output never exists.
Every layout uses the P-split: H = X W + (P W), with P W computed once per step in
float64 and rounded once (`position_terms.py`, one launch shared by forward and
backward), so the position term never passes through a low-precision product; and the
value path p_bar^T X is float32 in every mode.
`precision` selects how the d x d products run (`precision.py`: ieee, tf32, tf32x3,
bf16x3).

Configurations come from a few candidates per (L, d) (`launch.pick`); every candidate is
compiled offline for sm_90a by `benchmarks/kernel_resources.py`, and the test suite fails
when one spills.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from .attention_tiles import TILE_MAX_L, tile_backward, tile_forward, tile_resource_specs
from .block_layout import (
    block_meta,
    block_rows,
    block_score_grad,
    block_softmax,
    interp_block_choice,
    load_rows,
    paired_specs,
    store_short,
    value_path_grad,
    weight_grad,
)
from .launch import (
    KernelSpec,
    check_inputs,
    checked_grad,
    chosen_configs,
    interpreted,
    mask_bytes,
    pick,
    set_autotune,
)
from .position_terms import position_projection_fused
from .precision import check_precision, mm
from .reference import MASKED_LOGIT

LAYOUTS = ("auto", "tiles", "blocks", "long")
LONG = 64  # windows longer than this (rounded up to a power of two) use the long kernels

# --------------------------------------------------------------------------------------
# Kernels: blocks of flattened rows
# --------------------------------------------------------------------------------------


@triton.jit
def _projection_block(x_ptr, w_ptr, pw_ptr, grow, prow, row_ok, n0,
                      D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                      PREC: tl.constexpr, INTERP: tl.constexpr):
    """H[:, n0:n0+BLOCK_D] = X W[:, n0:n0+BLOCK_D] + PW[p, n0:n0+BLOCK_D] for the block's
    rows (p the position of each row): the P-split, PW from the host in float32."""
    h = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    ncols = n0 + tl.arange(0, BLOCK_D)
    for k0 in range(0, D, BLOCK_D):
        z = load_rows(x_ptr, grow, row_ok, k0, D, BLOCK_D)
        krows = k0 + tl.arange(0, BLOCK_D)
        wt = tl.load(w_ptr + krows[:, None] * D + ncols[None, :],
                     mask=(krows < D)[:, None] & (ncols < D)[None, :], other=0.0)
        h = mm(z, wt, h, PREC, INTERP)
    return h + load_rows(pw_ptr, prow, row_ok, n0, D, BLOCK_D)


@triton.jit
def _attention_probs(x_ptr, mask_ptr, w_ptr, pw_ptr, B, scale,
                     L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                     INTERP: tl.constexpr):
    """Softmax matrix A (BLOCK_R, BLOCK_R) of the program's block (first window b0),
    block-diagonal.

    Returns b0, A, p_bar, the row bookkeeping and the key mask: the prologue shared by
    forward and backward.
    """
    b0 = tl.program_id(0) * WPB
    wl, gw, grow, prow, row_ok, key_ok = block_rows(mask_ptr, b0, B, L, WPB, BLOCK_R)
    s = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_D):
        q = tl.maximum(_projection_block(x_ptr, w_ptr, pw_ptr, grow, prow, row_ok, n0,
                                         D, BLOCK_R, BLOCK_D, PREC, INTERP), 0.0)
        s = mm(q, tl.trans(q), s, PREC, INTERP)
    a, same = block_softmax(s * scale, wl, row_ok, key_ok)
    p_bar = tl.sum(a, axis=0) / L  # (BLOCK_R,) column means within each window
    return b0, a, p_bar, wl, gw, grow, prow, row_ok, key_ok, same


@triton.jit
def _attn_fwd(x_ptr, mask_ptr, w_ptr, pw_ptr, out_ptr,
              B, scale,
              L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr, WB: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
              INTERP: tl.constexpr):
    """out[b] = p_bar_b^T X_b for the WPB windows of this program."""
    b0, a, p_bar, wl, gw, grow, prow, row_ok, key_ok, same = _attention_probs(
        x_ptr, mask_ptr, w_ptr, pw_ptr, B, scale, L, D, WPB, BLOCK_R, BLOCK_D, PREC, INTERP)
    store_short(x_ptr, out_ptr, p_bar, wl, grow, row_ok, b0, B, D, WPB, WB, BLOCK_D)


@triton.jit
def _attn_bwd(x_ptr, mask_ptr, w_ptr, pw_ptr, g_ptr, dx_ptr, dh_ptr,
              B, scale,
              L: tl.constexpr, D: tl.constexpr, WPB: tl.constexpr,
              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
              INTERP: tl.constexpr):
    """dX and dH = dL/dH for the WPB windows of this program (dW comes later)."""
    b0, a, p_bar, wl, gw, grow, prow, row_ok, key_ok, same = _attention_probs(
        x_ptr, mask_ptr, w_ptr, pw_ptr, B, scale, L, D, WPB, BLOCK_R, BLOCK_D, PREC, INTERP)
    msym = block_score_grad(a, x_ptr, g_ptr, grow, gw, row_ok, key_ok, same, scale, L, D,
                            BLOCK_R, BLOCK_D)
    for n0 in range(0, D, BLOCK_D):
        h = _projection_block(x_ptr, w_ptr, pw_ptr, grow, prow, row_ok, n0,
                              D, BLOCK_R, BLOCK_D, PREC, INTERP)
        dq = mm(msym, tl.maximum(h, 0.0), tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32),
                PREC, INTERP)
        dh = tl.where(h > 0, dq, 0.0)
        cols = n0 + tl.arange(0, BLOCK_D)
        tl.store(dh_ptr + grow[:, None] * D + cols[None, :], dh,
                 mask=row_ok[:, None] & (cols < D)[None, :])
    tl.debug_barrier()  # this program's dH stores are read back by its other threads
    _store_dx(dh_ptr, w_ptr, g_ptr, dx_ptr, p_bar, grow, gw, row_ok, D, BLOCK_R, BLOCK_D,
              PREC, INTERP)


@triton.jit
def _store_dx(dh_ptr, w_ptr, g_ptr, dx_ptr, p_bar, grow, gw, row_ok,
              D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
              PREC: tl.constexpr, INTERP: tl.constexpr):
    """dX = dH W^T (dH read back from dh_ptr) + p_bar_j g_{w(j)} (the value path)."""
    for k0 in range(0, D, BLOCK_D):
        krows = k0 + tl.arange(0, BLOCK_D)
        # the value path, float32, is the accumulator's start
        acc = p_bar[:, None] * load_rows(g_ptr, gw, row_ok, k0, D, BLOCK_D)
        for n0 in range(0, D, BLOCK_D):
            dh = load_rows(dh_ptr, grow, row_ok, n0, D, BLOCK_D)
            ncols = n0 + tl.arange(0, BLOCK_D)
            wt = tl.load(w_ptr + krows[:, None] * D + ncols[None, :],
                         mask=(krows < D)[:, None] & (ncols < D)[None, :], other=0.0)
            acc = mm(dh, tl.trans(wt), acc, PREC, INTERP)  # dH W^T
        tl.store(dx_ptr + grow[:, None] * D + krows[None, :], acc,
                 mask=row_ok[:, None] & (krows < D)[None, :])


# --------------------------------------------------------------------------------------
# Kernels: long windows (next power of two of L above 64), one window per program. Its
# whole (L x L) score matrix would not fit on chip, so Q goes to a scratch buffer once
# and the scores are formed BLOCK_M query rows at a time against all keys.
# --------------------------------------------------------------------------------------


@triton.jit
def _store_q_long(x_ptr, w_ptr, pw_ptr, q_ptr, kgrow, kr, k_ok,
                  D: tl.constexpr, R: tl.constexpr, BLOCK_D: tl.constexpr,
                  PREC: tl.constexpr, INTERP: tl.constexpr):
    """Q = relu(X W + PW) of the window's rows, written tile by tile to the scratch."""
    for n0 in range(0, D, BLOCK_D):
        q = tl.maximum(_projection_block(x_ptr, w_ptr, pw_ptr, kgrow, kr, k_ok, n0,
                                         D, R, BLOCK_D, PREC, INTERP), 0.0)
        cols = n0 + tl.arange(0, BLOCK_D)
        tl.store(q_ptr + kgrow[:, None] * D + cols[None, :], q,
                 mask=k_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _probs_long(q_ptr, key_ok, kgrow, k_ok, i0, base, L, scale,
                D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, SPREC: tl.constexpr, INTERP: tl.constexpr):
    """Softmax rows i0 .. i0 + BLOCK_M of one window against all its keys: (BLOCK_M, R)."""
    qr = i0 + tl.arange(0, BLOCK_M)
    q_ok = qr < L
    qgrow = base + qr
    s = tl.zeros((BLOCK_M, R), dtype=tl.float32)
    for m0 in range(0, D, BLOCK_D):
        qi = load_rows(q_ptr, qgrow, q_ok, m0, D, BLOCK_D)
        qk = load_rows(q_ptr, kgrow, k_ok, m0, D, BLOCK_D)
        s = mm(qi, tl.trans(qk), s, SPREC, INTERP)
    s = s * scale
    valid = q_ok[:, None] & k_ok[None, :]
    s = tl.where(key_ok[None, :], s, -4294967295.0)
    s = tl.where(valid, s, float("-inf"))
    m = tl.where(q_ok, tl.max(s, axis=1), 0.0)
    e = tl.where(valid, tl.exp(s - m[:, None]), 0.0)
    denom = tl.where(q_ok, tl.sum(e, axis=1), 1.0)
    return e / denom[:, None], qgrow, q_ok, valid


@triton.jit
def _long_window(x_ptr, mask_ptr, w_ptr, pw_ptr, q_ptr, L, scale,
                 D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                 INTERP: tl.constexpr):
    """The program's window b: its rows, key mask, Q written to the scratch buffer, and
    p_bar (R,); the prologue both long kernels share."""
    b = tl.program_id(0).to(tl.int64)
    base = b * L
    kr = tl.arange(0, R)
    k_ok = kr < L
    kgrow = base + kr
    key_ok = tl.load(mask_ptr + kgrow, mask=k_ok, other=0) != 0
    _store_q_long(x_ptr, w_ptr, pw_ptr, q_ptr, kgrow, kr.to(tl.int64), k_ok,
                  D, R, BLOCK_D, PREC, INTERP)
    tl.debug_barrier()  # Q is read back by the program's other threads
    p_bar = tl.zeros((R,), dtype=tl.float32)
    for i0 in range(0, R, BLOCK_M):
        a, qgrow, q_ok, valid = _probs_long(q_ptr, key_ok, kgrow, k_ok, i0, base, L, scale,
                                            D, R, BLOCK_M, BLOCK_D, SPREC, INTERP)
        p_bar += tl.sum(a, axis=0)
    return b, base, kr, k_ok, kgrow, key_ok, p_bar / L


@triton.jit
def _attn_fwd_long(x_ptr, mask_ptr, w_ptr, pw_ptr, q_ptr, out_ptr,
                   L, scale,
                   D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                   INTERP: tl.constexpr):
    """out[b] = p_bar_b^T X_b for the program's window b (float32 in every mode)."""
    b, base, kr, k_ok, kgrow, key_ok, p_bar = _long_window(
        x_ptr, mask_ptr, w_ptr, pw_ptr, q_ptr, L, scale, D, R, BLOCK_M, BLOCK_D, PREC,
        SPREC, INTERP)
    for d0 in range(0, D, BLOCK_D):
        xt = load_rows(x_ptr, kgrow, k_ok, d0, D, BLOCK_D)
        cols = d0 + tl.arange(0, BLOCK_D)
        tl.store(out_ptr + b * D + cols, tl.sum(p_bar[:, None] * xt, axis=0), mask=cols < D)


@triton.jit
def _attn_bwd_long(x_ptr, mask_ptr, w_ptr, pw_ptr, g_ptr, q_ptr, dx_ptr, dh_ptr,
                   L, scale,
                   D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_D: tl.constexpr, PREC: tl.constexpr, SPREC: tl.constexpr,
                   INTERP: tl.constexpr):
    """dX and dH of the program's window. SPREC: the precision of the (L x L) x d score
    products; PREC: the d x d ones."""
    b, base, kr, k_ok, kgrow, key_ok, p_bar = _long_window(
        x_ptr, mask_ptr, w_ptr, pw_ptr, q_ptr, L, scale, D, R, BLOCK_M, BLOCK_D, PREC,
        SPREC, INTERP)
    brow = kr * 0 + b  # every row reads the window's upstream gradient row
    c = value_path_grad(x_ptr, g_ptr, kgrow, brow, k_ok, L, D, R, BLOCK_D)  # (R,)
    for n0 in range(0, D, BLOCK_D):
        cols = n0 + tl.arange(0, BLOCK_D)
        q_all = load_rows(q_ptr, kgrow, k_ok, n0, D, BLOCK_D)  # (R, BLOCK_D)
        acc_t = tl.zeros((R, BLOCK_D), dtype=tl.float32)  # sum over blocks of dS_I^T Q_I
        for i0 in range(0, R, BLOCK_M):
            a, qgrow, q_ok, valid = _probs_long(q_ptr, key_ok, kgrow, k_ok, i0, base, L,
                                                scale, D, R, BLOCK_M, BLOCK_D, SPREC, INTERP)
            rows = tl.sum(a * c[None, :], axis=1)
            ds = a * (c[None, :] - rows[:, None])
            ds = tl.where(valid & key_ok[None, :], ds, 0.0) * scale
            t_a = mm(ds, q_all, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), SPREC,
                     INTERP)  # dS_I Q, rows of block I
            tl.store(dh_ptr + qgrow[:, None] * D + cols[None, :], t_a,
                     mask=q_ok[:, None] & (cols < D)[None, :])
            q_i = load_rows(q_ptr, qgrow, q_ok, n0, D, BLOCK_D)
            acc_t = mm(tl.trans(ds), q_i, acc_t, SPREC, INTERP)
        tl.debug_barrier()
        dq = load_rows(dh_ptr, kgrow, k_ok, n0, D, BLOCK_D) + acc_t
        tl.debug_barrier()
        tl.store(dh_ptr + kgrow[:, None] * D + cols[None, :], tl.where(q_all > 0, dq, 0.0),
                 mask=k_ok[:, None] & (cols < D)[None, :])
    tl.debug_barrier()
    _store_dx(dh_ptr, w_ptr, g_ptr, dx_ptr, p_bar, kgrow, brow, k_ok, D, R, BLOCK_D, PREC,
              INTERP)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def layout_for(length: int, layout: str = "auto") -> str:
    """The layout that windows of `length` run in: `layout` itself when it can take them,
    else ValueError; "auto" picks tiles, blocks or long by length."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    long = triton.next_power_of_2(length) > LONG
    if layout == "auto":
        return "tiles" if length <= TILE_MAX_L else ("long" if long else "blocks")
    if layout == "tiles" and length > TILE_MAX_L:
        raise ValueError(f"layout 'tiles' takes windows of at most {TILE_MAX_L} rows, "
                         f"got L={length}")
    if layout == "blocks" and long:
        raise ValueError(f"layout 'blocks' takes windows of at most {LONG} rows, got L={length}")
    return layout


def block_candidates(length: int, dim: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_R, BLOCK_D, num_warps, num_stages) the tuner may choose for the block layout.

    Each one is spill-free on sm_90a in every precision by
    `benchmarks/kernel_resources.py --layout all` (L in {5, 50}, d in {64, 100, 128})."""
    full_d = max(16, triton.next_power_of_2(dim))
    need = max(16, triton.next_power_of_2(length))  # a block holds whole windows
    block_r = max(64, need)  # 64 rows: 64 // L windows, or one window of up to 64 rows
    block_d = min(full_d, 16)  # small K: the FMA path (ieee) holds K in registers
    # one candidate: 8 or 16 warps and wider BLOCK_D spilled in ieee in the offline report;
    # this one is clean under Triton 3.9 and leaves 8-32 bytes of stack in ieee under 3.6.
    # The layout runs only for 8 < L <= 64.
    return [(block_r, block_d, 4, 1)]


def long_meta(length: int, dim: int, precision: str) -> dict:
    """The long kernels' single configuration. Their score products ((L x L) x d) run in
    float32 on the FMA units in the x3 modes: split into three they do not fit in
    registers at these tile sizes (the offline report shows the spills)."""
    return {"R": triton.next_power_of_2(length), "BLOCK_M": 16,
            "BLOCK_D": min(max(16, triton.next_power_of_2(dim)), 16), "num_warps": 8,
            "num_stages": 1, "PREC": precision,
            "SPREC": "ieee" if precision.endswith("x3") else precision,
            "INTERP": interpreted()}


def attention_forward(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                      pos: torch.Tensor, precision: str = "ieee",
                      layout: str = "auto", pw: torch.Tensor | None = None) -> torch.Tensor:
    """short (B, d) = mean over rows of softmax(masked Q Q^T / sqrt(d)) X. `pw`: the
    position term P W (L, d) (`position_projection_fused`), when the caller has it."""
    check_inputs(x, mask, w, pos)
    check_precision(precision)
    b, length, dim = x.shape
    chosen = layout_for(length, layout)
    mask8 = mask_bytes(mask)
    if chosen == "tiles":
        return tile_forward(x, mask8, w, pos, precision, pw)
    out = torch.empty((b, dim), dtype=x.dtype, device=x.device)
    if b == 0:
        return out
    pw = position_projection_fused(pos, w) if pw is None else pw
    scale = 1.0 / math.sqrt(dim)
    if chosen == "long":
        q = torch.empty_like(x)
        _attn_fwd_long[(b,)](x, mask8, w, pw, q, out, length, scale, D=dim,
                             **long_meta(length, dim, precision))
        return out

    def run(cfg):
        meta = block_meta(cfg, length, precision)
        _attn_fwd[(triton.cdiv(b, meta["WPB"]),)](x, mask8, w, pw, out, b, scale, L=length,
                                                  D=dim, **meta)

    run(pick("fwd", length, dim, precision, b, run, block_candidates(length, dim),
             interp_block_choice))
    return out


def attention_backward(grad: torch.Tensor, x: torch.Tensor, mask: torch.Tensor,
                       w: torch.Tensor, pos: torch.Tensor, precision: str = "ieee",
                       layout: str = "auto", pw: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, L, d), dw (d, d)) for upstream gradient `grad` (B, d); `pw` as in
    `attention_forward`."""
    check_inputs(x, mask, w, pos)
    check_precision(precision)
    grad = checked_grad(grad, x)
    b, length, dim = x.shape
    chosen = layout_for(length, layout)
    mask8 = mask_bytes(mask)
    if chosen == "tiles":
        return tile_backward(grad, x, mask8, w, pos, precision, pw)
    dx, dh = torch.empty_like(x), torch.empty_like(x)
    if b == 0:
        return dx, torch.zeros_like(w)
    pw = position_projection_fused(pos, w) if pw is None else pw
    scale = 1.0 / math.sqrt(dim)
    if chosen == "long":
        q = torch.empty_like(x)
        _attn_bwd_long[(b,)](x, mask8, w, pw, grad, q, dx, dh, length, scale, D=dim,
                             **long_meta(length, dim, precision))
    else:
        def run(cfg):
            meta = block_meta(cfg, length, precision)
            meta.pop("WB")
            _attn_bwd[(triton.cdiv(b, meta["WPB"]),)](x, mask8, w, pw, grad, dx, dh, b, scale,
                                                      L=length, D=dim, **meta)

        run(pick("bwd", length, dim, precision, b, run, block_candidates(length, dim),
                 interp_block_choice))
    return dx, weight_grad(x, pos, dh, precision)


def resource_specs(length: int, dim: int, precision: str,
                   layout: str = "auto") -> list[KernelSpec]:
    """Every kernel and configuration the launchers may run for windows of
    `length` x `dim` in `precision`: those of the layout `layout_for(length, layout)`, or
    with layout "all" those of every layout that takes such windows (the layouts added by
    `register_layout_specs` included, e.g. the experimental split layout once
    `fastattrec.kernels.experimental.attention_split` is imported), for the offline
    resource report."""
    if layout == "all":
        if layout_for(length) == "long":
            return resource_specs(length, dim, precision, "long")
        specs = block_resource_specs(length, dim, precision)
        for extra in _EXTRA_LAYOUT_SPECS.values():
            specs = specs + extra(length, dim, precision)
        if layout_for(length) == "tiles":
            specs = tile_resource_specs(length, dim, precision) + specs
        return specs
    chosen = layout_for(length, layout)
    if chosen == "tiles":
        return tile_resource_specs(length, dim, precision)
    if chosen == "long":
        meta = long_meta(length, dim, precision)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        const = {"D": dim, **meta, "INTERP": False}
        return [KernelSpec(kind, (), fn, const, warps, stages)
                for kind, fn in (("long_fwd", _attn_fwd_long), ("long_bwd", _attn_bwd_long))]
    return block_resource_specs(length, dim, precision)


def block_resource_specs(length: int, dim: int, precision: str) -> list[KernelSpec]:
    """The block layout's kernels, one per candidate configuration."""
    return paired_specs(block_candidates(length, dim), length, dim, precision,
                        ("fwd", _attn_fwd), ("bwd", _attn_bwd))


LayoutSpecs = Callable[[int, int, str], list[KernelSpec]]  # (length, dim, precision) -> specs
_EXTRA_LAYOUT_SPECS: dict[str, LayoutSpecs] = {}


def register_layout_specs(name: str, specs: LayoutSpecs) -> None:
    """List a further layout's kernels (one that takes the block layout's windows) in
    `resource_specs(..., layout="all")`. Why a registry: such layouts live outside the
    default path (`experimental/attention_split.py` registers itself when imported), and
    this module must not import them. Registering a name again replaces its entry."""
    _EXTRA_LAYOUT_SPECS[name] = specs


# --------------------------------------------------------------------------------------
# Autograd and entry point
# --------------------------------------------------------------------------------------


class _ShortTermAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, w, pos, precision, layout):
        check_inputs(x, mask, w, pos)
        pw = position_projection_fused(pos, w)  # (L, d), once for forward and backward
        ctx.save_for_backward(x, mask, w, pos, pw)
        ctx.precision, ctx.layout = precision, layout
        return attention_forward(x, mask, w, pos, precision, layout, pw)

    @staticmethod
    def backward(ctx, grad):
        x, mask, w, pos, pw = ctx.saved_tensors
        dx, dw = attention_backward(grad, x, mask, w, pos, ctx.precision, ctx.layout, pw)
        return dx, None, dw, None, None, None


def short_term_attention_triton(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                                pos: torch.Tensor, precision: str = "ieee",
                                layout: str = "auto") -> torch.Tensor:
    """Fused short-term attention (B, d); differentiable in x and w."""
    return _ShortTermAttention.apply(x, mask, w, pos, precision, layout)


__all__ = ["LAYOUTS", "MASKED_LOGIT", "attention_backward", "attention_forward",
           "block_candidates", "block_resource_specs", "chosen_configs", "layout_for",
           "long_meta", "register_layout_specs", "resource_specs", "set_autotune",
           "short_term_attention_triton", "weight_grad"]
