"""Open a finished (or interrupted) training run: its config, data and weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastattrec.batches import DeviceData
from fastattrec.data.dataset import Prepared, load_prepared
from fastattrec.errors import UserError
from fastattrec.kernels import resolve_backend
from fastattrec.model import AttRec, AttRecConfig
from fastattrec.train import TrainConfig, pick_device


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: TrainConfig
    model: AttRec
    data: DeviceData
    prepared: Prepared
    epoch: int
    checkpoint: str


def load_run(run_dir: Path, checkpoint: str = "auto", device: str = "auto",
             data_dir: Path | None = None, kernel: str | None = None) -> LoadedRun:
    """Load RUN_DIR's model (best.pt or checkpoint.pt) and its prepared data.

    checkpoint: "best" (best validation epoch), "last" (checkpoint.pt) or "auto" (best
    when the run used --early-stop, else last, which is what the notebook reports).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a run folder; train one with "
                        f"`fastattrec train DATA_DIR -o {run_dir}`.")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{run_dir} has no config.json, so it is not a fastattrec run; "
                        f"train one with `fastattrec train DATA_DIR -o {run_dir}`.")
    cfg = TrainConfig.from_dict(json.loads(cfg_path.read_text())["train"])
    if checkpoint not in ("auto", "best", "last"):
        raise UserError("--checkpoint must be auto, best or last.")
    if checkpoint == "auto":
        checkpoint = "best" if cfg.early_stop > 0 else "last"
    file = run_dir / ("best.pt" if checkpoint == "best" else "checkpoint.pt")
    if not file.exists():
        raise UserError(f"{file} does not exist yet: the run has not finished an epoch.")
    dev = pick_device(device)
    state = torch.load(file, map_location="cpu", weights_only=False)
    prepared = load_prepared(Path(data_dir) if data_dir else Path(cfg.data_dir))
    mcfg = AttRecConfig(**state["model_config"])
    mcfg.kernel = resolve_backend(kernel or cfg.kernel, dev)
    if (mcfg.n_items, mcfg.n_users) != (prepared.n_item_rows, prepared.n_user_rows):
        raise UserError(f"the data in {prepared.path} does not match the run in {run_dir} "
                        f"(different item or user counts); pass the DATA_DIR it was trained on.")
    model = AttRec(mcfg).to(dev)
    model.load_state_dict(state["model"])
    model.eval()
    data = DeviceData.from_prepared(prepared, dev)
    return LoadedRun(run_dir, cfg, model, data, prepared, int(state["epoch"]), checkpoint)
