"""AttRec's pairwise loss and all its input gradients in one launch (both modes).

The loss of a batch (docs/spec.md §2.4-2.6) compares the positive and the negative
candidate of every sample through the scores

    inner: s_k = w <u, e2_k> + (1 - w) <short, e_k>,        loss_b = softplus(s_1 - s_0)
    dist:  s_k = w |c(u) - c(e2_k)|^2 + (1 - w) |short - c(e_k)|^2,
           loss_b = relu(s_0 - s_1 + gamma),   c(v) = v / max(1, |v|)

(k = 0 the positive, 1 the negative), masked by `valid` and reduced to a mean over the
`count` samples (inner) or a sum (dist). Through autograd that is a compiled forward, a
compiled backward, the seed gradient and a concatenation of the candidates' gradients:
about five launches for a few microseconds of work. This kernel does the forward and the
chain rule written out (the same formulas as `fastattrec/cpu_step.py`), one program per
BLOCK_B samples holding each sample's six d-vectors in registers, and writes:

- the gradients of u, e_0, e_1, e2_0, e2_1 straight into their rows of the step's
  gradient buffer (the layout of `fastattrec/epoch_batches.py`: users, window slots,
  candidates in the item table, candidates in the item2 table);
- dL/dshort (B, d), the attention backward's input;
- each program's sum of its samples' losses (loss_b * valid, before the mean), for the
  step's bookkeeping to add in program order.

`valid` and `count` are read from the step's row of the epoch's `aux` (T, B + 1) with the
device counter, so nothing is read back and the launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..launch import KernelSpec

BLOCK_B = 4  # samples per program (16 spilled; 4 with 4 warps: 96-167 registers, none spilled)
MAX_DIM = 128  # rows held whole in registers (spill-free up to 128); wider: autograd step


@triton.jit
def _clip(v, ok):
    """c(v) = v / max(1, |v|) per row of v (BLOCK_B, BD), max(1, |v|), and whether the
    norm moves with v (|v| >= 1: at exactly 1, as autograd's clamp counts it)."""
    norm = tl.sqrt(tl.sum(v * v, axis=1))
    n = tl.where(ok, tl.maximum(norm, 1.0), 1.0)
    return v / n[:, None], n, ok & (norm >= 1.0)


@triton.jit
def _clip_grad(vc, n, moves, g):
    """Gradient through c at v for upstream g: (g - vc <vc, g> [|v| >= 1]) / max(1, |v|)."""
    radial = tl.where(moves, tl.sum(vc * g, axis=1), 0.0)
    return (g - vc * radial[:, None]) / n[:, None]


@triton.jit
def _pair_loss(rows_ptr, short_ptr, aux_ptr, step_ptr, grad_ptr, dshort_ptr, part_ptr,
               B, d, w, gamma, e_row, e2_row,
               INNER: tl.constexpr, BLOCK_B: tl.constexpr, BD: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = b < B
    cols = tl.arange(0, BD)
    m = ok[:, None] & (cols < d)[None, :]
    b64 = b.to(tl.int64)
    aux = aux_ptr + tl.load(step_ptr).to(tl.int64) * (B + 1)  # this step's row
    valid = tl.load(aux + b, mask=ok, other=0.0)
    count = tl.load(aux + B)
    u_at = b64[:, None] * d + cols[None, :]  # user rows are rows 0 .. B - 1
    e0_at = (e_row + 2 * b64)[:, None] * d + cols[None, :]  # positive, negative: 2b, 2b+1
    e1_at = e0_at + d
    f0_at = (e2_row + 2 * b64)[:, None] * d + cols[None, :]
    f1_at = f0_at + d
    u = tl.load(rows_ptr + u_at, mask=m, other=0.0)
    e0 = tl.load(rows_ptr + e0_at, mask=m, other=0.0)
    e1 = tl.load(rows_ptr + e1_at, mask=m, other=0.0)
    f0 = tl.load(rows_ptr + f0_at, mask=m, other=0.0)
    f1 = tl.load(rows_ptr + f1_at, mask=m, other=0.0)
    short = tl.load(short_ptr + u_at, mask=m, other=0.0)
    if INNER:
        s0 = w * tl.sum(u * f0, axis=1) + (1 - w) * tl.sum(short * e0, axis=1)
        s1 = w * tl.sum(u * f1, axis=1) + (1 - w) * tl.sum(short * e1, axis=1)
        diff = s1 - s0
        # softplus(x) = max(x, 0) + log1p(exp(-|x|)), sigmoid from the same exponential;
        # log1p(e) as e (1 - e / 2) for tiny e, where log(1 + e) would round to 0
        ex = tl.exp(-tl.abs(diff))
        lp = tl.where(ex < 1e-4, ex * (1.0 - 0.5 * ex), tl.log(1.0 + ex))
        loss = (tl.maximum(diff, 0.0) + lp) * valid
        g = tl.where(diff >= 0, 1.0 / (1.0 + ex), ex / (1.0 + ex)) * valid / count
        g0, g1 = -g, g  # dL/ds_0, dL/ds_1
        du = w * (g0[:, None] * f0 + g1[:, None] * f1)
        df0, df1 = w * g0[:, None] * u, w * g1[:, None] * u
        dshort = (1 - w) * (g0[:, None] * e0 + g1[:, None] * e1)
        de0, de1 = (1 - w) * g0[:, None] * short, (1 - w) * g1[:, None] * short
    else:
        uc, nu, mu = _clip(u, ok)
        e0c, ne0, me0 = _clip(e0, ok)
        e1c, ne1, me1 = _clip(e1, ok)
        f0c, nf0, mf0 = _clip(f0, ok)
        f1c, nf1, mf1 = _clip(f1, ok)
        rl0, rl1 = uc - f0c, uc - f1c  # long-term differences
        rs0, rs1 = short - e0c, short - e1c  # short-term differences
        s0 = w * tl.sum(rl0 * rl0, axis=1) + (1 - w) * tl.sum(rs0 * rs0, axis=1)
        s1 = w * tl.sum(rl1 * rl1, axis=1) + (1 - w) * tl.sum(rs1 * rs1, axis=1)
        margin = s0 - s1 + gamma
        loss = tl.maximum(margin, 0.0) * valid
        g = tl.where(margin > 0, 1.0, 0.0) * valid
        g0, g1 = g, -g
        dl0, dl1 = 2 * w * g0[:, None] * rl0, 2 * w * g1[:, None] * rl1
        ds0, ds1 = 2 * (1 - w) * g0[:, None] * rs0, 2 * (1 - w) * g1[:, None] * rs1
        du = _clip_grad(uc, nu, mu, dl0 + dl1)
        df0, df1 = _clip_grad(f0c, nf0, mf0, -dl0), _clip_grad(f1c, nf1, mf1, -dl1)
        dshort = ds0 + ds1
        de0, de1 = _clip_grad(e0c, ne0, me0, -ds0), _clip_grad(e1c, ne1, me1, -ds1)
    tl.store(grad_ptr + u_at, du, mask=m)
    tl.store(grad_ptr + e0_at, de0, mask=m)
    tl.store(grad_ptr + e1_at, de1, mask=m)
    tl.store(grad_ptr + f0_at, df0, mask=m)
    tl.store(grad_ptr + f1_at, df1, mask=m)
    tl.store(dshort_ptr + u_at, dshort, mask=m)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.where(ok, loss, 0.0), axis=0))


def programs(batch: int) -> int:
    """Programs of a launch over `batch` samples (the length of the loss partials)."""
    return triton.cdiv(batch, BLOCK_B)


def pair_loss_(rows: torch.Tensor, short: torch.Tensor, aux: torch.Tensor,
               step: torch.Tensor, grad_rows: torch.Tensor, dshort: torch.Tensor,
               parts: torch.Tensor, maxlen: int, mode: str, w: float, gamma: float) -> None:
    """From the step's looked-up rows (N, d) (users, B·maxlen window slots, then the
    candidates' item rows and item2 rows, positive and negative per sample) and the
    short-term interest (B, d): the candidates' and users' gradients into their rows of
    grad_rows (N, d) (the window rows are left to the attention backward), dL/dshort
    into dshort (B, d), and each program's loss sum into parts (programs(B),)."""
    b, d = short.shape
    n = rows.shape[0]
    if n != b * (maxlen + 5) or grad_rows.shape != rows.shape or dshort.shape != short.shape:
        raise ValueError(f"rows must be (B (L + 5), d) = ({b * (maxlen + 5)}, {d}) and "
                         f"grad_rows like it, dshort like short, got {tuple(rows.shape)}, "
                         f"{tuple(grad_rows.shape)}, {tuple(dshort.shape)}")
    if d > MAX_DIM:
        raise ValueError(f"pair_loss_ holds rows of at most {MAX_DIM} floats, got d={d}")
    if aux.shape[-1] != b + 1 or parts.shape != (programs(b),):
        raise ValueError(f"aux must be (T, B + 1) and parts ({programs(b)},), got "
                         f"{tuple(aux.shape)} and {tuple(parts.shape)}")
    for name, t in (("rows", rows), ("short", short), ("grad_rows", grad_rows),
                    ("dshort", dshort), ("aux", aux), ("parts", parts)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32")
    e_row = b * (1 + maxlen)
    _pair_loss[(programs(b),)](rows, short, aux, step.reshape(1), grad_rows, dshort, parts,
                               b, d, float(w), float(gamma), e_row, e_row + 2 * b,
                               INNER=mode == "inner", BLOCK_B=BLOCK_B,
                               BD=max(16, triton.next_power_of_2(d)), num_warps=4)


def resource_specs(dim: int) -> list[KernelSpec]:
    """The kernel in both modes at row width `dim` (for benchmarks/kernel_resources.py)."""
    bd = max(16, triton.next_power_of_2(dim))
    return [KernelSpec(f"pair_loss_{mode}", (BLOCK_B, bd), _pair_loss,
                       {"INNER": mode == "inner", "BLOCK_B": BLOCK_B, "BD": bd}, num_warps=4,
                       types={"aux_ptr": "*fp32", "step_ptr": "*i64", "w": "fp32",
                              "gamma": "fp32"})
            for mode in ("inner", "dist")]


__all__ = ["BLOCK_B", "MAX_DIM", "pair_loss_", "programs", "resource_specs"]
