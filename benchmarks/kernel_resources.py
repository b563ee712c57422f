"""Offline resource report: every kernel configuration the tuner may pick, compiled for
sm_90a (H100 / H200) on a machine without a GPU.

    python benchmarks/kernel_resources.py                 # L in {5, 50, 200}, d in {64, 100, 128}
    python benchmarks/kernel_resources.py --quick         # the default L=5, d=100 only
    python benchmarks/kernel_resources.py --quick --check --json out.json

For each (L, d), precision, kernel and candidate configuration (`resource_specs` of
`fastattrec.kernels.attention`: exactly what the launchers launch), `triton.compile` builds
the cubin for an explicit CUDA target (GPUTarget("cuda", 90, 32)); the `cuobjdump` that
Triton's wheel ships reads its resource usage and its SASS. Printed per kernel:

- regs: registers per thread; stack: the local-memory frame in bytes (spills and arrays
  that went to local memory), and LDL/STL, the local loads and stores in the SASS;
- smem: shared memory per program in KB (Triton's dynamic allocation plus static);
- CTAs/SM: programs that fit on one multiprocessor at once, from registers, shared memory
  and threads (65536 registers allocated per warp in units of 256, 228 KB of shared
  memory with 1 KB reserved per program, 2048 threads, 32 programs);
- HGMMA / HMMA / FFMA: Hopper warpgroup tensor-core instructions, older warp-level
  tensor-core instructions, and float32 fused multiply-adds.

`--check` exits 1 when a configuration spills (stack > 0 or any LDL/STL), when a kernel
in a tensor-core precision (tf32, tf32x3, bf16x3) has no HGMMA or HMMA, or when the
embedding scatter or gather (which must be deterministic) has atomics (RED*, ATOM*).
The training step's other Triton kernels (the embedding gather and scatter, the
attention's position terms, the pairwise loss, the Keras Adam, the step's prologue and
bookkeeping) are compiled for every d as well. This is how kernel
changes are judged before any GPU time; the GPU only measures. Run it with
TRITON_INTERPRET unset (the interpreter replaces the kernels by Python functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARCH = 90  # sm_90a: H100 and H200
REGS_PER_SM, SMEM_PER_SM, THREADS_PER_SM, CTAS_PER_SM = 65536, 228 * 1024, 2048, 32
SMEM_RESERVED_PER_CTA = 1024
OPS = ("HGMMA", "HMMA", "FFMA", "LDL", "STL")


def tool_path(name: str) -> Path:
    """A tool that Triton's wheel ships (ptxas, cuobjdump) for the NVIDIA backend."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def toolchain_problem() -> str | None:
    """Why the offline compile cannot run here, or None when it can."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set (the kernels are interpreter functions)"
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        return f"triton's compiler does not import ({e})"
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return "triton has no NVIDIA backend here"
    for name in ("cuobjdump", "ptxas"):
        if not os.access(tool_path(name), os.X_OK):
            return f"{tool_path(name)} is missing"
    return None


def occupancy(regs: int, smem: int, threads: int) -> int:
    """Programs per multiprocessor on sm_90 from registers, shared memory and threads."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_smem = SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)
    by_threads = THREADS_PER_SM // threads
    return max(0, min(by_regs, by_smem, by_threads, CTAS_PER_SM))


def sass_counts(sass: str) -> Counter:
    """Opcode counts (predicates and modifiers stripped) of a cuobjdump SASS listing."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return Counter(ops)


def compile_spec(spec, arch: int = ARCH) -> dict:
    """Compile one KernelSpec for sm_{arch}a and measure it. Returns a row of the report."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = spec.signature()
    ptr_args = {(i,): [["tt.divisibility", 16]]  # torch's allocations are 16-byte aligned
                for i, name in enumerate(spec.fn.arg_names) if name.endswith("_ptr")}
    src = ASTSource(spec.fn, sig, spec.constexprs, ptr_args)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps,
                                     "num_stages": spec.num_stages})
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(tool_path("cuobjdump")), "--dump-resource-usage",
                                str(cubin)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(tool_path("cuobjdump")), "--dump-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    regs, stack = int(fields.get("REG", 0)), int(fields.get("STACK", 0))
    smem = int(kernel.metadata.shared) + int(fields.get("SHARED", 0))
    threads = spec.num_warps * 32
    ops = sass_counts(sass)
    row = {"kind": spec.kind, "config": list(spec.config), "regs": regs, "stack": stack,
           "local": int(fields.get("LOCAL", 0)), "smem": smem, "threads": threads,
           "ctas_per_sm": occupancy(regs, smem, threads), "compile_s": round(seconds, 1),
           "triton": triton.__version__}
    row.update({op: ops.get(op, 0) for op in OPS})
    row["atomics"] = sum(n for op, n in ops.items() if op.startswith(("RED", "ATOM")))
    row["spills"] = bool(stack or row["local"] or row["LDL"] or row["STL"])
    return row


def _job(args: tuple[int, int, str, int, str]) -> list[dict]:
    """All kernels of one (L, d, precision) (run in a worker process)."""
    from fastattrec.kernels.attention import resource_specs

    length, dim, precision, arch, layout = args
    if layout == "all":  # the experimental split layout lists its kernels when imported
        import fastattrec.kernels.experimental.attention_split  # noqa: F401
    rows = []
    for spec in resource_specs(length, dim, precision, layout):
        row = {"L": length, "d": dim, "precision": precision}
        try:
            row.update(compile_spec(spec, arch))
        except Exception as e:  # a configuration that does not compile is a finding too
            while e.__cause__ is not None:  # the compiler's own message is innermost
                e = e.__cause__
            row.update({"kind": spec.kind, "config": list(spec.config),
                        "error": f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}"})
        rows.append(row)
    return rows


def _step_job(args: tuple[int, int]) -> list[dict]:
    """The training step's other kernels at row width d: the embedding gather and
    scatter, the attention's position terms, the pairwise loss, the Keras Adam, the
    step's prologue and bookkeeping (L does not apply)."""
    from fastattrec.kernels import position_terms
    from fastattrec.kernels.experimental import (
        embedding_gather,
        embedding_scatter,
        keras_adam,
        pair_loss,
        step_prologue,
        step_tail,
    )

    dim, arch = args
    rows = []
    for spec in (embedding_gather.resource_specs(dim) + embedding_scatter.resource_specs(dim)
                 + position_terms.resource_specs(dim) + pair_loss.resource_specs(dim)
                 + keras_adam.resource_specs() + step_tail.resource_specs()
                 + step_prologue.resource_specs(dim)):
        row = {"L": "-", "d": dim, "precision": "ieee"}
        try:
            row.update(compile_spec(spec, arch))
        except Exception as e:  # noqa: BLE001 - reported as a finding
            row.update({"kind": spec.kind, "config": list(spec.config),
                        "error": f"{type(e).__name__}: {' '.join(str(e).split())[-300:]}"})
        rows.append(row)
    return rows


def report(lengths: list[int], dims: list[int], precisions: list[str], arch: int = ARCH,
           workers: int = 2, layout: str = "auto") -> list[dict]:
    """Rows for every (L, d, precision, kernel, candidate), then the step's other kernels
    (gather, scatter, position terms, Adam) per d."""
    jobs = [(ln, d, p, arch, layout) for ln in lengths for d in dims for p in precisions]
    if workers <= 1:
        rows = [r for j in jobs for r in _job(j)]
        return rows + [r for d in dims for r in _step_job((d, arch))]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = [r for rows in pool.map(_job, jobs) for r in rows]
        return rows + [r for rs in pool.map(_step_job, [(d, arch) for d in dims]) for r in rs]


def problems(rows: list[dict]) -> list[str]:
    """One sentence per configuration the tuner may pick that spills, fails to compile, or
    lacks tensor-core instructions in a tensor-core precision."""
    from fastattrec.kernels.precision import TENSOR_CORE

    out = []
    for r in rows:
        name = f"{r['kind']} {tuple(r['config'])} {r['precision']} L={r['L']} d={r['d']}"
        if "error" in r:
            out.append(f"{name}: does not compile ({r['error']})")
            continue
        if r["spills"]:
            out.append(f"{name}: spills (stack {r['stack']} B, {r['LDL']} LDL, "
                       f"{r['STL']} STL)")
        if r["kind"] in ("scatter_rows", "gather_rows", "step_prologue") and r["atomics"]:
            out.append(f"{name}: atomics in a kernel meant to be deterministic")
        if r["precision"] in TENSOR_CORE and not (r["HGMMA"] or r["HMMA"]):
            out.append(f"{name}: no tensor-core instruction (HGMMA/HMMA) in a tensor-core "
                       "precision")
    return out


def print_rows(rows: list[dict]) -> None:
    cols = ["L", "d", "precision", "kind", "config", "regs", "stack", "smem_KB", "CTAs/SM",
            *OPS, "atomics", "compile_s"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([str(r["L"]), str(r["d"]), r["precision"], r["kind"],
                          str(tuple(r["config"])), "error: " + r["error"][:60]])
            continue
        cells.append([str(r["L"]), str(r["d"]), r["precision"], r["kind"],
                      str(tuple(r["config"])), str(r["regs"]), str(r["stack"]),
                      f"{r['smem'] / 1024:.1f}", str(r["ctas_per_sm"]),
                      *(str(r[o]) for o in OPS), str(r["atomics"]),
                      f"{r['compile_s']:.1f}"])
    widths = [max([len(c)] + [len(x[i]) for x in cells if i < len(x)])
              for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for x in cells:
        print("  ".join(v.rjust(w) for v, w in zip(x, widths, strict=False)))


def main() -> int:
    from fastattrec.kernels.precision import PRECISIONS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="only the default configuration, L=5 and d=100")
    ap.add_argument("--length", type=int, nargs="+", default=[5, 50, 200])
    ap.add_argument("--dim", type=int, nargs="+", default=[64, 100, 128])
    ap.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--layout", default="auto", choices=["auto", "all"],
                    help="auto: the layout the launcher picks for each L; all: every layout "
                         "that can take it (tiles, blocks, the split layout, long)")
    ap.add_argument("--arch", type=int, default=ARCH, help="compute capability, e.g. 90")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="compile processes")
    ap.add_argument("--json", type=Path, help="write the rows here as JSON")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on a spill or a tensor-core precision without tensor cores")
    args = ap.parse_args()
    why = toolchain_problem()
    if why:
        print(f"kernel_resources: cannot compile offline: {why}.")
        return 2 if args.check else 0
    lengths, dims = ([5], [100]) if args.quick else (args.length, args.dim)
    t0 = time.perf_counter()
    rows = report(lengths, dims, args.precision, args.arch, args.workers, args.layout)
    print_rows(rows)
    print(f"{len(rows)} kernels compiled for sm_{args.arch}a in "
          f"{time.perf_counter() - t0:.0f} s (triton {rows[0].get('triton', '?')})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    found = problems(rows)
    for p in found:
        print("PROBLEM:", p)
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
