"""The offline resource report for the default configuration (L=5, d=100): every kernel
and candidate configuration the tuner may pick, in every precision, compiled for sm_90a
without a GPU (`benchmarks/kernel_resources.py --quick`).

Fails when a configuration spills to local memory, does not compile, or when a
tensor-core precision compiles to no tensor-core instruction. Skips, saying why, where
Triton's offline compiler or the ptxas/cuobjdump of its wheel is missing. The report runs
in a child process without TRITON_INTERPRET (which conftest.py sets on machines without a
GPU: under it the kernels are interpreter functions and cannot be compiled).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastattrec.kernels import PRECISIONS, TENSOR_CORE

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_resources.py"


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("resources") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--check", "--json",
                          str(out)], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode == 2:  # the script's answer when the toolchain is missing
        pytest.skip(res.stdout.strip() or res.stderr.strip()[-300:])
    assert out.exists(), f"no report written:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return json.loads(out.read_text()), res


def test_every_kernel_compiled(rows):
    data, res = rows
    errors = [f"{r['kind']} {r['config']} {r['precision']}: {r['error']}"
              for r in data if "error" in r]
    assert not errors, "\n".join(errors)
    kinds = {(r["kind"], r["precision"]) for r in data}
    for prec in PRECISIONS:  # both passes of the default layout, in every precision
        assert {(k, prec) for k in ("tile_fwd", "tile_bwd")} <= kinds, kinds


def test_no_candidate_spills(rows):
    data, res = rows
    spilling = [f"{r['kind']} {tuple(r['config'])} {r['precision']}: stack {r['stack']} B, "
                f"{r['LDL']} LDL, {r['STL']} STL" for r in data if r.get("spills")]
    assert not spilling, "\n".join(spilling)


def test_tensor_core_precisions_use_tensor_cores(rows):
    data, res = rows
    missing = [f"{r['kind']} {tuple(r['config'])} {r['precision']}" for r in data
               if r["precision"] in TENSOR_CORE and not (r["HGMMA"] or r["HMMA"])]
    assert not missing, "no HGMMA/HMMA in: " + ", ".join(missing)
    # and ieee really is the FMA path (the report can tell the two apart)
    assert all(r["HGMMA"] == r["HMMA"] == 0 for r in data if r["precision"] == "ieee")


def test_every_candidate_fits_on_the_chip(rows):
    data, res = rows
    assert all(r["ctas_per_sm"] >= 1 for r in data), [
        (r["kind"], r["config"], r["precision"], r["regs"], r["smem"]) for r in data
        if r["ctas_per_sm"] < 1]
    assert res.returncode == 0, res.stdout[-3000:]


def _report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kernel_resources", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_occupancy_and_sass_parsing():
    """The report's arithmetic, on numbers worked out by hand (no compiler needed)."""
    mod = _report_module()
    # 255 registers -> 8192 per warp (units of 256) -> 8 warps -> 2 programs of 4 warps
    assert mod.occupancy(255, 9 * 1024, 128) == 2
    # 32 registers, 2 warps: threads allow 32 programs, the cap is 32
    assert mod.occupancy(32, 0, 64) == 32
    # shared memory binds: 228 KB / (100 KB + 1 KB reserved) = 2
    assert mod.occupancy(64, 100 * 1024, 128) == 2
    sass = ("        /*0410*/                   HGMMA.64x32x8.F32.TF32 gdesc[UR4], RZ ;\n"
            "        /*0420*/              @!P0 FFMA R1, R2, R3, R4 ;\n"
            "        /*0430*/                   LDL.64 R2, [R1+0x8] ;\n")
    ops = mod.sass_counts(sass)
    assert (ops["HGMMA"], ops["FFMA"], ops["LDL"], ops["STL"]) == (1, 1, 1, 0)


def test_the_step_kernels_compile_and_the_scatter_has_no_atomics(rows):
    """The embedding gather and scatter (for one plan and for a step of an epoch's plan),
    the attention's position terms, the pairwise loss, the Keras Adam and the step's
    bookkeeping compile too; the gather and the scatter, deterministic by design, have no atomic
    instruction (RED*/ATOM*, counted from the SASS)."""
    data, res = rows
    step = [r for r in data if r["L"] == "-"]
    assert sorted(r["kind"] for r in step) == ["gather_rows", "keras_adam",
                                               "pair_loss_dist", "pair_loss_inner",
                                               "position_projection", "reduce_weight_grad",
                                               "scatter_rows", "scatter_rows",
                                               "step_prologue", "step_tail",
                                               "step_tail_parts"], step
    assert all("error" not in r for r in step), step
    assert all(r["atomics"] == 0 for r in step)
