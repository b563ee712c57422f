"""Tables that commands write (`recommend -o`, `evaluate -o`): the format from the file
name's extension, written atomically, and marked so that `--force` replaces only a table
fastattrec made (docs/formats.md §3, §4)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from fastattrec.atomic import atomic_path, atomic_write_json
from fastattrec.errors import UserError
from fastattrec.outputs import file_sha256, read_json_dict
from fastattrec.version import VERSION as __version__

TABLE_FORMATS = (".csv", ".parquet", ".json", ".jsonl")
TABLE_RECORD = ".fastattrec.json"  # beside a text table: what made it, its size and SHA-256


def table_format(path: Path, option: str = "-o") -> str:
    """The format of a table output, from its file name's extension (one of
    TABLE_FORMATS, any case); anything else is refused in one sentence."""
    ext = Path(path).suffix.lower()
    if ext not in TABLE_FORMATS:
        raise UserError(f"{option} {path}: the format is taken from the file name, which must "
                        f"end in .csv, .parquet, .json (a list of row objects) or .jsonl (one "
                        f"row object a line).")
    return ext


def table_record(path: Path) -> Path:
    """The record written beside a CSV or JSON table: PATH.fastattrec.json."""
    path = Path(path)
    return path.with_name(path.name + TABLE_RECORD)


def made_table(path: Path, kind: str) -> bool:
    """True when `path` is a table of `kind` ("recommendations", "metrics") that fastattrec
    wrote and nobody changed since: a Parquet file by its `fastattrec` metadata key, a CSV
    or JSON file by the record beside it (kind, size and SHA-256 must match)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".parquet":
        try:
            return pl.read_parquet_metadata(path).get("fastattrec") == kind
        except Exception:  # noqa: BLE001 - not Parquet, unreadable: not ours either way
            return False
    rec = read_json_dict(table_record(path))
    return (rec is not None and rec.get("kind") == f"fastattrec-{kind}"
            and rec.get("size") == path.stat().st_size and rec.get("sha256") == file_sha256(path))


def write_table(frame: pl.DataFrame, path: Path, kind: str) -> None:
    """Write the Polars `frame` to `path` atomically in the format its extension names,
    marked as a `kind` table of fastattrec's (so a later `--force` may replace it). Call
    inside `claim_output(path, kind="file")`."""
    path = Path(path)
    ext = table_format(path)
    record = table_record(path)
    rec = read_json_dict(record)
    if ext != ".parquet" and (record.is_dir() or (record.exists() and not (
            rec and str(rec.get("kind", "")).startswith("fastattrec-")))):
        raise UserError(f"{record} exists and is not a record fastattrec wrote; fastattrec "
                        f"keeps the record of {path.name} there, so move it away or choose "
                        f"another -o.")
    with atomic_path(path) as tmp:
        if ext == ".parquet":
            frame.write_parquet(tmp, metadata={"fastattrec": kind})
        elif ext == ".csv":
            frame.write_csv(tmp)
        elif ext == ".json":
            frame.write_json(tmp)
        else:
            frame.write_ndjson(tmp)
        size, sha = tmp.stat().st_size, file_sha256(tmp)
    if ext != ".parquet":  # after the table, so the record never names a missing file
        atomic_write_json(record, {"kind": f"fastattrec-{kind}", "fastattrec_version": __version__,
                                   "size": size, "sha256": sha})
