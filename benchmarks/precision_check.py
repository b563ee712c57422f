"""Relative error of the Triton kernel against a float64 reference, per precision mode
(ieee, tf32), for the output and both gradients. Needs a CUDA GPU.

    python benchmarks/precision_check.py --batch 16384 --length 5 --dim 100
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastattrec.kernels import position_encoding, short_term_attention_reference


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16384)
    ap.add_argument("--length", type=int, default=5)
    ap.add_argument("--dim", type=int, default=100)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("precision_check needs a CUDA GPU; nothing measured.")
        return 0
    from fastattrec.kernels.attention import short_term_attention_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    b, length, d = args.batch, args.length, args.dim
    x = torch.randn(b, length, d, device="cuda", generator=g) * 0.05  # embedding scale
    n = torch.randint(0, length + 1, (b,), device="cuda", generator=g)
    mask = torch.arange(length, device="cuda")[None, :] >= (length - n)[:, None]
    w = torch.empty(d, d, device="cuda").uniform_(-0.05, 0.05, generator=g)
    pos = position_encoding(length, d, device="cuda")
    up = torch.randn(b, d, device="cuda", generator=g)

    def grads(fn, *t):
        xs, ws = t[0].clone().requires_grad_(True), t[2].clone().requires_grad_(True)
        out = fn(xs, t[1], ws, t[3])
        dx, dw = torch.autograd.grad(out, (xs, ws), t[4])
        return out.detach(), dx, dw

    ref = grads(short_term_attention_reference, x.double(), mask, w.double(), pos.double(),
                up.double())
    torch.backends.cuda.matmul.allow_tf32 = False
    eager32 = grads(short_term_attention_reference, x, mask, w, pos, up)
    print(f"B={b} L={length} d={d}: relative error against float64 (out, dx, dW)")

    def rel(a, r):
        return float((a.double() - r).norm() / r.norm())

    def errs(got):
        return ", ".join(f"{rel(a, r):.2e}" for a, r in zip(got, ref, strict=True))

    print("  torch eager fp32 : " + errs(eager32))
    for prec in ("ieee", "tf32"):
        got = grads(lambda a, m, c, p, prec=prec: short_term_attention_triton(a, m, c, p, prec),
                    x, mask, w, pos, up)
        print(f"  triton {prec:4s}      : " + errs(got))
    return 0


if __name__ == "__main__":
    sys.exit(main())
