"""Microbenchmark: fused Triton short-term attention vs the torch reference (eager) vs
torch.compile of the reference; forward, backward and forward+backward.

    python benchmarks/bench_kernel.py --out results/kernel.csv
    python benchmarks/bench_kernel.py --batch 16384 --length 5 --dim 100   # one point

Times are medians of `triton.testing.do_bench` (CUDA events, L2 flushed between runs).
"Minimum bytes" counts what any implementation must move once: forward reads x, the mask,
W and P and writes short; backward reads x, the mask, W, P and the upstream gradient and
writes dx and dW. Percent of peak uses the nominal bandwidth of the card (datasheet) and
also the device-to-device copy bandwidth measured at the start of the run. "floor_ms" is
the least time the card's datasheet allows (minimum bytes at peak bandwidth or minimum
flops at the peak of the chosen precision, whichever is larger), and
"max_pct_nominal_peak" the bandwidth share that floor leaves reachable: in IEEE float32 at
d = 100 the FMA units bind, not memory.
Needs a CUDA GPU; on a CPU-only machine it says so and exits.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from fastattrec.kernels import position_encoding, short_term_attention_reference

from common import machine, print_table, write_csv

NOMINAL_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "L4": 0.3}
# Dense float32 peaks (datasheet, TFLOP/s): FMA units (IEEE fp32 dots) and TF32 tensor cores.
NOMINAL_TFLOPS = {"H100": {"ieee": 67.0, "tf32": 494.7}, "H200": {"ieee": 67.0, "tf32": 494.7},
                  "A100": {"ieee": 19.5, "tf32": 156.0}, "L4": {"ieee": 30.3, "tf32": 60.0}}


def nominal_bandwidth(name: str) -> float | None:
    for key, tbps in NOMINAL_TBPS.items():
        if key in name:
            return tbps * 1e12
    return None


def measured_copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    from triton.testing import do_bench

    n = 1 << 28  # 1 GiB of float32
    a = torch.empty(n, device="cuda", dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    return 2 * n * 4 / (ms * 1e-3)


def nominal_flops(name: str, precision: str) -> float | None:
    for key, peaks in NOMINAL_TFLOPS.items():
        if key in name:
            return peaks[precision] * 1e12
    return None


def min_flops(b: int, length: int, d: int, which: str) -> int:
    """Floating-point operations any implementation must do (no recomputation).

    Forward: the projection (X + P) W (2 B L d^2), S = Q Q^T (2 B L^2 d) and p_bar^T X
    (2 B L d). Backward: dX = dH W^T and dW = (X + P)^T dH (2 B L d^2 each), dQ = dS Q
    (2 B L^2 d) and the value path (2 B L d). At d = 100 the three d x d products
    dominate: about 300 flops per element of x against 8 bytes moved (x in, dx out),
    so in IEEE float32 the FMA units, not memory, set the floor.
    """
    proj, attn, vals = 2 * b * length * d * d, 2 * b * length * length * d, 2 * b * length * d
    fwd = proj + attn + vals
    bwd = 2 * proj + attn + vals
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[which]


def min_bytes(b: int, length: int, d: int, which: str) -> int:
    x, mask, w, pos, short = b * length * d * 4, b * length, d * d * 4, length * d * 4, b * d * 4
    fwd = x + mask + w + pos + short
    bwd = x + mask + w + pos + short + x + w  # + upstream (B, d), dx, dW
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd - (x + mask + w + pos)}[which]


def inputs(b: int, length: int, d: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, length, d, device="cuda", generator=g)
    n = torch.randint(0, length + 1, (b,), device="cuda", generator=g)
    mask = torch.arange(length, device="cuda")[None, :] >= (length - n)[:, None]
    w = torch.empty(d, d, device="cuda").uniform_(-0.05, 0.05, generator=g)
    pos = position_encoding(length, d, device="cuda")
    up = torch.randn(b, d, device="cuda", generator=g)
    return x, mask, w, pos, up


def bench_impl(fn, x, mask, w, pos, up, which: str) -> float:
    from triton.testing import do_bench

    if which == "fwd":
        with torch.no_grad():
            return do_bench(lambda: fn(x, mask, w, pos), warmup=10, rep=40,
                            return_mode="median")
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    if which == "bwd":
        out = fn(xr, mask, wr, pos)
        return do_bench(lambda: torch.autograd.grad(out, (xr, wr), up, retain_graph=True),
                        warmup=10, rep=40, return_mode="median")
    return do_bench(lambda: torch.autograd.grad(fn(xr, mask, wr, pos), (xr, wr), up),
                    warmup=10, rep=40, return_mode="median")


def fits(b: int, length: int, d: int, free: int, eager: bool) -> bool:
    per = b * length * d * 4
    need = (14 * per + 6 * b * length * length * 4) if eager else 5 * per
    return need < 0.6 * free


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 16384, 262144, 1048576])
    ap.add_argument("--length", type=int, nargs="+", default=[5, 50, 200])
    ap.add_argument("--dim", type=int, nargs="+", default=[64, 100, 128])
    ap.add_argument("--compile-dims", type=int, nargs="*", default=None,
                    help="d values for which torch.compile is measured (default: all)")
    ap.add_argument("--precision", default="ieee", choices=["ieee", "tf32"])
    ap.add_argument("--impls", nargs="+", default=["triton", "split", "eager", "compile"],
                    choices=["triton", "split", "structured", "eager", "compile"],
                    help="triton: the fused kernel (projection in Triton); split: projections "
                         "in cuBLAS, the rest in Triton; structured: the same algorithm in "
                         "torch ops; eager / compile: the reference, plain or torch.compile'd")
    ap.add_argument("--out", type=Path, default=Path("results/bench_kernel.csv"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernel needs a CUDA GPU (the Triton kernel's speed means nothing in the "
              "CPU interpreter); nothing measured.")
        return 0
    from fastattrec.kernels.attention import chosen_configs, short_term_attention_triton
    from fastattrec.kernels.attention_split import short_term_attention_split
    from fastattrec.kernels.structured import short_term_attention_structured

    torch.backends.cuda.matmul.allow_tf32 = False
    meta = machine()
    meta["precision"] = args.precision
    meta["copy_bandwidth_Bps"] = copy_bw = measured_copy_bandwidth()
    nominal = nominal_bandwidth(meta["device"])
    meta["nominal_bandwidth_Bps"] = nominal
    peak_flops = nominal_flops(meta["device"], args.precision)
    meta["nominal_flops"] = peak_flops
    print(f"{meta['device']}: measured copy bandwidth {copy_bw / 1e12:.2f} TB/s, "
          f"nominal {nominal / 1e12 if nominal else float('nan'):.2f} TB/s")

    def triton_fn(x, m, w, p):
        return short_term_attention_triton(x, m, w, p, precision=args.precision)

    def split_fn(x, m, w, p):
        return short_term_attention_split(x, m, w, p, precision=args.precision)

    # The backward benchmark replays one graph (retain_graph), which donated buffers forbid.
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False
    compiled = torch.compile(short_term_attention_reference, dynamic=True)
    every = {"triton": triton_fn, "split": split_fn,
             "structured": short_term_attention_structured,
             "eager": short_term_attention_reference, "compile": compiled}
    impls = {k: every[k] for k in args.impls}
    ours = [k for k in impls if k not in ("eager", "compile")]
    if args.precision == "tf32":  # cuBLAS and torch ops follow the same switch
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    free = torch.cuda.mem_get_info()[0]
    for length in args.length:
        for d in args.dim:
            for b in args.batch:
                if not fits(b, length, d, free, eager=False):
                    print(f"skip B={b} L={length} d={d}: does not fit in GPU memory")
                    continue
                data = inputs(b, length, d)
                for which in ("fwd", "bwd", "fwd+bwd"):
                    row = {"B": b, "L": length, "d": d, "pass": which}
                    for name, fn in impls.items():
                        if name in ("eager", "compile") and not fits(b, length, d, free, True):
                            continue
                        if name == "compile" and args.compile_dims is not None \
                                and d not in args.compile_dims:
                            continue
                        try:
                            row[f"{name}_ms"] = bench_impl(fn, *data, which)
                        except torch.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            row[f"{name}_ms"] = math.nan
                    nbytes = min_bytes(b, length, d, which)
                    row["min_bytes"] = nbytes
                    floor_s = None
                    if nominal and peak_flops:
                        # The least time the card allows: memory or arithmetic, whichever
                        # binds; and the share of peak bandwidth that floor leaves reachable.
                        floor_s = max(nbytes / nominal,
                                      min_flops(b, length, d, which) / peak_flops)
                        row["floor_ms"] = floor_s * 1e3
                        row["max_pct_nominal_peak"] = 100 * nbytes / floor_s / nominal
                    for name in ours:
                        t = row.get(f"{name}_ms", math.nan) * 1e-3
                        row[f"{name}_GBps"] = nbytes / t / 1e9
                        if nominal:
                            row[f"{name}_pct_nominal_peak"] = 100 * nbytes / t / nominal
                        row[f"{name}_pct_copy_peak"] = 100 * nbytes / t / copy_bw
                        if floor_s:
                            row[f"{name}_pct_of_floor"] = 100 * floor_s / t
                        for base in ("eager", "compile"):
                            if f"{base}_ms" in row:
                                row[f"{name}_vs_{base}"] = row[f"{base}_ms"] / (t * 1e3)
                    rows.append(row)
                    print_table([row], list(row))
                del data
                torch.cuda.empty_cache()
    meta["chosen_configs"] = {str(k): v for k, v in chosen_configs().items()}
    write_csv(args.out, rows, meta)
    cols = ["B", "L", "d", "pass", *[f"{k}_ms" for k in impls], "floor_ms",
            "max_pct_nominal_peak"]
    for name in ours:
        cols += [f"{name}_vs_eager", f"{name}_vs_compile", f"{name}_pct_nominal_peak"]
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"precision {args.precision}  sha {meta['git_sha']}")
    print_table(rows, cols)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
