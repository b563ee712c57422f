"""A trained run as one file a serving stack loads (docs/formats.md §5): torch.export's
`.pt2` program or an ONNX graph, both computing the run's goodness of every item.

The exported function is `goodness(users, windows)`: user rows (B,) int64 (0: a user the
model was not trained on, scored with the mean trained user, spec §4.10) and windows (B, L)
int64 of item rows, oldest first, left-padded with 0 -> (B, n_item_rows) float32, higher is
better, -inf on rows that are not items. The id maps (raw id -> row) travel inside the
file as JSON, so a caller needs nothing else from the run folder; leaving out the items a
user has seen is the caller's step, as `recommend` does it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastattrec.atomic import atomic_path
from fastattrec.errors import UserError, first_error_line, quoted
from fastattrec.runs import LoadedRun
from fastattrec.version import VERSION as __version__

EXPORT_FORMATS = (".pt2", ".onnx")
KIND = "fastattrec-model"
META_NAME = "fastattrec.json"  # the extra file of a .pt2; the ONNX metadata key "fastattrec"
ONNX_HINT = "pip install onnx onnxscript (and onnxruntime to run it)"


class Goodness(nn.Module):
    """The run's scores as a plain module: AttRec's tables on the reference attention."""

    def __init__(self, run: LoadedRun) -> None:
        super().__init__()
        self.model = run.model
        self.register_buffer("not_items", ~run.data.item_valid.cpu())  # (n_item_rows,)

    def forward(self, users: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        m = self.model
        g = m.goodness_of_rows(m.user_rows(users), m.short_term(windows))  # (B, I)
        return g.masked_fill(self.not_items[None, :], -math.inf)


def export_format(path: Path) -> str:
    """The format of an export from its file name; `.pt` (TorchScript's name, which torch
    deprecates) and anything else refused in one sentence."""
    ext = Path(path).suffix.lower()
    if ext == ".pt":
        raise UserError(f"-o {path}: a .pt file reads as TorchScript, which torch deprecates; "
                        f"name it .pt2 (torch.export, loaded with torch.export.load) or .onnx.")
    if ext not in EXPORT_FORMATS:
        raise UserError(f"-o {path}: the format is taken from the file name, which must end in "
                        f".pt2 (torch.export) or .onnx.")
    if ext == ".onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError(f"-o {path}: an ONNX export needs the onnx and onnxscript "
                            f"packages; {ONNX_HINT}, or export to .pt2.") from None
    return ext


def metadata(run: LoadedRun) -> dict[str, Any]:
    """What a caller needs beside the graph: window length, id maps, where it came from."""
    p = run.prepared
    return {
        "kind": KIND, "fastattrec_version": __version__,
        "run": str(run.run_dir), "checkpoint": run.checkpoint, "epoch": run.epoch,
        "maxlen": run.model.cfg.maxlen, "mode": run.model.cfg.mode,
        "inputs": "users (B,) int64 user rows, 0 for a new user; windows (B, maxlen) int64 "
                  "item rows oldest first, left-padded with 0",
        "output": "goodness (B, n_item_rows) float32, higher is better, -inf off items",
        "n_item_rows": int(p.n_item_rows),
        "user_rows": {"raw_user": p.raw_users.to_list(),
                      "row": list(range(1, p.raw_users.len() + 1))},
        "item_rows": {"raw_item": p.raw_items.to_list(), "row": p.item_rows.tolist()},
    }


def export_run(run: LoadedRun, path: Path) -> None:
    """Write the run's `Goodness` to `path` (.pt2 or .onnx), atomically; call inside
    `claim_output(path, kind="file")`."""
    ext = export_format(path)
    module = Goodness(run).eval()
    for p in module.parameters():  # a serving call returns plain tensors, no autograd
        p.requires_grad_(False)
    users = torch.tensor([1, 0])  # (2,): a trained user and a new one
    windows = run.data.latest_windows(torch.tensor([1, 1], device=run.data.device),
                                      run.model.cfg.maxlen).cpu()  # (2, L)
    batch = torch.export.Dim("batch", min=1)
    shapes = {"users": {0: batch}, "windows": {0: batch}}
    meta = json.dumps(metadata(run))
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            if ext == ".pt2":
                program = torch.export.export(module, (users, windows), dynamic_shapes=shapes)
                buffer = io.BytesIO()  # (torch names a file archive by its .pt2 suffix)
                torch.export.save(program, buffer, extra_files={META_NAME: meta})
                tmp.write_bytes(buffer.getvalue())
            else:
                import onnx

                quiet = logging.getLogger("torch.onnx")  # notes on absent torchvision ops
                level = quiet.level
                quiet.setLevel(logging.ERROR)
                try:
                    torch.onnx.export(module, (users, windows), tmp, dynamo=True,
                                      input_names=["users", "windows"],
                                      output_names=["goodness"], dynamic_shapes=shapes,
                                      external_data=False, verbose=False)
                finally:
                    quiet.setLevel(level)
                graph = onnx.load(tmp)
                graph.metadata_props.add(key="fastattrec", value=meta)
                onnx.save(graph, tmp)
        except (OSError, UserError):
            raise
        except Exception as e:  # noqa: BLE001 - the exporter's own failure: one sentence
            raise UserError(f"torch could not export the run {quoted(run.run_dir)} to "
                            f"{ext} ({first_error_line(e, 160)}); try the other format."
                            ) from None


def export_folder(run_dir: Path, out: Path, checkpoint: str, data_dir: Path | None,
                  force: bool) -> Path:
    """Export the run in `run_dir` to `out` (`export_run`), after checking `out` before any
    work; `force` replaces only an export fastattrec wrote (`read_metadata`)."""
    from fastattrec.outputs import claim_output, refuse_inputs, resolve_output
    from fastattrec.runs import load_run

    refuse_inputs(resolve_output(out), [run_dir])
    if out.is_dir():
        raise UserError(f"-o {quoted(out)} is a folder; give a file name such as "
                        f"{quoted(out / 'model.pt2')}.")
    export_format(out)
    loaded = load_run(run_dir, checkpoint, "cpu", data_dir, kernel="torch")
    with claim_output(out, force=force, made_by_us=lambda p: read_metadata(p) is not None,
                      what="model file that `fastattrec export` wrote", kind="file",
                      inputs=[run_dir]) as target:
        export_run(loaded, target)
    return out


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The metadata of an export fastattrec wrote, or None for any other file."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".pt2":
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("/extra/" + META_NAME))
                meta = json.loads(z.read(name))
        else:
            import onnx

            graph = onnx.load(path, load_external_data=False)
            meta = json.loads(next(p.value for p in graph.metadata_props
                                   if p.key == "fastattrec"))
    except Exception:  # noqa: BLE001 - not a zip, no such entry, no onnx: not ours
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == KIND else None
