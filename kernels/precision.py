"""Precision modes of the kernels' d x d matrix products, one `mm` for every kernel.

Modes (the `precision` argument of every launcher):

- "ieee": float32 products on the FMA units; float32-level, slowest.
- "tf32": one TF32 tensor-core product (10 explicit mantissa bits per operand); fast,
  NOT float32-level (about 3e-3 relative error on dW, `experimental/emulation.py`).
- "tf32x3": 3xTF32 on tensor cores. Each float32 operand is split into hi = tf32(a) and
  lo = tf32(a - hi); a b ~ lo_a hi_b + hi_a lo_b + hi_a hi_b in float32 accumulation (the
  lo lo term is below float32 rounding). Float32-level at three tensor-core products.
- "bf16x3": the same split with bfloat16 halves (7 explicit mantissa bits); bf16 tensor
  cores run at twice the TF32 rate, so three bf16 products cost 1.5 TF32 products;
  float32-level by the emulation (dW 2e-6 at the training scale, 8e-6 at unit scale).

The splits round explicitly (bit arithmetic on the float32 pattern), so the operands the
tensor cores receive are already representable and the hardware's own operand truncation
changes nothing; the interpreter, which computes every dot in float32, therefore runs the
same formula with the same rounded operands as the GPU. Only bf16x3 differs in form: the
interpreter's bfloat16 `tl.dot` is wrong (it multiplies the raw 16-bit patterns), so under
the interpreter (`INTERP`) the bf16-representable halves are multiplied as float32, which
gives the same exact products.

The "P-split" lives in the kernels, not here: the position term P W is computed once in
float64 on the host (`position_projection`) and added in float32, and the position part of
dW is P^T (sum_b dH_b), also outside the low-precision product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .modes import FLOAT32_LEVEL, PRECISIONS, TENSOR_CORE, check_precision


def position_projection(pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """P W (L, d) in float64, rounded once to float32: the position term of the projection,
    the same for every window, so it is kept out of the low-precision product."""
    return (pos.double() @ w.double()).float().contiguous()


def position_weight_grad(pos: torch.Tensor, dh_sum: torch.Tensor) -> torch.Tensor:
    """P^T (sum_b dH_b) (d, d) from the column sums dh_sum (L, d), in float64, rounded once."""
    return (pos.double().T @ dh_sum.double()).float()


@triton.jit
def round_tf32(a):
    """Round float32 to TF32 (ties away from zero, as cvt.rna.tf32.f32), kept as float32."""
    u = a.to(tl.uint32, bitcast=True)
    return ((u + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(a):
    """Round float32 to bfloat16 (ties to even), kept as float32 (low 16 bits zero)."""
    u = a.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def mm(a, b, acc, PREC: tl.constexpr, INTERP: tl.constexpr):
    """acc + a @ b in float32 accumulation, with the products in mode PREC."""
    if PREC == "ieee":
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif PREC == "tf32":
        acc = tl.dot(a, b, acc, input_precision="tf32")
    elif PREC == "tf32x3":
        a_hi = round_tf32(a)
        b_hi = round_tf32(b)
        a_lo = round_tf32(a - a_hi)
        b_lo = round_tf32(b - b_hi)
        acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:  # bf16x3
        a_hi = round_bf16(a)
        b_hi = round_bf16(b)
        a_lo = round_bf16(a - a_hi)
        b_lo = round_bf16(b - b_hi)
        if INTERP:  # exact products of bf16-representable values, see the module docstring
            acc = tl.dot(a_lo, b_hi, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_lo, acc, input_precision="ieee")
            acc = tl.dot(a_hi, b_hi, acc, input_precision="ieee")
        else:
            a_hi16 = a_hi.to(tl.bfloat16)
            b_hi16 = b_hi.to(tl.bfloat16)
            acc = tl.dot(a_lo.to(tl.bfloat16), b_hi16, acc)
            acc = tl.dot(a_hi16, b_lo.to(tl.bfloat16), acc)
            acc = tl.dot(a_hi16, b_hi16, acc)
    return acc


__all__ = ["FLOAT32_LEVEL", "PRECISIONS", "TENSOR_CORE", "check_precision", "mm",
           "position_projection", "position_weight_grad", "round_bf16", "round_tf32"]
