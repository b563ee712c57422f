"""The wheel holds `kernels/` as `fastattrec.kernels` (with its `experimental` subpackage),
and it imports from anywhere."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_file_list(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("fastattrec-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("fastattrec/__init__.py", "fastattrec/cli.py", "fastattrec/model.py",
              "fastattrec/config.py", "fastattrec/training/loop.py",
              "fastattrec/training/step.py", "fastattrec/training/cpu_step.py",
              "fastattrec/experimental/steps.py",
              "fastattrec/evaluate.py", "fastattrec/data/prepare.py",
              "fastattrec/kernels/__init__.py", "fastattrec/kernels/reference.py",
              "fastattrec/kernels/attention.py", "fastattrec/kernels/structured.py",
              "fastattrec/kernels/block_layout.py", "fastattrec/kernels/attention_tiles.py",
              "fastattrec/kernels/experimental/__init__.py",
              "fastattrec/kernels/experimental/attention_split.py",
              "fastattrec/kernels/experimental/embedding_scatter.py",
              "fastattrec/kernels/experimental/emulation.py"):
        assert f in names, f
    # the modules that moved to experimental/ are not shipped at their old paths
    for old in ("attention_split", "emulation", "embedding_gather", "embedding_scatter",
                "pair_loss", "step_prologue", "step_tail", "keras_adam"):
        assert f"fastattrec/kernels/{old}.py" not in names, old
    for old in ("training", "run_folder", "cpu_step", "epoch_batches"):  # became packages
        assert f"fastattrec/{old}.py" not in names, old
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fastattrec = fastattrec.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_import_kernels_outside_repository(tmp_path):
    code = ("import fastattrec.kernels as k, pathlib; "
            "print(k.short_term_attention.__name__, k.BACKENDS)")
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, check=True,
                         capture_output=True, text=True)
    assert "short_term_attention" in out.stdout and "triton" in out.stdout


def test_console_script_help():
    exe = Path(sys.executable).with_name("fastattrec")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    for cmd in ("synth", "prep", "train", "evaluate", "recommend", "download"):
        assert cmd in out.stdout
