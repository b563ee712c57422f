"""Compressed ratings logs (`.gz`, `.bz2`, `.xz`, `.zst`): recognised by their first bytes,
unpacked in a stream to a temporary file that the readers then scan like any other.

Every codec's end of stream is checked: a file that stops before the end of its last gzip
member, bzip2 or xz stream, or zstd frame (an interrupted download) is refused as
truncated, never read as the shorter log it decompresses to."""

from __future__ import annotations

import bz2
import lzma
import zlib
from pathlib import Path
from typing import BinaryIO

from fastattrec.atomic import is_write_failure
from fastattrec.errors import UserError, first_error_line, shown
from fastattrec.outputs import write_error

_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd",
             ".zstd": "zstd"}
_UNIT = {"gzip": "member", "bzip2": "stream", "xz": "stream", "zstd": "frame"}
_BLOCK = 1 << 22


class _Truncated(Exception):
    """The compressed data ends before its last stream, member or frame does."""


def compression_of(path: Path) -> str | None:
    """'gzip', 'bzip2', 'xz' or 'zstd' when the file starts with that format's magic bytes
    (or is so short that it holds only the start of them and is named like that format)."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        return None
    found = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if found is None and head:
        suffix = _SUFFIXES.get(Path(path).suffix.lower())
        found = next((name for magic, name in _MAGIC
                      if name == suffix and len(head) < len(magic) and magic.startswith(head)),
                     None)
    return found


def _part_decompressor(kind: str, path: Path):
    """A decompressor for one gzip member, bzip2 or xz stream, or zstd frame: each has
    `decompress`, `eof` (its end was reached) and `unused_data` (the bytes after it)."""
    if kind == "gzip":
        return zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer (CRC checked)
    if kind == "bzip2":
        return bz2.BZ2Decompressor()
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    try:
        import zstandard
    except ImportError:
        raise UserError(f"{path} is zstd-compressed and the `zstandard` package is not "
                        f"installed; `pip install zstandard`, or decompress it first "
                        f"(`zstd -d {path}`).") from None
    return zstandard.ZstdDecompressor().decompressobj()


def _copy(path: Path, kind: str, out: BinaryIO) -> None:
    """Decompress every part of `path` (members, streams or frames, one after another)
    into `out`; `_Truncated` when the last part has no end. NUL bytes between parts are
    padding (as gzip and xz allow) and skipped."""
    if path.stat().st_size < next(len(m) for m, name in _MAGIC if name == kind):
        raise _Truncated  # only the start of the magic bytes
    part = None  # the decompressor of the part being read, None between parts
    with open(path, "rb") as src:
        while block := src.read(_BLOCK):
            while block:
                if part is None:
                    block = block.lstrip(b"\0")
                    if not block:
                        break
                    part = _part_decompressor(kind, path)
                out.write(part.decompress(block))
                if part.eof:
                    block, part = part.unused_data, None
                else:
                    block = b""
    if part is not None:
        raise _Truncated


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
        with open(dest, "wb") as out:
            _copy(path, kind, out)
    except UserError:
        dest.unlink(missing_ok=True)
        raise
    except _Truncated:
        dest.unlink(missing_ok=True)
        raise UserError(f"{path} is truncated (the {kind} stream ends mid-{_UNIT[kind]}); "
                        f"download it again.") from None
    except Exception as e:  # noqa: BLE001 - each codec has its own error types
        dest.unlink(missing_ok=True)
        if is_write_failure(e, (dest,)):
            raise write_error(folder, e) from None
        why = first_error_line(e, 100)
        raise UserError(f"{path} is not a complete {kind} file ({shown(why, 100)}); download "
                        f"or compress it again.") from None
    return dest
