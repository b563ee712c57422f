"""Write-then-rename helpers so that no command ever leaves a half-written output behind.

Temporaries are named `.NAME.tmp-XXXXXXXX` beside the output NAME, so the next command on the
same output can recognise and remove what a killed one left (`outputs.remove_stale`).
Write failures (full disk, read-only folder) become one `UserError` sentence naming the path.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastattrec.errors import UserError, quoted
from fastattrec.outputs import OLD_TAG, TMP_TAG, record_temporary, write_error

WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
WRITE_FAILURE_TEXT = re.compile(r"No space left|Read-only file system|Disk quota|"
                                r"os error (28|30|122)\b|file write failed", re.IGNORECASE)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, mode: int) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give them the usual mode."""
    os.chmod(path, mode & ~_umask())


def _exchange(a: Path, b: Path) -> bool:
    """Swap the two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False
    where the platform or file system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, target: Path) -> None:
    """Put the complete folder `tmp` at `target`, replacing what is there.

    An existing `target` is swapped out atomically where the system allows (so `target`
    is at every instant either the old or the new folder), else renamed to `.NAME.old-PID`
    first (a kill between the two renames is repaired by the next command on `target`,
    outputs.remove_stale); the old copy is deleted last."""
    if not target.exists() and not target.is_symlink():
        os.replace(tmp, target)
        return
    if _exchange(tmp, target):
        old = tmp  # the old folder now sits at the temporary name
    else:
        old = _move_aside(target)
        os.replace(tmp, target)
    _discard(old)


def _move_aside(target: Path) -> Path:
    old = target.parent / f".{target.name}{OLD_TAG}{os.getpid()}"
    record_temporary(old)
    os.replace(target, old)
    return old


def _discard(old: Path) -> None:
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


@contextlib.contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; move it to `target` only on success.

    On any exception (KeyboardInterrupt included) the temporary folder is removed and
    `target` is left exactly as it was. With `force`, an existing `target` is replaced
    only after the new one is complete (callers check that it may be: outputs.claim_output).
    """
    target = Path(target)
    if target.exists() and not force:
        raise UserError(
            f"{quoted(target)} already exists; pass --force to replace it or choose another -o.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_TAG}", dir=target.parent))
        record_temporary(tmp)
    except OSError as e:
        raise write_error(target.parent, e) from None
    _publish_mode(tmp, 0o777)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def scratch_file(beside: Path) -> Iterator[Path]:
    """A temporary file named `.NAME.tmp-XXXXXXXX` next to `beside`, deleted at the end
    whatever happens (a killed process's copy is removed by the next command on NAME)."""
    beside = Path(beside)
    try:
        beside.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{beside.name}{TMP_TAG}", dir=beside.parent)
        record_temporary(Path(tmp))
    except OSError as e:
        raise write_error(beside.parent, e) from None
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary file path beside `path`; rename it into place on success.

    An OSError while writing (full disk, no permission) becomes a UserError naming `path`;
    the temporary file is removed in every failure."""
    path = Path(path)
    with scratch_file(path) as tmp:
        try:
            yield tmp
            _publish_mode(tmp, 0o666)
            os.replace(tmp, path)
        except BaseException as e:
            if is_write_failure(e, (tmp, path)):
                raise write_error(path, e) from None
            raise


def is_write_failure(e: BaseException, paths: tuple = ()) -> bool:
    """True for an error that a write raises on a full, read-only or forbidden place (and
    not, say, a missing input read inside the same block): an OSError with such an errno,
    or any error whose text says so (Polars and torch report these without an errno)."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return e.filename is None or str(e.filename) in {str(p) for p in paths}
    return bool(WRITE_FAILURE_TEXT.search(str(e)))
