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

from pathlib import Path
from typing import Any

import torch

from fastattrec.errors import UserError, quoted, shown
from fastattrec.outputs import read_json_dict

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
    if type(version) is not int:  # noqa: E721 - bool and str are not versions
        raise UserError(f"{path} gives run_format_version as {shown(version)}, but fastattrec "
                        f"writes the number {RUN_FORMAT_VERSION}: the file was edited; start "
                        f"the run again with --force.")
    if version != RUN_FORMAT_VERSION:
        raise UserError(f"{run_dir} has run format {version}, this fastattrec reads format "
                        f"{RUN_FORMAT_VERSION}; use the fastattrec version that made it.")
    data = cfg.get("data", {})
    if not isinstance(data, dict) or not isinstance(data.get("path", ""), str) or \
            not isinstance(cfg["train"].get("data_dir", ""), str):
        raise UserError(f"{path} is damaged (its data path is not text); start the run again "
                        f"with --force.")
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
    problem = _malformed(state)
    if problem:
        raise UserError(f"{path} is not a checkpoint fastattrec wrote ({problem}); use one "
                        f"that fastattrec wrote, or start the run again with --force.")
    bad = [k for k, v in state["model"].items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{path} holds non-finite weights ({', '.join(bad)}); the run "
                        f"diverged — start it again with a lower --lr.")
    return state


def _malformed(state: dict[str, Any]) -> str:
    """What is wrong with a loaded checkpoint's structure ('' when nothing is)."""
    epoch = state["epoch"]
    if type(epoch) is not int or not 0 <= epoch < 10**9:  # noqa: E721
        return f"epoch is {shown(epoch)}"
    model = state["model"]
    if not isinstance(model, dict) or not all(
            torch.is_tensor(v) and v.layout == torch.strided and v.dtype == torch.float32
            for v in model.values()):
        return "the weights are not dense float32 tensors"
    for key, kind in (("config", dict), ("model_config", dict), ("history", list),
                      ("best", dict), ("optimizer", dict), ("rng", dict)):
        if key in state and not isinstance(state[key], kind):
            return f"{key} is a {type(state[key]).__name__}"
    if "history" in state and not all(isinstance(h, dict) for h in state["history"]):
        return "history holds something other than epoch records"
    if "best" in state and not (isinstance(state["best"].get("epoch"), int)
                                and isinstance(state["best"].get("metric"), int | float)):
        return "best is not an epoch and a metric"
    if "stale" in state and type(state["stale"]) is not int:  # noqa: E721
        return f"stale is {shown(state['stale'])}"
    return ""


def clear_run(run_dir: Path) -> list[Path]:
    """Remove what an earlier run wrote in `run_dir` (for `train --force`): the files of
    RUN_FILES (temporaries a killed run left were removed when the folder was locked).
    Anything else in the folder is left alone."""
    removed = []
    for name in RUN_FILES:
        p = Path(run_dir) / name
        if p.is_file() or p.is_symlink():
            p.unlink()
            removed.append(p)
    return removed
