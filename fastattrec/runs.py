"""Open a finished (or interrupted) training run: its config, data and weights."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from fastattrec.batches import DeviceData
from fastattrec.config import AttRecConfig, TrainConfig, check_value, flag_of
from fastattrec.data.dataset import Prepared, fingerprint, load_prepared
from fastattrec.errors import UserError, quoted, shown
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
        raise UserError(f"{quoted(run_dir / CONFIG)} holds options this fastattrec cannot use "
                        f"({str(e).rstrip('.')}); the file was changed after training.") from None
    if checkpoint not in ("auto", "best", "last"):
        raise UserError("--checkpoint must be auto, best or last.")
    if checkpoint == "auto":
        checkpoint = "best" if cfg.early_stop > 0 else "last"
    file = run_dir / (BEST if checkpoint == "best" else CHECKPOINT)
    if not file.exists():
        raise UserError(f"{quoted(file)} does not exist yet: the run has not finished an "
                        f"epoch.")
    dev = pick_device(device)
    stamp = checkpoint_stamp(file)
    state = load_checkpoint(file, BEST_KEYS)
    mcfg = model_config_of(file, state["model_config"], cfg, run_dir)
    data_path = Path(data_dir) if data_dir else Path(cfg.data_dir)
    prepared = load_prepared(data_path)
    recorded = state.get("data_fingerprint") or saved.get("data", {}).get("fingerprint")
    if recorded and recorded != fingerprint(prepared.meta):
        what = ("is not the dataset" if data_dir is not None else
                "has been prepared again since")
        raise UserError(f"{quoted(data_path)} {what} {quoted(run_dir)} was trained on (its "
                        f"fingerprint differs), so the model would be scored against other "
                        f"data; give --data the folder it was trained on (a copy is fine), or "
                        f"prepare it again exactly as before.")
    mcfg.kernel = resolve_backend(kernel or cfg.kernel, dev)
    if (mcfg.n_items, mcfg.n_users) != (prepared.n_item_rows, prepared.n_user_rows):
        raise UserError(f"the data in {quoted(prepared.path)} does not match the run in "
                        f"{quoted(run_dir)} (different item or user counts); give --data the "
                        f"folder it was trained on.")
    model = AttRec(mcfg).to(dev)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:160]
        raise UserError(f"{quoted(file)} does not fit its own model configuration "
                        f"({detail or e}); it is damaged.") from None
    model.eval()
    data = DeviceData.from_prepared(prepared, dev)
    return LoadedRun(run_dir, cfg, model, data, prepared, int(state["epoch"]), checkpoint,
                     stamp)


# The model's options that a run's config.json repeats: the checkpoint's are the truth.
MODEL_OPTIONS = ("dim", "maxlen", "mode", "w", "gamma", "embed_reg", "precision")


def model_config_of(file: Path, saved: dict, cfg: TrainConfig, run_dir: Path) -> AttRecConfig:
    """The model configuration a checkpoint holds, each field checked (the table sizes as
    whole numbers, every option within its bounds), and config.json's copy of the model
    options required to agree with it: a config.json edited after training would score the
    weights with another window length (a size mismatch, or a huge allocation)."""
    names = {f.name: f for f in fields(TrainConfig)}
    for key in ("n_users", "n_items"):
        v = saved.get(key)
        if type(v) is not int or v < 2:  # noqa: E721 - no bool; the padding row and one more
            raise UserError(f"{quoted(file)} gives its model's {key} as {shown(v)}; it is not "
                            f"a checkpoint fastattrec wrote — start the run again with --force.")
    for key in MODEL_OPTIONS:
        try:
            check_value(names[key], saved.get(key, names[key].default))
        except UserError as e:
            raise UserError(f"{quoted(file)} holds a model configuration this fastattrec "
                            f"cannot use ({str(e).rstrip('.')}); it is not a checkpoint "
                            f"fastattrec wrote — start the run again with --force.") from None
    try:
        mcfg = AttRecConfig(**saved)
    except (TypeError, ValueError) as e:
        raise UserError(f"{quoted(file)} holds a model configuration this fastattrec cannot "
                        f"read ({e}).") from None
    for key in MODEL_OPTIONS:
        if getattr(cfg, key) != getattr(mcfg, key):
            flag = flag_of(names[key])
            raise UserError(f"{quoted(run_dir / CONFIG)} says {flag} {getattr(cfg, key)} but "
                            f"the model in {quoted(file)} was trained with {flag} "
                            f"{getattr(mcfg, key)}; config.json was edited after training — "
                            f"set train.{key} back to {shown(getattr(mcfg, key))} there.")
    return mcfg


def checkpoint_stamp(path: Path) -> tuple[int, int]:
    """Identity of a checkpoint file (a new checkpoint is a new file, renamed in)."""
    try:
        st = Path(path).stat()
    except OSError:
        return (0, 0)
    return (st.st_ino, st.st_mtime_ns)
