"""The run folder on disk (format version 1; see docs/formats.md): what marks a folder as
a fastattrec run, how its config and checkpoints are read and written safely, what
`--force` clears, and where a run stands (`RunState`) when it opens or resumes.

`checkpoint.pt` is the commit point of a run: it is written atomically after each epoch,
and `log.csv` / `metrics.jsonl` are written from its history only after it is in place
(and again on resume), so the logs never claim an epoch the checkpoint does not hold.
Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain containers
only, so a crafted file cannot run code.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastattrec.atomic import atomic_path, atomic_write_json, atomic_write_text
from fastattrec.config import RESUME_CHANGES, AttRecConfig, TrainConfig
from fastattrec.data.dataset import fingerprint
from fastattrec.errors import UserError, first_error_line, quoted, shown
from fastattrec.outputs import claim_output, read_json_dict
from fastattrec.version import VERSION as __version__

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
LOG_COLUMNS = ("Iteration", "fit_time", "evaluate_time", "hit_rate", "ndcg", "mrr")


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
        raise UserError(f"{quoted(run_dir)} does not exist; {hint}.")
    if not run_dir.is_dir():
        raise UserError(f"{quoted(run_dir)} is a file, not a run folder; {hint}.")
    path = run_dir / CONFIG
    if not path.exists() and (run_dir / "meta.json").exists():
        raise UserError(f"{quoted(run_dir)} is a prepared dataset, not a run; train one with "
                        f"`fastattrec train {quoted(run_dir)} -o RUN_DIR`.")
    if not path.exists():
        raise UserError(f"{quoted(run_dir)} has no {CONFIG}, so it is not a fastattrec run; "
                        f"{hint}.")
    cfg = read_json_dict(path)
    if cfg is None or not isinstance(cfg.get("train"), dict):
        raise UserError(f"{quoted(path)} is damaged (not the JSON object fastattrec writes); "
                        f"the run cannot be read — start it again with `fastattrec train "
                        f"DATA_DIR -o {quoted(run_dir)} --force`.")
    version = cfg.get("run_format_version", RUN_FORMAT_VERSION)
    if type(version) is not int:  # noqa: E721 - bool and str are not versions
        raise UserError(f"{quoted(path)} gives run_format_version as {shown(version)}, but "
                        f"fastattrec writes the number {RUN_FORMAT_VERSION}: the file was "
                        f"edited; start the run again with --force.")
    if version != RUN_FORMAT_VERSION:
        raise UserError(f"{quoted(run_dir)} has run format {version}, this fastattrec reads format "
                        f"{RUN_FORMAT_VERSION}; use the fastattrec version that made it.")
    data = cfg.get("data", {})
    if not isinstance(data, dict) or not isinstance(data.get("path", ""), str) or \
            not isinstance(cfg["train"].get("data_dir", ""), str):
        raise UserError(f"{quoted(path)} is damaged (its data path is not text); start the "
                        f"run again with --force.")
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
        raise UserError(f"{quoted(path)} cannot be loaded ({why}); use a checkpoint that "
                        f"fastattrec wrote, or start the run again with --force.") from None
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise UserError(f"{quoted(path)} is not a fastattrec checkpoint (keys missing); use "
                        f"one that fastattrec wrote, or start the run again with --force.")
    problem = _malformed(state)
    if problem:
        raise UserError(f"{quoted(path)} is not a checkpoint fastattrec wrote ({problem}); use one "
                        f"that fastattrec wrote, or start the run again with --force.")
    bad = [k for k, v in state["model"].items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{quoted(path)} holds non-finite weights ({', '.join(bad)}); the run "
                        f"diverged — start it again with a lower --lr.")
    return state


def committed_epoch(run_dir: Path) -> int | None:
    """The epoch that checkpoint.pt holds, the run's last committed one (None: no readable
    checkpoint); for saying what an interrupted run kept, so the weights are not read."""
    try:
        state = torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=True,
                           mmap=True)
    except Exception:  # noqa: BLE001 - missing, damaged or refused: nothing usable is kept
        return None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return epoch if type(epoch) is int else None  # noqa: E721 - no bool


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


def _csv_text(history: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(LOG_COLUMNS)
    for h in history:
        if "test" in h:  # the sampled protocol; full ranking where there is none
            s = h["test"].get("sampled") or h["test"]["full"]
            k = h["k"]
            w.writerow([h["epoch"], f"{h['fit_time']:.4f}", f"{h['eval_time']:.4f}",
                        f"{s[f'HR@{k}']:.6f}", f"{s[f'NDCG@{k}']:.6f}", f"{s['MRR']:.6f}"])
    return buf.getvalue()


def write_logs(run_dir: Path, history: list[dict]) -> None:
    """log.csv (the notebook's columns) and metrics.jsonl (everything), both rewritten
    atomically from the checkpointed history, so they never disagree with it."""
    atomic_write_text(run_dir / "log.csv", _csv_text(history))
    atomic_write_text(run_dir / "metrics.jsonl",
                      "".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def plot_curves(run_dir: Path, history: list[dict]) -> bool:
    """curves.png, when matplotlib is installed: one panel per kind of quantity (losses;
    the validation metric, full ranking; test HR@K and NDCG@K, each protocol named), each
    with a title, labelled axes and integer epoch ticks. False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    ep = [h["epoch"] for h in history]
    k = history[0]["k"]
    tested = [h for h in history if "test" in h]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    loss, val, test = axes
    loss.plot(ep, [h["train_loss"] for h in history], label="train loss (without L2)")
    loss.plot(ep, [h["val_loss"] for h in history], label="validation loss (with L2)")
    loss.set(title="losses", ylabel="loss per sample")
    val.plot(ep, [h["val_metric"] for h in history], marker=".", label=history[0]["val_name"])
    val.set(title="validation (full ranking)", ylabel=history[0]["val_name"])
    for proto in (tested[0]["test"] if tested else ()):
        for name, style in ((f"HR@{k}", "o-"), (f"NDCG@{k}", "s--")):
            test.plot([h["epoch"] for h in tested], [h["test"][proto][name] for h in tested],
                      style, label=f"{name} ({proto})")
    test.set(title=f"test, every --eval-every epochs ({len(tested)} measured)",
             ylabel="metric")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:  # (no test epoch yet: an empty panel)
            ax.legend(fontsize="small")
    fig.suptitle(f"{run_dir.name}: AttRec training curves")
    fig.tight_layout()
    with atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temporary file and an atomic rename; a failed write (full
    disk, read-only folder) is one sentence naming the file. torch reports a full disk
    as a RuntimeError from its zip writer ("unexpected pos"), so the free space is asked
    for while the partial file is still there: less than the tensors need is a full disk."""
    free = None
    try:
        with atomic_path(path) as tmp:
            try:
                torch.save(payload, tmp)
            except RuntimeError:
                free = _free_bytes(path.parent)
                raise
    except RuntimeError as e:  # the temporary file is gone by now
        need = _tensor_bytes(payload)
        if free is not None and free < need + (1 << 20):
            raise UserError(f"cannot write {quoted(path)}: no space left on device "
                            f"({free / 2**20:,.1f} MiB free, the checkpoint needs about "
                            f"{need / 2**20:,.1f} MiB); free some space there, then continue "
                            f"with `fastattrec train --resume {quoted(path.parent)}`.") from None
        first = first_error_line(e)
        raise UserError(f"cannot write {quoted(path)} ({first}); check free space and "
                        f"permissions of {quoted(path.parent)}.") from None


def _free_bytes(folder: Path) -> int | None:
    """Bytes free to this user on the file system of `folder` (None when unknown)."""
    try:
        return int(shutil.disk_usage(folder).free)
    except OSError:
        return None


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: what its file needs, at least."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _to_host(obj: Any) -> Any:
    """A copy of a (nested) state with every tensor copied to host memory."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_host(v) for v in obj)
    return obj


class CheckpointWriter:
    """Commits epochs from a background thread, so the next epoch does not wait for the
    disk. The state is copied to host memory first (training keeps changing it); each file
    is written to a temporary name and renamed; the logs are rewritten from the committed
    history only after checkpoint.pt is in place (the commit point); `wait` joins."""

    def __init__(self, run_dir: Path) -> None:
        self._run_dir = run_dir
        self._thread = None
        self._error: BaseException | None = None

    def submit(self, files: list[tuple[Path, dict[str, Any]]], history: list[dict]) -> None:
        self.wait()
        files = [(p, _to_host(s)) for p, s in files]
        history = [dict(h) for h in history]

        def work() -> None:
            try:
                for path, state in files:
                    save_checkpoint(path, state)
                write_logs(self._run_dir, history)
            except BaseException as e:  # reported by wait()
                self._error = e

        self._thread = threading.Thread(target=work, daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


@dataclass
class RunState:
    """Where a run stands: what the checkpoint holds, or the start of a new run."""

    history: list[dict]
    best: dict[str, Any]
    stale: int
    epoch: int  # epochs done


def open_run(data_dir: Path | None, run_dir: Path, cfg: TrainConfig | None, resume: bool,
              log: Callable[[str], None]) -> tuple[TrainConfig, dict | None, dict]:
    """Set-up: the run's options, its checkpoint (None for a fresh start) and the saved
    config.json (empty for a new run). Resuming keeps the saved options, except --epochs,
    --device and --time-budget; a run killed before its first checkpoint starts over from
    them."""
    if not resume:
        cfg = cfg or TrainConfig()
        cfg.data_dir = str(Path(data_dir).resolve())
        return cfg, None, {}
    saved = read_run_config(run_dir)
    ckpt = None
    if (run_dir / CHECKPOINT).exists():
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
    else:
        log(f"{quoted(run_dir)} has no checkpoint yet (interrupted before its first epoch ended); "
            f"starting it over with its saved options")
    base = dict(ckpt["config"] if ckpt is not None else saved["train"])
    if data_dir is not None:  # the dataset moved: check_same_data checks it is the same
        base["data_dir"] = str(Path(data_dir).resolve())
    try:
        resumed = TrainConfig.from_dict(base)
        resumed.check()
    except (TypeError, UserError) as e:
        raise UserError(f"{quoted(run_dir / CONFIG)} holds options this fastattrec cannot use "
                        f"({str(e).rstrip('.')}); start the run again with --force.") from None
    if cfg is not None:  # only the options of RESUME_CHANGES change on resume
        done = ckpt["epoch"] if ckpt is not None else 0
        if cfg.epochs < done:
            raise UserError(f"--epochs {cfg.epochs} is fewer than the {done} epochs "
                            f"{quoted(run_dir)} has done; give --epochs {done} or more.")
        for name in RESUME_CHANGES:
            setattr(resumed, name, getattr(cfg, name))
    return resumed, ckpt, saved


def check_same_data(run_dir: Path, data_dir: Path, meta: dict, saved: dict,
                     ckpt: dict | None) -> str:
    """The dataset's fingerprint; on resume it must be the one the run started on."""
    fp = fingerprint(meta)
    recorded = (ckpt or {}).get("data_fingerprint") or saved.get("data", {}).get("fingerprint")
    if saved and recorded and recorded != fp:
        raise UserError(f"{quoted(data_dir)} is not the dataset {quoted(run_dir)} started on "
                        f"(it was prepared again or from other input: fingerprint {fp[:12]} vs "
                        f"{recorded[:12]}); restore that dataset, or start a new run.")
    return fp


@contextlib.contextmanager
def claim_run(run_dir: Path, data_dir: Path | None, resume: bool, force: bool,
               log: Callable[[str], None]) -> Iterator[None]:
    """Lock the run folder (one command at a time), tidy what a killed run left, and check
    that a new run may write there: empty, or with --force a fastattrec run folder."""
    if resume:
        with claim_output(run_dir, force=False, made_by_us=is_run_folder, what="run folder",
                          option="--resume", log=log, allow_existing=True):
            yield
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"{quoted(run_dir)} is a file; give a folder for the run with -o.")
    with claim_output(run_dir, force=force, made_by_us=is_run_folder, what="run folder",
                      inputs=[data_dir], log=log, allow_existing=not force):
        if run_dir.is_dir() and any(run_dir.iterdir()) and not force:
            if is_run_folder(run_dir):
                raise UserError(f"{quoted(run_dir)} already holds a run; choose another -o, "
                                f"pass --force to replace the run, or --resume it.")
            raise UserError(f"{quoted(run_dir)} already exists, is not empty and is not a "
                            f"fastattrec run; choose another -o (--force replaces only "
                            f"fastattrec's own runs).")
        yield


def restore(ckpt: dict | None, model: torch.nn.Module, opt: torch.optim.Optimizer,
            gens: dict[str, torch.Generator],
            log: Callable[[str], None] | None = None) -> RunState:
    """Resume: weights, optimiser state and generator states from the checkpoint. A run
    resumed on another kind of device (§3.7: allowed, not exact) re-seeds the generators
    whose saved state that device's generator cannot take, said once through `log`."""
    if ckpt is None:
        return RunState(history=[], best={"metric": -math.inf, "epoch": 0}, stale=0, epoch=0)
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])  # (KerasAdam keeps its own device options)
        reseeded = [name for name, g in gens.items() if not _set_state(g, ckpt["rng"][name])]
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = first_error_line(e, 160)
        raise UserError(f"the checkpoint does not fit this run's model ({first}); start the "
                        f"run again with --force.") from None
    if reseeded and log is not None:
        log(f"note: the checkpoint's random generators ({', '.join(reseeded)}) were saved on "
            f"another kind of device; they continue from seeds derived from their saved "
            f"states, so the rest of the run is reproducible but not the run an "
            f"uninterrupted one on the first device would have been.")
    return RunState(ckpt["history"], ckpt["best"], ckpt["stale"], ckpt["epoch"])


def _set_state(g: torch.Generator, state: torch.Tensor) -> bool:
    """Restore `g` from `state`, True; or, where `state` is another kind of generator's
    (the CPU's Mersenne Twister state and CUDA's Philox seed and offset differ in size),
    seed `g` from a hash of it, False: deterministic, a different stream."""
    if state.numel() == g.get_state().numel():
        g.set_state(state)
        return True
    digest = hashlib.sha256(state.to(torch.uint8).numpy().tobytes()).digest()
    g.manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return False


def write_config(run_dir: Path, cfg: TrainConfig, mcfg: AttRecConfig, meta: dict, fp: str,
                 choice: dict[str, Any] | None = None) -> None:
    """config.json: the run's options, its model, its data; `choice`: how the kernel was
    chosen on this device (`--kernel auto` on CUDA)."""
    atomic_write_json(run_dir / CONFIG, {
        "kind": RUN_KIND, "run_format_version": RUN_FORMAT_VERSION,
        "train": cfg.to_dict(), "model": mcfg.to_dict(), "fastattrec_version": __version__,
        "data": {"path": cfg.data_dir, "fingerprint": fp,
                 "source_sha256": meta["source"].get("sha256"), "counts": meta["counts"]},
        **({"kernel_choice": choice} if choice else {}),
    })


def commit(writer: CheckpointWriter, run_dir: Path, state: RunState, improved: bool,
           model: torch.nn.Module, opt: torch.optim.Optimizer,
           gens: dict[str, torch.Generator],
           cfg: TrainConfig, mcfg: AttRecConfig, fp: str) -> None:
    """Queue the epoch's checkpoint (and best.pt), then the logs written from it."""
    ckpt = {
        "epoch": state.epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
        "rng": {name: g.get_state() for name, g in gens.items()},
        "history": state.history, "best": state.best, "stale": state.stale,
        "config": cfg.to_dict(), "model_config": mcfg.to_dict(),
        "fastattrec_version": __version__, "data_fingerprint": fp,
    }
    files = [(run_dir / CHECKPOINT, ckpt)]
    if improved:
        files.insert(0, (run_dir / BEST, {
            "epoch": state.epoch, "model": ckpt["model"], "model_config": ckpt["model_config"],
            "config": ckpt["config"], "data_fingerprint": fp}))
    writer.submit(files, state.history)
