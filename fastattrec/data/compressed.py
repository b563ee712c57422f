"""Compressed ratings logs (`.gz`, `.bz2`, `.xz`, `.zst`): recognised by their first bytes,
unpacked in a stream to a temporary file that the readers then scan like any other."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
from pathlib import Path

from fastattrec.atomic import is_write_failure
from fastattrec.errors import UserError, shown
from fastattrec.outputs import write_error

_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
_SUFFIXES = (".gz", ".gzip", ".bz2", ".xz", ".zst", ".zstd")


def compression_of(path: Path) -> str | None:
    """'gzip', 'bzip2', 'xz' or 'zstd' when the file starts with that format's magic bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def _open(path: Path, kind: str):
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bzip2":
        return bz2.open(path, "rb")
    if kind == "xz":
        return lzma.open(path, "rb")
    try:
        import zstandard
    except ImportError:
        raise UserError(f"{path} is zstd-compressed and the `zstandard` package is not "
                        f"installed; `pip install zstandard`, or decompress it first "
                        f"(`zstd -d {path}`).") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)


def decompress_to(path: Path, folder: Path) -> Path:
    """Unpack `path` into `folder` under its name without the compression suffix (so the
    format can still be told from it); returns the new path, or `path` itself when it is
    not compressed."""
    path = Path(path)
    kind = compression_of(path)
    if kind is None:
        return path
    name = path.name
    for suffix in _SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    dest = Path(folder) / f"_input_{name or 'log'}"
    try:
        with _open(path, kind) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - each codec has its own error types
        dest.unlink(missing_ok=True)
        if is_write_failure(e, (dest,)):
            raise write_error(folder, e) from None
        why = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a complete {kind} file ({shown(why, 100)}); download "
                        f"or compress it again.") from None
    return dest
