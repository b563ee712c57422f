"""Relative error against float64 of every precision mode, for the output and both
gradients: measured on the GPU, and modelled by the numpy emulation (any machine).

    python benchmarks/precision_check.py                       # B=4096, L=5, d=100
    python benchmarks/precision_check.py --batch 4096 16384 --scale 0.05 1
    python benchmarks/precision_check.py --emulate-only        # no GPU needed

Inputs at `--scale` s: embeddings ~ N(0, s^2), W ~ U(-s, s) (0.05 is the training scale;
1 stresses the modes harder). A mode is float32-level when the largest of its three
relative errors (norm of the difference over norm of the float64 answer) is <= 1e-5, the
issue's bar at B=4096. Prints one table and writes the rows as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fastattrec.kernels import PRECISIONS, position_encoding, short_term_attention_reference
from fastattrec.kernels.experimental.emulation import attention_emulated

BAR = 1e-5


def make(b: int, length: int, d: int, scale: float, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, length, d, device=device, generator=g) * scale
    n = torch.randint(0, length + 1, (b,), device=device, generator=g)
    mask = torch.arange(length, device=device)[None, :] >= (length - n)[:, None]
    w = torch.empty(d, d, device=device).uniform_(-scale, scale, generator=g)
    pos = position_encoding(length, d, device=device)
    up = torch.randn(b, d, device=device, generator=g)
    return x, mask, w, pos, up


def grads(fn, x, mask, w, pos, up):
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fn(xs, mask, ws, pos)
    dx, dw = torch.autograd.grad(out, (xs, ws), up)
    return out.detach(), dx, dw


def rel(a, ref) -> float:
    a, ref = torch.as_tensor(a).double().cpu(), torch.as_tensor(ref).double().cpu()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def rows_for(b: int, length: int, d: int, scale: float, device: str, measure: bool) -> list:
    """One row per (source, mode): errors of out, dx, dW against float64."""
    x, mask, w, pos, up = make(b, length, d, scale, device)
    truth = grads(short_term_attention_reference, x.double(), mask, w.double(), pos.double(),
                  up.double())
    rows = []

    def add(source, mode, got):
        errs = [rel(a, t) for a, t in zip(got, truth, strict=True)]
        rows.append({"B": b, "L": length, "d": d, "scale": scale, "source": source,
                     "mode": mode, "out": errs[0], "dx": errs[1], "dw": errs[2],
                     "float32_level": max(errs) <= BAR})

    args = [t.cpu().numpy() for t in (x, mask, w, pos, up)]
    for mode in PRECISIONS:
        add("emulated", mode, attention_emulated(*args, mode, p_split=True))
    if measure:
        from fastattrec.kernels.attention import short_term_attention_triton

        torch.backends.cuda.matmul.allow_tf32 = False
        add("torch eager", "float32", grads(short_term_attention_reference, x, mask, w, pos,
                                            up))
        for mode in PRECISIONS:
            add("triton", mode, grads(
                lambda a, m, c, p, mode=mode: short_term_attention_triton(a, m, c, p, mode),
                x, mask, w, pos, up))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[4096])
    ap.add_argument("--length", type=int, default=5)
    ap.add_argument("--dim", type=int, default=100)
    ap.add_argument("--scale", type=float, nargs="+", default=[0.05, 1.0])
    ap.add_argument("--emulate-only", action="store_true",
                    help="only the numpy emulation (no GPU needed)")
    ap.add_argument("--out", type=Path, default=Path("results/precision.json"))
    args = ap.parse_args()
    measure = torch.cuda.is_available() and not args.emulate_only
    if not measure and not args.emulate_only:
        print("precision_check: no CUDA GPU here; showing the numpy emulation only.")
    device = "cuda" if measure else "cpu"
    rows = []
    for b in args.batch:
        for scale in args.scale:
            rows += rows_for(b, args.length, args.dim, scale, device, measure)
    print(f"relative error against float64 (out, dx, dW); float32-level: max <= {BAR:g}")
    print(f"{'B':>6} {'scale':>5} {'source':>12} {'mode':>8} {'out':>9} {'dx':>9} {'dW':>9}  f32")
    for r in rows:
        print(f"{r['B']:>6} {r['scale']:>5g} {r['source']:>12} {r['mode']:>8} {r['out']:9.2e} "
              f"{r['dx']:9.2e} {r['dw']:9.2e}  {'yes' if r['float32_level'] else 'no'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
