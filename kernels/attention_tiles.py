"""Position-major tiles: the short-term attention for short windows (L <= TILE_MAX_L).

A program owns TW consecutive windows. For each position p the rows X[b0:b0+TW, p, :]
form a (TW, d) tile, so

- the three d x d products are real matrix products on the tensor cores (in the mode's
  precision, `precision.mm`): H_p = X_p W + PW_p, dX_p = dH_p W^T + p_bar_p g and the
  dW contribution X_p^T dH_p;
- everything per window (the L(L+1)/2 distinct scores, the softmax, p_bar, dp_bar, dS,
  M = (dS + dS^T) / sqrt(d), dQ_p = sum_q M_pq Q_q, and out = sum_p p_bar_p X_p) is
  elementwise float32 arithmetic on length-TW vectors or (TW, BD) tiles: no
  block-diagonal waste, and the value path is exact float32 in every mode.

L is a compile-time constant: per-position tiles are Triton tuples indexed by unrolled
loops. The d columns of the projection are produced BD at a time (a run-time loop), so
registers hold L (TW, BD) tiles, not L (TW, d) ones.

Forward: scores and softmax, then out; nothing is saved for the backward.
Backward (a persistent grid, G programs, each walking tiles pid, pid + G, ...):
  1. Q chunks (written to the program's scratch rows, which stay in L2) and the scores;
     dp_bar_q = <g, X_q>;
  2. softmax, p_bar, dS, M (vectors);
  3. per chunk: dH_p = (sum_q M_pq Q_q) * [Q_p > 0] into the scratch (over Q), the column
     sums of dH_p and X_p^T dH_p into the program's own dW partial;
  4. per chunk: dX_p = dH_p W^T + p_bar_p g.
  dW = sum over programs of the partials (a fixed order: deterministic, no atomics)
  + P^T (sum_b dH_b) in float64, both in one launch (`position_terms.reduce_weight_grad`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import KernelSpec, interpreted, pick, sm_count
from .position_terms import position_projection_fused, reduce_weight_grad
from .precision import mm

TILE_MAX_L = 8  # longer windows use the block layout (attention.py)
MASKED = tl.constexpr(-4294967295.0)  # -(2^32) + 1, SPEC masked logit (-2^32 in float32)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _tile_windows(mask_ptr, tile, B, L: tl.constexpr, TW: tl.constexpr):
    """Windows of tile `tile`, which of them exist, and the key mask of each position."""
    win = (tile * TW + tl.arange(0, TW)).to(tl.int64)
    ok = win < B
    keys = ()
    for p in tl.static_range(L):
        keys = keys + (tl.load(mask_ptr + win * L + p, mask=ok, other=0) != 0,)
    return win, ok, keys


@triton.jit
def _rows(ptr, row, ok, c0, D: tl.constexpr, BC: tl.constexpr):
    """(TW, BC) tile of columns c0 .. c0 + BC of a row-major (rows, D) tensor; 0 outside."""
    cols = c0 + tl.arange(0, BC)
    return tl.load(ptr + row[:, None] * D + cols[None, :],
                   mask=ok[:, None] & (cols < D)[None, :], other=0.0)


@triton.jit
def _store_rows(ptr, row, ok, c0, val, D: tl.constexpr, BC: tl.constexpr):
    cols = c0 + tl.arange(0, BC)
    tl.store(ptr + row[:, None] * D + cols[None, :], val,
             mask=ok[:, None] & (cols < D)[None, :])


@triton.jit
def _product(a_ptr, a_row, a_ok, b_ptr, k_n, n0, acc,
             D: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, TRANS_B: tl.constexpr,
             PREC: tl.constexpr, INTERP: tl.constexpr):
    """acc + A[a_row, :] @ B[:, n0:n0+BD] for a (rows, D) tensor A and the d x d matrix B
    (W, or W^T when TRANS_B), BK columns of A at a time: small K chunks keep the FMA
    path (ieee) in registers and the tensor-core operands small in shared memory."""
    n = n0 + tl.arange(0, BD)
    for k0 in range(0, D, BK):
        a = _rows(a_ptr, a_row, a_ok, k0, D, BK)  # (TW, BK)
        k = k0 + tl.arange(0, BK)
        if TRANS_B:
            b = tl.load(b_ptr + n[None, :] * D + k[:, None],
                        mask=(k < D)[:, None] & (n < D)[None, :], other=0.0)
        else:
            b = tl.load(b_ptr + k[:, None] * D + n[None, :],
                        mask=(k < D)[:, None] & (n < D)[None, :], other=0.0)
        acc = mm(a, b, acc, PREC, INTERP)
    return acc


@triton.jit
def _stage_q(x_ptr, w_ptr, pw_ptr, scr, win, ok,
             L: tl.constexpr, D: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr,
             BK: tl.constexpr, PREC: tl.constexpr, INTERP: tl.constexpr):
    """Q_p = relu(X_p W + PW_p) of every position into the program's scratch rows
    p * TW .. p * TW + TW - 1. Run-time loops over positions and column chunks, so the
    product is one site in the code (small code, one set of operand buffers); PW = P W
    comes in float32 from the host (the P-split)."""
    t = tl.arange(0, TW)
    for p in range(L):
        for n0 in range(0, D, BD):
            n = n0 + tl.arange(0, BD)
            h = _product(x_ptr, win * L + p, ok, w_ptr, 0, n0,
                         tl.zeros((TW, BD), dtype=tl.float32), D, BK, BD, False, PREC,
                         INTERP)
            pw = tl.load(pw_ptr + p * D + n, mask=n < D, other=0.0)  # (BD,)
            _store_rows(scr, p * TW + t, t < TW, n0, tl.maximum(h + pw[None, :], 0.0), D, BD)


@triton.jit
def _load_chunk(scr, n0, L: tl.constexpr, D: tl.constexpr, TW: tl.constexpr,
                BD: tl.constexpr):
    """Columns n0 .. n0 + BD of every position's scratch rows: a tuple of L (TW, BD)."""
    t = tl.arange(0, TW)
    qs = ()
    for p in tl.static_range(L):
        qs = qs + (_rows(scr, p * TW + t, t < TW, n0, D, BD),)
    return qs


@triton.jit
def _scores(scr, L: tl.constexpr, D: tl.constexpr, TW: tl.constexpr, BD: tl.constexpr):
    """The lower triangle of Q Q^T per window: s[p(p+1)/2 + q] = <Q_p, Q_q>, q <= p."""
    s = _zeros_tuple(L * (L + 1) // 2, TW)
    for n0 in range(0, D, BD):
        s = _add_scores(s, _load_chunk(scr, n0, L, D, TW, BD), L)
    return s


@triton.jit
def _add_scores(s, qs, L: tl.constexpr):
    """s[p(p+1)/2 + q] += <Q_p, Q_q> over this chunk's columns, for q <= p."""
    new = ()
    for p in tl.static_range(L):
        for q in tl.static_range(p + 1):
            new = new + (s[p * (p + 1) // 2 + q] + tl.sum(qs[p] * qs[q], axis=1),)
    return new


@triton.jit
def _zeros_tuple(N: tl.constexpr, TW: tl.constexpr):
    z = ()
    for _ in tl.static_range(N):
        z = z + (tl.zeros((TW,), dtype=tl.float32),)
    return z


@triton.jit
def _score(s, p: tl.constexpr, q: tl.constexpr):
    """Entry (p, q) of the symmetric score matrix stored as its lower triangle."""
    if q <= p:  # noqa: SIM108 (a compile-time branch; Triton's frontend takes if/else)
        v = s[p * (p + 1) // 2 + q]
    else:
        v = s[q * (q + 1) // 2 + p]
    return v


@triton.jit
def _softmax(s, keys, scale, L: tl.constexpr):
    """A (a tuple of L * L vectors, a[p * L + q]) and p_bar (L vectors, column means)."""
    a = ()
    for p in tl.static_range(L):
        row = ()
        for q in tl.static_range(L):
            row = row + (tl.where(keys[q], _score(s, p, q) * scale, MASKED),)
        m = row[0]
        for q in tl.static_range(1, L):
            m = tl.maximum(m, row[q])
        e = ()
        den = tl.zeros_like(m)
        for q in tl.static_range(L):
            eq = tl.exp(row[q] - m)
            e = e + (eq,)
            den += eq
        inv = 1.0 / den
        for q in tl.static_range(L):
            a = a + (e[q] * inv,)
    p_bar = ()
    for q in tl.static_range(L):
        col = a[q]
        for p in tl.static_range(1, L):
            col += a[p * L + q]
        p_bar = p_bar + (col / L,)
    return a, p_bar


@triton.jit
def _tile_fwd(x_ptr, mask_ptr, w_ptr, pw_ptr, out_ptr, scratch_ptr,
              B, n_tiles, scale,
              L: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, TW: tl.constexpr,
              BD: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
              INTERP: tl.constexpr):
    """out[b] = sum_p p_bar_p X_p, TW windows at a time (a persistent grid: the scratch
    holding Q is the program's own and stays in L2)."""
    scr = scratch_ptr + tl.program_id(0).to(tl.int64) * (L * TW * D + L * TW)
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
        win, ok, keys = _tile_windows(mask_ptr, tile, B, L, TW)
        _stage_q(x_ptr, w_ptr, pw_ptr, scr, win, ok, L, D, TW, BD, BK, PREC, INTERP)
        tl.debug_barrier()  # Q was written by other threads
        a, p_bar = _softmax(_scores(scr, L, D, TW, BD), keys, scale, L)
        for n0 in range(0, D, BD):
            acc = tl.zeros((TW, BD), dtype=tl.float32)
            for q in tl.static_range(L):
                acc += p_bar[q][:, None] * _rows(x_ptr, win * L + q, ok, n0, D, BD)
            _store_rows(out_ptr, win, ok, n0, acc, D, BD)
        tl.debug_barrier()  # the next tile overwrites the scratch


@triton.jit
def _score_grad(a, c, keys, scale, L: tl.constexpr):
    """M = (dS + dS^T) * scale (L * L vectors) with dS_pq = A_pq (c_q - sum_r A_pr c_r)
    for key q valid, 0 otherwise, where c_q = dL/dA_pq = <g, X_q> / L."""
    ds = ()
    for p in tl.static_range(L):
        rowdot = a[p * L] * c[0]
        for q in tl.static_range(1, L):
            rowdot += a[p * L + q] * c[q]
        for q in tl.static_range(L):
            ds = ds + (tl.where(keys[q], a[p * L + q] * (c[q] - rowdot), 0.0) * scale,)
    m = ()
    for p in tl.static_range(L):
        for q in tl.static_range(L):
            m = m + (ds[p * L + q] + ds[q * L + p],)
    return m


@triton.jit
def _tile_bwd(x_ptr, mask_ptr, w_ptr, pw_ptr, g_ptr, dx_ptr, scratch_ptr, dwp_ptr, dhs_ptr,
              B, n_tiles, scale,
              L: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, TW: tl.constexpr,
              BD: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
              INTERP: tl.constexpr):
    """dX of every window, and this program's partial dW (sum of X_p^T dH_p over its
    tiles) and partial column sums of dH_p (for the position part of dW)."""
    pid = tl.program_id(0)
    scr = scratch_ptr + pid.to(tl.int64) * (L * TW * D + L * TW)  # Q / dH rows, then p_bar
    pbar_scr = scr + L * TW * D  # (L, TW)
    dwp = dwp_ptr + pid.to(tl.int64) * (D * D)  # (D, D)
    dhs = dhs_ptr + pid.to(tl.int64) * (L * D)  # (L, D)
    t = tl.arange(0, TW)
    mr = tl.arange(0, BM)
    for m0 in range(0, D, BM):  # this program's partials start at zero
        for n0 in range(0, D, BD):
            _store_rows(dwp, m0 + mr, m0 + mr < D, n0, tl.zeros((BM, BD), dtype=tl.float32),
                        D, BD)
    kr = tl.arange(0, DP)
    for pz in range(L):
        tl.store(dhs + pz * D + kr, tl.zeros((DP,), dtype=tl.float32), mask=kr < D)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        win, ok, keys = _tile_windows(mask_ptr, tile, B, L, TW)
        # 1. Q into the scratch; scores; dp_bar_q = <g, X_q>
        _stage_q(x_ptr, w_ptr, pw_ptr, scr, win, ok, L, D, TW, BD, BK, PREC, INTERP)
        dp = _zeros_tuple(L, TW)
        for n0 in range(0, D, BD):
            gc = _rows(g_ptr, win, ok, n0, D, BD)
            new = ()
            for p in tl.static_range(L):
                xg = _rows(x_ptr, win * L + p, ok, n0, D, BD) * gc
                new = new + (dp[p] + tl.sum(xg, axis=1),)
            dp = new
        tl.debug_barrier()  # Q was written by other threads
        # 2. softmax and the score gradient, per window
        a, p_bar = _softmax(_scores(scr, L, D, TW, BD), keys, scale, L)
        c = ()
        for p in tl.static_range(L):
            tl.store(pbar_scr + p * TW + t, p_bar[p])
            c = c + (dp[p] / L,)
        m = _score_grad(a, c, keys, scale, L)
        # 3. dH = (M Q) * [Q > 0] over Q in the scratch, and its column sums
        for n0 in range(0, D, BD):
            qs = _load_chunk(scr, n0, L, D, TW, BD)
            tl.debug_barrier()  # every Q of this chunk is read before dH overwrites it
            cols = n0 + tl.arange(0, BD)
            for p in tl.static_range(L):
                dh = tl.where((qs[p] > 0) & ok[:, None], _dq(m, qs, p, L), 0.0)  # (TW, BD)
                _store_rows(scr, p * TW + t, t < TW, n0, dh, D, BD)
                hs = tl.load(dhs + p * D + cols, mask=cols < D, other=0.0)
                tl.store(dhs + p * D + cols, hs + tl.sum(dh, axis=0), mask=cols < D)
        tl.debug_barrier()  # dH and p_bar in the scratch were written by other threads
        # 4. dX_p = dH_p W^T + p_bar_p g
        for pr in range(L):  # a run-time loop: one product site in the code
            pb = tl.load(pbar_scr + pr * TW + t)
            for n0 in range(0, D, BD):
                value = pb[:, None] * _rows(g_ptr, win, ok, n0, D, BD)  # float32 value path
                dx = _product(scr, pr * TW + t, t < TW, w_ptr, 0, n0, value, D, BK, BD, True,
                              PREC, INTERP)
                _store_rows(dx_ptr, win * L + pr, ok, n0, dx, D, BD)
        # 5. dW partial += X_p^T dH_p in (BM, BD) blocks, BK windows at a time
        for m0 in range(0, D, BM):
            mcol = m0 + mr
            for n0 in range(0, D, BD):
                acc = _rows(dwp, mcol, mcol < D, n0, D, BD)  # (BM, BD)
                for pr in range(L):
                    for t0 in range(0, TW, BK):
                        tk = t0 + tl.arange(0, BK)
                        wk = tile * TW + tk  # the windows of these BK rows
                        xt = tl.load(x_ptr + (wk.to(tl.int64) * L + pr)[None, :] * D
                                     + mcol[:, None],
                                     mask=(mcol < D)[:, None] & (wk < B)[None, :],
                                     other=0.0)  # (BM, BK) = X_p[t0:t0+BK, m0:m0+BM]^T
                        dhk = _rows(scr, pr * TW + tk, tk < TW, n0, D, BD)  # (BK, BD)
                        acc = mm(xt, dhk, acc, PREC, INTERP)
                _store_rows(dwp, mcol, mcol < D, n0, acc, D, BD)
        tl.debug_barrier()  # the next tile overwrites the scratch


@triton.jit
def _dq(m, qs, p: tl.constexpr, L: tl.constexpr):
    """dQ_p = sum_q M_pq Q_q for one chunk: (TW, BD)."""
    dq = m[p * L][:, None] * qs[0]
    for q in tl.static_range(1, L):
        dq += m[p * L + q][:, None] * qs[q]
    return dq


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _dp(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def tile_candidates(length: int, dim: int,
                    precision: str = "tf32x3") -> list[tuple[int, int, int, int, int]]:
    """(TW, BD, BK, num_warps, num_stages) the tuner may choose between for windows of
    `length` x `dim` in `precision`; each spill-free on sm_90a by
    `benchmarks/kernel_resources.py`. In ieee the products run on the FMA units, which
    hold both operands' K extent in registers, so K comes 16 at a time there."""
    dp = _dp(dim)
    if precision == "ieee":  # the ieee shapes spill-free under Triton 3.6 and 3.9; the
        # 64-window tile doubles the programs of a small batch (16 at B = 1,024, not 8)
        return [(128, min(dp, 16), 16, 8, 1), (64, min(dp, 16), 16, 8, 1)]
    # 8 warps: with 4 the backward needs more than 255 registers at some d and spills
    bk = min(dp, 32)
    return list(dict.fromkeys([(64, min(dp, 32), bk, 8, 1), (128, min(dp, 16), bk, 8, 1)]))


def _interp_choice(cands):
    return max(cands, key=lambda c: (c[1], c[2], -c[0]))  # fewest interpreter loop trips


def _meta(cfg: tuple[int, int, int, int, int], dim: int, precision: str) -> dict:
    tw, bd, bk, warps, stages = cfg
    return {"DP": _dp(dim), "TW": tw, "BD": bd, "BK": bk, "BM": min(_dp(dim), 64),
            "num_warps": warps, "num_stages": stages, "PREC": precision,
            "INTERP": interpreted()}


def tile_resource_specs(length: int, dim: int, precision: str) -> list[KernelSpec]:
    """Both tile kernels at every candidate, for the offline resource report."""
    specs = []
    for cfg in tile_candidates(length, dim, precision):
        meta = _meta(cfg, dim, precision)
        warps, stages = meta.pop("num_warps"), meta.pop("num_stages")
        const = {"L": length, "D": dim, **meta, "INTERP": False}
        specs += [KernelSpec("tile_fwd", cfg, _tile_fwd, const, warps, stages),
                  KernelSpec("tile_bwd", cfg, _tile_bwd, const, warps, stages)]
    return specs


def tile_forward(x: torch.Tensor, mask8: torch.Tensor, w: torch.Tensor, pos: torch.Tensor,
                 precision: str, pw: torch.Tensor | None = None) -> torch.Tensor:
    """short (B, d) of checked inputs (mask8: the key mask as bytes; pw: P W (L, d) when
    the caller has it already)."""
    b, length, dim = x.shape
    out = torch.empty((b, dim), dtype=x.dtype, device=x.device)
    if b == 0:
        return out
    pw = position_projection_fused(pos, w) if pw is None else pw
    scale = 1.0 / math.sqrt(dim)

    def run(cfg):
        meta = _meta(cfg, dim, precision)
        n_tiles = triton.cdiv(b, meta["TW"])
        g = _programs(n_tiles, x.device)
        scratch = _scratch(g, length, meta["TW"], dim, x.device)
        _tile_fwd[(g,)](x, mask8, w, pw, out, scratch, b, n_tiles, scale, L=length, D=dim,
                        **meta)

    run(pick("tile_fwd", length, dim, precision, b, run,
             tile_candidates(length, dim, precision), _interp_choice))
    return out


def _scratch(programs: int, length: int, tw: int, dim: int,
             device: torch.device) -> torch.Tensor:
    """Each program's rows for Q / dH (L * TW, d) and p_bar (L, TW)."""
    return torch.empty(programs * (length * tw * dim + length * tw), dtype=torch.float32,
                       device=device)


def _programs(n_tiles: int, device: torch.device) -> int:
    """Persistent grid size: two programs per multiprocessor (three in the interpreter,
    so that the tests walk several tiles per program)."""
    if device.type != "cuda":
        return max(1, min(n_tiles, 3))
    return max(1, min(n_tiles, 2 * sm_count(device.index or 0)))


def tile_backward(grad: torch.Tensor, x: torch.Tensor, mask8: torch.Tensor, w: torch.Tensor,
                  pos: torch.Tensor, precision: str, pw: torch.Tensor | None = None,
                  dx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, L, d), dw (d, d)) for the checked upstream gradient `grad` (B, d); the
    partials of dW are reduced, with its position part, by one launch. `dx`: where to
    write dX (a contiguous (B, L, d) tensor, a view into a larger buffer, say)."""
    b, length, dim = x.shape
    if dx is None:
        dx = torch.empty_like(x)
    elif dx.shape != x.shape or not dx.is_contiguous() or dx.dtype != x.dtype:
        raise ValueError(f"dx must be a contiguous {x.dtype} {tuple(x.shape)} tensor, got "
                         f"{tuple(dx.shape)} {dx.dtype}")
    if b == 0:
        return dx, torch.zeros_like(w)
    pw = position_projection_fused(pos, w) if pw is None else pw
    scale = 1.0 / math.sqrt(dim)
    parts: dict[str, torch.Tensor] = {}

    def run(cfg):
        meta = _meta(cfg, dim, precision)
        n_tiles = triton.cdiv(b, meta["TW"])
        g = _programs(n_tiles, x.device)
        scratch = _scratch(g, length, meta["TW"], dim, x.device)
        dwp = torch.empty((g, dim, dim), dtype=torch.float32, device=x.device)
        dhs = torch.empty((g, length, dim), dtype=torch.float32, device=x.device)
        _tile_bwd[(g,)](x, mask8, w, pw, grad, dx, scratch, dwp, dhs, b, n_tiles, scale,
                        L=length, D=dim, **meta)
        parts["dwp"], parts["dhs"] = dwp, dhs

    run(pick("tile_bwd", length, dim, precision, b, run,
             tile_candidates(length, dim, precision),
             _interp_choice))
    return dx, reduce_weight_grad(parts["dwp"], parts["dhs"], pos)


__all__ = ["TILE_MAX_L", "tile_backward", "tile_candidates", "tile_forward",
           "tile_resource_specs"]
