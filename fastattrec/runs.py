"""Open a finished (or interrupted) training run: its config, data and weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastattrec.batches import DeviceData
from fastattrec.config import AttRecConfig, TrainConfig
from fastattrec.data.dataset import Prepared, fingerprint, load_prepared
from fastattrec.errors import UserError
from fastattrec.kernels import resolve_backend
from fastattrec.model import AttRec
from fastattrec.training.checkpoint import (
    BEST,
    BEST_KEYS,
    CHECKPOINT,
    CONFIG,
    load_checkpoint,
    read_run_config,
)
from fastattrec.training.system import pick_device


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: TrainConfig
    model: AttRec
    data: DeviceData
    prepared: Prepared
    epoch: int
    checkpoint: str
    stamp: tuple[int, int] = (0, 0)  # (inode, mtime_ns) of the checkpoint file loaded

    def unchanged(self) -> bool:
        """True while the checkpoint file loaded is still the one in the run folder."""
        return checkpoint_stamp(self.run_dir / (BEST if self.checkpoint == "best"
                                                else CHECKPOINT)) == self.stamp


def load_run(run_dir: Path, checkpoint: str = "auto", device: str = "auto",
             data_dir: Path | None = None, kernel: str | None = None) -> LoadedRun:
    """Load RUN_DIR's model (best.pt or checkpoint.pt) and its prepared data.

    checkpoint: "best" (best validation epoch), "last" (checkpoint.pt) or "auto" (best
    when the run used --early-stop, else last, which is what the notebook reports).
    """
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    try:
        cfg = TrainConfig.from_dict(saved["train"])
        cfg.check()
    except (TypeError, UserError) as e:
        raise UserError(f"{run_dir / CONFIG} holds options this fastattrec cannot use "
                        f"({str(e).rstrip('.')}); the file was changed after training.") from None
    if checkpoint not in ("auto", "best", "last"):
        raise UserError("--checkpoint must be auto, best or last.")
    if checkpoint == "auto":
        checkpoint = "best" if cfg.early_stop > 0 else "last"
    file = run_dir / (BEST if checkpoint == "best" else CHECKPOINT)
    if not file.exists():
        raise UserError(f"{file} does not exist yet: the run has not finished an epoch.")
    dev = pick_device(device)
    stamp = checkpoint_stamp(file)
    state = load_checkpoint(file, BEST_KEYS)
    data_path = Path(data_dir) if data_dir else Path(cfg.data_dir)
    prepared = load_prepared(data_path)
    recorded = state.get("data_fingerprint") or saved.get("data", {}).get("fingerprint")
    if recorded and recorded != fingerprint(prepared.meta):
        what = ("is not the dataset" if data_dir is not None else
                "has been prepared again since")
        raise UserError(f"{data_path} {what} {run_dir} was trained on (its fingerprint "
                        f"differs), so the model would be scored against other data; give "
                        f"--data the folder it was trained on (a copy is fine), or prepare "
                        f"it again exactly as before.")
    try:
        mcfg = AttRecConfig(**state["model_config"])
    except TypeError as e:
        raise UserError(f"{file} holds a model configuration this fastattrec cannot read "
                        f"({e}).") from None
    mcfg.kernel = resolve_backend(kernel or cfg.kernel, dev)
    if (mcfg.n_items, mcfg.n_users) != (prepared.n_item_rows, prepared.n_user_rows):
        raise UserError(f"the data in {prepared.path} does not match the run in {run_dir} "
                        f"(different item or user counts); give --data the folder it was "
                        f"trained on.")
    model = AttRec(mcfg).to(dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:160]
        raise UserError(f"{file} does not fit its own model configuration ({detail or e}); "
                        f"it is damaged.") from None
    model.eval()
    data = DeviceData.from_prepared(prepared, dev)
    return LoadedRun(run_dir, cfg, model, data, prepared, int(state["epoch"]), checkpoint,
                     stamp)


def checkpoint_stamp(path: Path) -> tuple[int, int]:
    """Identity of a checkpoint file (a new checkpoint is a new file, renamed in)."""
    try:
        st = Path(path).stat()
    except OSError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)
