"""Microbenchmark: the Triton short-term attention against PyTorch eager and
torch.compile of the reference, forward, backward and both, each against its floor.

    python benchmarks/bench_kernel.py                                   # the bar points
    python benchmarks/bench_kernel.py --precision ieee tf32x3 --batch 16384
    python benchmarks/bench_kernel.py --dry-run                         # CPU rehearsal

Two timers, both medians (`triton.testing`):
- "graph" (`do_bench_cudagraph`): the launches captured in a CUDA graph and replayed, so
  the time is the kernels' and not Python's. Ours are timed through their launchers
  (`attention_forward` / `attention_backward`); the baselines' forward and forward+backward
  are captured whole (their backward alone cannot be captured without its forward).
- "autograd" (`do_bench`, L2 flushed between runs): through the autograd entry point as
  a training step calls it, Python and allocator included.

Baselines compute in float32 with TF32 off. Floors: the memory floor is the fewest bytes
any implementation moves (x, mask, W, P in; short out; for the backward also the upstream
gradient in and dx, dW out) at the copy bandwidth measured at the start; the arithmetic
floor counts the fewest flops (`min_flops`) at the datasheet peak of the unit each
precision uses: FP32 FMA for ieee and everything outside the three d x d products;
TF32 tensor cores for tf32 (one pass) and tf32x3 (three passes); BF16 tensor cores for
bf16x3 (three passes). floor = max(memory, arithmetic); "x floor" = time / floor.

Rows go to one CSV per precision (`--out` with the precision in its name when several
are timed; columns B, L, d, pass, <impl>_ms (autograd timer), <impl>_graph_ms,
floor_ms, ...) with the machine and the chosen configurations in a JSON file beside it.
Needs a CUDA GPU; `--dry-run` runs every code path once on tiny CPU inputs (the Triton
kernels in the interpreter) and times nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from fastattrec.kernels import PRECISIONS, position_encoding, short_term_attention_reference

from common import machine, print_table, write_csv

# Datasheet peaks (dense, TFLOP/s) and bandwidth (TB/s). The bandwidth used for floors is
# measured; the nominal one is printed beside it.
PEAKS = {"H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "tbps": 3.35},
         "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "tbps": 4.8},
         "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "tbps": 2.0}}
# (tensor-core unit, passes) of the three d x d products per precision
PRODUCT_UNIT = {"ieee": ("fp32", 1), "tf32": ("tf32", 1), "tf32x3": ("tf32", 3),
                "bf16x3": ("bf16", 3)}
PASSES = ("fwd", "bwd", "fwd+bwd")
OURS = ("triton", "blocks", "split")  # the autotuned layout, the block layout, cuBLAS split
BASELINES = ("eager", "compile")


def peaks_for(name: str) -> dict | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def min_flops(b: int, length: int, d: int, which: str) -> tuple[int, int]:
    """(flops in the three d x d products, all other flops) any implementation must do.

    Forward: the projection X W (2 B L d^2), S = Q Q^T (2 B L^2 d), p_bar^T X (2 B L d).
    Backward: dX = dH W^T and dW = X^T dH (2 B L d^2 each), dQ = M Q (2 B L^2 d) and the
    value path (2 B L d). P W and P^T (sum dH) are O(L d^2), negligible.
    """
    proj, attn, vals = 2 * b * length * d * d, 2 * b * length * length * d, 2 * b * length * d
    mm = {"fwd": proj, "bwd": 2 * proj, "fwd+bwd": 3 * proj}[which]
    rest = {"fwd": attn + vals, "bwd": attn + vals, "fwd+bwd": 2 * (attn + vals)}[which]
    return mm, rest


def min_bytes(b: int, length: int, d: int, which: str) -> int:
    x, mask, w, pos, short = b * length * d * 4, b * length, d * d * 4, length * d * 4, b * d * 4
    fwd = x + mask + w + pos + short
    bwd = x + mask + w + pos + short + x + w  # + upstream (B, d), dx, dW
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd - (x + mask + w + pos)}[which]


def floor_s(b: int, length: int, d: int, which: str, precision: str, bandwidth: float,
            peaks: dict) -> float:
    """max(memory floor, arithmetic floor) in seconds for one pass in `precision`."""
    mm, rest = min_flops(b, length, d, which)
    unit, passes = PRODUCT_UNIT[precision]
    arith = mm * passes / (peaks[unit] * 1e12) + rest / (peaks["fp32"] * 1e12)
    return max(min_bytes(b, length, d, which) / bandwidth, arith)


def measured_copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write counted)."""
    from triton.testing import do_bench

    n = 1 << 28
    a = torch.empty(n, device="cuda", dtype=torch.float32).normal_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=50, return_mode="median")
    return 2 * n * 4 / (ms * 1e-3)


def inputs(b: int, length: int, d: int, device: str, seed: int = 0):
    """Training-scale inputs (embeddings ~ N(0, 0.05^2), W ~ U(-0.05, 0.05)), left-padded
    windows with a random number of items, and an upstream gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, length, d, device=device, generator=g) * 0.05
    n = torch.randint(0, length + 1, (b,), device=device, generator=g)
    mask = torch.arange(length, device=device)[None, :] >= (length - n)[:, None]
    w = torch.empty(d, d, device=device).uniform_(-0.05, 0.05, generator=g)
    pos = position_encoding(length, d, device=device)
    up = torch.randn(b, d, device=device, generator=g)
    return x, mask, w, pos, up


def pass_fns(impl: str, precision: str, x, mask, w, pos, up, compiled) -> dict:
    """{timer: {pass: zero-argument callable}} for one implementation."""
    from fastattrec.kernels.attention import (
        attention_backward,
        attention_forward,
        short_term_attention_triton,
    )
    from fastattrec.kernels.experimental.attention_split import (
        short_term_attention_split,
        split_backward,
        split_forward,
    )

    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    if impl in BASELINES:
        fn = short_term_attention_reference if impl == "eager" else compiled
    elif impl == "split":
        def fn(a, m, c, p):
            return short_term_attention_split(a, m, c, p, precision)
    else:
        layout = "auto" if impl == "triton" else "blocks"

        def fn(a, m, c, p):
            return short_term_attention_triton(a, m, c, p, precision, layout)

    def fwd_nograd():
        with torch.no_grad():
            return fn(x, mask, w, pos)

    out = fn(xr, mask, wr, pos)
    autograd = {
        "fwd": fwd_nograd,
        "bwd": lambda: torch.autograd.grad(out, (xr, wr), up, retain_graph=True),
        "fwd+bwd": lambda: torch.autograd.grad(fn(xr, mask, wr, pos), (xr, wr), up),
    }
    if impl in BASELINES:
        graph = {"fwd": fwd_nograd, "fwd+bwd": autograd["fwd+bwd"]}
    elif impl == "split":
        saved = split_forward(x, mask, w, pos, precision)[1]
        graph = {"fwd": lambda: split_forward(x, mask, w, pos, precision),
                 "bwd": lambda: split_backward(up, x, mask, w, pos, saved, precision),
                 "fwd+bwd": lambda: split_backward(up, x, mask, w, pos,
                                                   split_forward(x, mask, w, pos, precision)[1],
                                                   precision)}
    else:
        layout = "auto" if impl == "triton" else "blocks"
        graph = {"fwd": lambda: attention_forward(x, mask, w, pos, precision, layout),
                 "bwd": lambda: attention_backward(up, x, mask, w, pos, precision, layout),
                 "fwd+bwd": lambda: (attention_forward(x, mask, w, pos, precision, layout),
                                     attention_backward(up, x, mask, w, pos, precision, layout))}
    return {"graph": graph, "autograd": autograd}


def time_fn(fn: Callable, timer: str, dry_run: bool) -> float:
    """Median milliseconds of `fn` with `timer`; NaN if it cannot be timed that way."""
    fn()  # compile, autotune and allocate outside any capture
    if dry_run:
        return math.nan
    from triton.testing import do_bench, do_bench_cudagraph

    try:
        if timer == "graph":
            return do_bench_cudagraph(fn, rep=50, return_mode="median")
        return do_bench(fn, warmup=10, rep=50, return_mode="median")
    except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. not capturable
        print(f"    ({timer} timing failed: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return math.nan


def fits(b: int, length: int, d: int, free: int, impl: str) -> bool:
    per = b * length * d * 4
    need = (14 * per + 6 * b * length * length * 4) if impl in BASELINES else 6 * per
    return need < 0.6 * free


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1024, 16384, 262144, 1048576])
    ap.add_argument("--length", type=int, nargs="+", default=[5])
    ap.add_argument("--dim", type=int, nargs="+", default=[100])
    ap.add_argument("--precision", nargs="+", default=["ieee", "tf32x3", "bf16x3"],
                    choices=PRECISIONS)
    ap.add_argument("--impls", nargs="+", default=["triton", "eager", "compile"],
                    choices=[*OURS, *BASELINES],
                    help="triton: the autotuned layout (tiles for L <= 8); blocks: the block "
                         "layout; split: projections in cuBLAS; eager / compile: the reference "
                         "plain or torch.compile'd (float32, TF32 off)")
    ap.add_argument("--timers", nargs="+", default=["graph", "autograd"],
                    choices=["graph", "autograd"])
    ap.add_argument("--out", type=Path, default=Path("results/bench_kernel.csv"))
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU rehearsal: tiny sizes, Triton in the interpreter, no timing")
    args = ap.parse_args()
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
        if "compile" in args.impls:  # inductor's CPU build says nothing about the GPU run
            print("dry run: torch.compile left out")
            args.impls.remove("compile")
        device, args.batch = "cpu", [3]
        args.length, args.dim = [min(n, 9) for n in args.length], [min(n, 20) for n in args.dim]
    elif not torch.cuda.is_available():
        print("bench_kernel needs a CUDA GPU (the Triton kernel's speed means nothing in the "
              "CPU interpreter); nothing measured. --dry-run rehearses on the CPU.")
        return 0
    else:
        device = "cuda"
    from fastattrec.kernels.launch import chosen_configs

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 baselines
    torch.backends.cudnn.allow_tf32 = False
    meta = machine()
    peaks = peaks_for(meta["device"]) or PEAKS["H100"]
    bandwidth = peaks["tbps"] * 1e12 if args.dry_run else measured_copy_bandwidth()
    meta.update({"copy_bandwidth_Bps": bandwidth, "peaks": peaks, "timers": args.timers})
    print(f"{meta['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"({'nominal, dry run' if args.dry_run else 'measured'}; "
          f"datasheet {peaks['tbps']} TB/s); peaks TFLOP/s fp32 {peaks['fp32']}, "
          f"tf32 {peaks['tf32']}, bf16 {peaks['bf16']}")
    compiled = None
    if "compile" in args.impls:
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False  # the bwd timer replays one graph
        compiled = torch.compile(short_term_attention_reference, dynamic=True)
    rows = {p: [] for p in args.precision}
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else 1 << 40
    ours = [i for i in args.impls if i in OURS]
    bases = [i for i in args.impls if i in BASELINES]
    for length in args.length:
        for d in args.dim:
            for b in args.batch:
                if not fits(b, length, d, free, "triton"):
                    print(f"skip B={b} L={length} d={d}: does not fit in GPU memory")
                    continue
                data = inputs(b, length, d, device)
                base_ms: dict[tuple, float] = {}
                for impl in bases:  # once per (B, pass), shared by every precision
                    if not fits(b, length, d, free, impl):
                        continue
                    fns = pass_fns(impl, "ieee", *data, compiled)
                    for timer in args.timers:
                        for which, fn in fns[timer].items():
                            base_ms[(impl, timer, which)] = time_fn(fn, timer, args.dry_run)
                    del fns
                for prec in args.precision:
                    ours_ms: dict[tuple, float] = {}
                    for impl in ours:
                        if impl != "triton" and length > 64:
                            continue  # blocks and split do not take long windows
                        fns = pass_fns(impl, prec, *data, compiled)
                        for timer in args.timers:
                            for which, fn in fns[timer].items():
                                ours_ms[(impl, timer, which)] = time_fn(fn, timer, args.dry_run)
                        del fns
                    for which in PASSES:
                        fl = floor_s(b, length, d, which, prec, bandwidth, peaks) * 1e3
                        fl32 = floor_s(b, length, d, which, "ieee", bandwidth, peaks) * 1e3
                        row = {"B": b, "L": length, "d": d, "pass": which, "precision": prec,
                               "floor_ms": fl, "floor_fp32_ms": fl32,
                               "min_bytes": min_bytes(b, length, d, which)}
                        for (impl, timer, w), ms in {**base_ms, **ours_ms}.items():
                            if w != which:
                                continue
                            key = f"{impl}_ms" if timer == "autograd" else f"{impl}_graph_ms"
                            row[key] = ms
                            row[key.replace("_ms", "_x_floor")] = ms / (
                                fl32 if impl in BASELINES else fl)
                        for impl in ours:
                            for base in bases:
                                for sfx in ("_ms", "_graph_ms"):
                                    if impl + sfx in row and base + sfx in row:
                                        row[f"{impl}_vs_{base}{sfx[:-3]}"] = \
                                            row[base + sfx] / row[impl + sfx]
                        rows[prec].append(row)
                del data
                if device == "cuda":
                    torch.cuda.empty_cache()
    meta["chosen_configs"] = {str(k): list(v) for k, v in chosen_configs().items()}
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  "
          f"sha {meta['git_sha']}")
    print("chosen configurations (kind, L, d, precision, B >= 16384, interpreted): config")
    for k, v in chosen_configs().items():
        print(f"  {k}: {v}")
    for prec, prow in rows.items():
        out = args.out if len(rows) == 1 else args.out.with_name(
            f"{args.out.stem}_{prec}{args.out.suffix}")
        write_csv(out, prow, {**meta, "precision": prec})
        cols = ["B", "L", "d", "pass", "floor_ms"]
        for impl in [*ours, *bases]:
            cols += [c for c in (f"{impl}_graph_ms", f"{impl}_ms") if any(c in r for r in prow)]
        for impl in ours:
            cols += [c for c in (f"{impl}_graph_x_floor", f"{impl}_vs_eager_graph",
                                 f"{impl}_vs_compile_graph", f"{impl}_vs_eager",
                                 f"{impl}_vs_compile") if any(c in r for r in prow)]
        print(f"\nprecision {prec} (baselines float32, TF32 off; x floor: time / floor)")
        print_table(prow, cols)
        print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
