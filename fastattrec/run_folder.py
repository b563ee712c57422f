"""The run folder on disk (format version 1; see docs/formats.md): what marks a folder as
a fastattrec run, how its config and checkpoints are read safely, and what `--force`
clears.

`checkpoint.pt` is the commit point of a run: it is written atomically after each epoch,
and `log.csv` / `metrics.jsonl` are written from its history only after it is in place
(and again on resume), so the logs never claim an epoch the checkpoint does not hold.
Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain containers
only, so a crafted file cannot run code.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from fastattrec.errors import UserError, quoted
from fastattrec.outputs import TMP_TAG, read_json_dict

RUN_KIND = "fastattrec-run"
RUN_FORMAT_VERSION = 1
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
# Everything a run writes; `train --force` removes exactly these (and stale temporaries).
RUN_FILES = (CONFIG, CHECKPOINT, BEST, "eval.json", "log.csv", "metrics.jsonl", "curves.png")
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "rng", "history", "best", "stale",
                   "config", "model_config")
BEST_KEYS = ("epoch", "model", "model_config", "config")


def is_run_folder(path: Path) -> bool:
    """True when `path` is a folder whose config.json says fastattrec train made it."""
    path = Path(path)
    cfg = read_json_dict(path / CONFIG) if path.is_dir() else None
    return cfg is not None and "train" in cfg and "fastattrec_version" in cfg


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run, checked, or one sentence on what is wrong with the folder."""
    run_dir = Path(run_dir)
    hint = f"train one with `fastattrec train DATA_DIR -o {quoted(run_dir)}`"
    if not run_dir.exists():
        raise UserError(f"{run_dir} does not exist; {hint}.")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is a file, not a run folder; {hint}.")
    path = run_dir / CONFIG
    if not path.exists():
        raise UserError(f"{run_dir} has no {CONFIG}, so it is not a fastattrec run; {hint}.")
    cfg = read_json_dict(path)
    if cfg is None or not isinstance(cfg.get("train"), dict):
        raise UserError(f"{path} is damaged (not the JSON object fastattrec writes); the run "
                        f"cannot be read — start it again with `fastattrec train DATA_DIR -o "
                        f"{quoted(run_dir)} --force`.")
    version = cfg.get("run_format_version", RUN_FORMAT_VERSION)
    if version != RUN_FORMAT_VERSION:
        raise UserError(f"{run_dir} has run format {version!r}, this fastattrec reads format "
                        f"{RUN_FORMAT_VERSION}; use the fastattrec version that made it.")
    return cfg


def load_checkpoint(path: Path, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict[str, Any]:
    """A checkpoint's contents, loaded without unpickling code; one sentence if the file
    is damaged, not a fastattrec checkpoint, or refused as unsafe."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip, EOF and I/O errors all mean the same
        text = str(e)
        unsafe = "Unsupported global" in text or "GLOBAL" in text
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
        first = first if len(first) <= 160 else first[:157].rsplit(" ", 1)[0] + "..."
        why = ("it asks to rebuild Python objects other than tensors, which fastattrec never "
               "writes, so it is refused as unsafe" if unsafe else f"it is damaged: {first}")
        raise UserError(f"{path} cannot be loaded ({why}); use a checkpoint that "
                        f"fastattrec wrote, or start the run again with --force.") from None
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise UserError(f"{path} is not a fastattrec checkpoint (keys missing); use one that "
                        f"fastattrec wrote, or start the run again with --force.")
    bad = [k for k, v in state["model"].items() if torch.is_tensor(v)
           and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{path} holds non-finite weights ({', '.join(bad)}); the run "
                        f"diverged — start it again with a lower --lr.")
    return state


def clear_run(run_dir: Path) -> list[Path]:
    """Remove what an earlier run wrote in `run_dir` (for `train --force`): the files of
    RUN_FILES and stale temporaries. Anything else in the folder is left alone."""
    removed = []
    for name in RUN_FILES:
        p = Path(run_dir) / name
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p)
    removed += remove_run_temporaries(run_dir)
    return removed


def remove_run_temporaries(run_dir: Path) -> list[Path]:
    """Delete `.NAME.tmp-*` files a killed run left inside `run_dir` (under its lock)."""
    removed = []
    for name in RUN_FILES:
        for p in Path(run_dir).glob(f".{name}{TMP_TAG}*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p)
    return removed
