"""benchmarks/plots.py draws every figure of docs/RESULTS.md, from the committed result
CSVs and from fresh benchmark output, as valid PNG files of a committable size."""

import csv
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "plots.py"
FIGURES = ("cpu_speed_vs_notebook.png", "gpu_speed.png", "kernel_vs_baselines.png",
           "quality_vs_notebook.png", "quality_ablation.png", "long_windows.png",
           "preset_choice.png", "tune_ml100k.png")
MAX_BYTES = 120 * 1024  # the figures aim at under 80 KB; this leaves room for other versions


def check_png(path: Path) -> tuple[int, int]:
    """Walk the chunks of a PNG file (signature, IHDR first, CRCs, IEND last), decode it,
    and return its (width, height)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name}: not a PNG signature"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path.name}: bad CRC in {kind!r}"
        kinds.append(kind)
        pos += 12 + length
    assert pos == len(data), f"{path.name}: trailing bytes"
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    width, height = struct.unpack(">II", data[16:24])
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == (height, width)
    assert pixels.std() > 0, f"{path.name}: a blank image"
    return width, height


def run_plots(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, check=False, cwd=ROOT)


def test_figures_from_committed_results(tmp_path):
    res = run_plots("--out", tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FIGURES)
    for name in FIGURES:
        path = tmp_path / name
        width, height = check_png(path)
        assert 400 <= width <= 2000 and 200 <= height <= 1000, (name, width, height)
        assert path.stat().st_size <= MAX_BYTES, (name, path.stat().st_size)
        assert name in res.stdout


def _write_bench(path: Path, rows: list[dict], meta: dict) -> None:
    """The layout benchmarks/common.py writes: a CSV and a JSON of machine facts beside it."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    path.with_suffix(".json").write_text(json.dumps(meta))


def test_figures_from_fresh_benchmark_output(tmp_path):
    kernel = [{"B": b, "L": 5, "d": 100, "pass": p, "triton_ms": b / 2e4, "eager_ms": b / 1e4,
               "compile_ms": b / 1.2e4, "min_bytes": 2000 * b, "floor_ms": b / 1e6}
              for b in (1024, 16384) for p in ("fwd", "fwd+bwd")]
    train = [{"config": "fastattrec", "kernel": "structured", "runs": 1, "epoch_s_median": 1.5,
              "eval_sampled_s": 0.02, "eval_full_s": 0.03},
             {"config": "baseline torch no-compile", "kernel": "torch", "runs": 1,
              "epoch_s_median": 1.9, "eval_sampled_s": 0.02, "eval_full_s": 0.03}]
    _write_bench(tmp_path / "k.csv", kernel, {"device": "NVIDIA H200", "precision": "ieee"})
    _write_bench(tmp_path / "t.csv", train, {"device": "cpu", "data": "synthetic ml-100k"})
    out = tmp_path / "figs"
    res = run_plots("--out", out, "--bench-kernel", tmp_path / "k.csv",
                    "--bench-train", tmp_path / "t.json")
    assert res.returncode == 0, res.stderr
    for name in ("bench_kernel_k.png", "bench_train_t.png", *FIGURES):
        check_png(out / name)


def test_refuses_a_file_of_the_wrong_kind(tmp_path):
    _write_bench(tmp_path / "x.csv", [{"a": 1}], {})
    res = run_plots("--out", tmp_path / "figs", "--bench-kernel", tmp_path / "x.csv")
    assert res.returncode != 0 and "not bench_kernel.py output" in res.stderr
