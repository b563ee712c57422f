"""Where fastattrec writes: one command per output at a time, `--force` only over what
fastattrec made, never over an input, and no stale temporaries left from a killed run.

Every command that writes an output (a prepared dataset, a run folder, a synthetic log, a
downloaded archive, a table from `recommend` or `evaluate`) goes through `claim_output`:

1. it refuses an output that is an input or holds one (`prep r.dat -o r.dat`,
   `prep data/r.dat -o data`);
2. it takes an exclusive lock, `.NAME.lock` beside the output (`fcntl.flock`, released by
   the kernel if the process dies), so a second command on the same output stops with one
   sentence instead of mixing two runs;
3. under the lock, it removes the temporaries a killed command left (each temporary a
   command creates is recorded in its lock file, so only those are ever removed or
   restored: a file of the user's that merely looks like one is left alone). The lock
   file is trusted only if it is a regular file of the current user's with no other
   link, and of what it lists only names fastattrec gives this output's temporaries
   (`is_temporary_of`) owned by the current user are touched: a planted or damaged list
   can delete nothing else;
4. with `force`, it checks that what is there is something fastattrec made (the caller's
   `made_by_us` test) before anything is replaced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fastattrec.errors import UserError, quoted

TMP_TAG = ".tmp-"  # temporaries are `.NAME.tmp-XXXXXXXX`, beside NAME (see atomic.py)
OLD_TAG = ".old-"  # a replaced output waiting to be deleted: `.NAME.old-PID`
# The random part tempfile.mkstemp / mkdtemp give the temporaries: 8 characters of
# tempfile's alphabet (lower-case letters, digits, underscore).
_RANDOM = "[a-z0-9_]{8}"


def is_temporary_of(target: Path, path: Path) -> bool:
    """True when `path` is named as a temporary fastattrec makes for the output `target`
    (both absolute): beside it `.NAME.tmp-XXXXXXXX` (also `.NAME.EXT.tmp-XXXXXXXX`, a
    record such as NAME.synth.json written with it) or `.NAME.old-PID`; directly inside
    it (a run folder's files) `.FILE.tmp-XXXXXXXX`. Nothing else, so a lock file's list
    can only ever name this output's own temporaries."""
    text = os.fspath(path)
    if not os.path.isabs(text) or os.path.normpath(text) != text:
        return False
    path, tmp = Path(text), re.escape(TMP_TAG)
    if path.parent == target.parent:
        name = re.escape(target.name)
        return bool(re.fullmatch(rf"\.{name}(\.[^/]+)?{tmp}{_RANDOM}", path.name) or
                    re.fullmatch(rf"\.{name}{re.escape(OLD_TAG)}[0-9]+", path.name))
    return path.parent == target and bool(re.fullmatch(rf"\.[^/]+{tmp}{_RANDOM}", path.name))


def lock_path(target: Path) -> Path:
    """The lock file of `target`: `.NAME.lock` in the same folder."""
    target = absolute(target)
    return target.parent / f".{target.name}.lock"


def absolute(path: Path) -> Path:
    """`path` made absolute and normalised ('.' and '..' folded) without following links
    of the last component, so a link is judged as the link, not its target."""
    path = Path(os.path.abspath(Path(path).expanduser()))
    if path.name == "":
        raise UserError(f"{path} is the root folder; choose a folder inside it as the output.")
    return path


def _inside(a: Path, b: Path) -> bool:
    """True when `a` is `b` or lies under it (both resolved through links)."""
    try:
        ra, rb = a.resolve(), b.resolve()
    except (RuntimeError, OSError):  # a symbolic link loop: not an input we can read
        return False
    return ra == rb or rb in ra.parents


def refuse_inputs(target: Path, inputs: Iterable[Path], option: str = "-o") -> None:
    """Refuse an output that is one of the inputs or a folder that holds one."""
    for src in inputs:
        if src is None:
            continue
        if _inside(Path(src), target):
            what = "is" if _inside(target, Path(src)) and _inside(Path(src), target) else "holds"
            raise UserError(f"{option} {target} {what} the input {src}; writing there would "
                            f"destroy it, choose another {option}.")


_held: dict[Path, int] = {}  # target -> fd of its lock file, while this process holds it
_held_guard = threading.Lock()


@contextlib.contextmanager
def exclusive_lock(target: Path) -> Iterator[list[Path]]:
    """Hold `.NAME.lock` beside `target` for the duration; refuse if another process does.

    The lock file is opened without following a symbolic link and used only if it is a
    regular file of the current user's with no other link (`_check_lock_file`), so a
    planted file or link is never written. Then deals with the temporaries that a killed
    earlier holder recorded in it (`record_temporary`, `remove_stale`) and yields what it
    removed or restored. The lock file is removed on release. A process that obtains the
    lock checks that the file it locked is still the one at the path (a releasing process
    may just have removed it), so two processes never both believe they hold it."""
    import fcntl

    target = absolute(target)
    path = lock_path(target)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path.parent, e) from None
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    while True:
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            _check_lock_file(path, None)  # a link or another user's file: say which
            raise write_error(path.parent, e) from None
        try:
            _check_lock_file(path, os.fstat(fd))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (process {holder})" if holder else ""
                raise UserError(f"{target} is in use by another fastattrec command{who}; wait "
                                f"for it to finish or choose another output.") from None
            raise write_error(path, e) from None
        except BaseException:
            os.close(fd)
            raise
        mine = os.fstat(fd)
        if _same_file(path, mine):
            break
        os.close(fd)  # locked a file that its previous holder had just removed: retry
    try:
        left = remove_stale(target, _recorded(fd))
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as e:
            raise write_error(path, e) from None
        with _held_guard:
            _held[target] = fd
        yield left
    finally:
        with _held_guard:
            _held.pop(target, None)
        if _same_file(path, mine):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        os.close(fd)
        _remove_empty(made)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that this command created and left empty, such
    as the parents of an output that failed; a folder with anything in it stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _same_file(path: Path, st: os.stat_result) -> bool:
    """True when the entry at `path` (not followed) is the file `st` describes."""
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _check_lock_file(path: Path, st: os.stat_result | None) -> None:
    """Refuse a lock file fastattrec cannot trust: a symbolic link, not a regular file,
    another user's, or one with other hard links (writing it would change another file).
    `st` is the open file's status; None checks the entry at `path` (after a failed
    open) and returns quietly when it is missing or looks fine."""
    if st is None:
        try:
            st = os.lstat(path)
        except OSError:
            return
    if stat.S_ISLNK(st.st_mode):
        why = "it is a symbolic link"
    elif not stat.S_ISREG(st.st_mode):
        why = "it is not a regular file"
    elif st.st_uid != os.geteuid():
        why = f"it belongs to another user (uid {st.st_uid})"
    elif st.st_nlink > 1:
        why = "it has other hard links"
    else:
        return
    fix = "remove it" if st.st_uid == os.geteuid() else "have its owner remove it"
    raise UserError(f"{path} is not a lock file fastattrec can use ({why}); {fix} or choose "
                    f"another output.")


def record_temporary(tmp: Path) -> None:
    """Note `tmp` in the lock file of the output it belongs to (held by this process), so
    that if the process is killed, the next command on that output removes it, and only
    it. Only a name `is_temporary_of` accepts for a held output is recorded."""
    tmp = absolute(tmp)
    with _held_guard:
        owner = next((fd for target, fd in _held.items() if is_temporary_of(target, tmp)),
                     None)
        if owner is not None:
            os.write(owner, os.fsencode(tmp) + b"\n")


def _recorded(fd: int) -> list[Path]:
    """The paths listed in a lock file (after its first line, the holder's pid)."""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0) if size else b""
    except OSError:
        return []
    return [Path(os.fsdecode(line)) for line in data.split(b"\n")[1:]
            if line.strip() and b"\0" not in line]


def _read_holder(fd: int) -> str:
    """The holder's process id from the lock file's first line, or "" if it holds none."""
    try:
        first = os.pread(fd, 32, 0).split(b"\n", 1)[0].strip()
    except OSError:
        return ""
    return first.decode() if re.fullmatch(rb"[0-9]{1,10}", first) else ""


def remove_stale(target: Path, recorded: Iterable[Path]) -> list[Path]:
    """Deal with the temporaries a killed command recorded (call under the lock): a
    replaced output moved aside (`.NAME.old-*`) is put back if NAME itself is missing (a
    kill between the two renames of a replacement: it is the only complete copy); every
    other recorded temporary is deleted. A listed path that is not named as one of
    `target`'s temporaries (`is_temporary_of`), or that is not the current user's, is
    ignored. Returns what was removed or restored."""
    target = absolute(target)
    done: list[Path] = []
    recorded = [Path(p) for p in recorded
                if is_temporary_of(target, Path(p)) and _owned_by_me(Path(p))]
    olds = [p for p in recorded if p.parent == target.parent
            and p.name.startswith(f".{target.name}{OLD_TAG}")]
    if olds and not target.exists() and not target.is_symlink():
        os.replace(olds[-1], target)
        done.append(target)
        recorded.remove(olds[-1])
    for p in recorded:
        _remove(p)
        done.append(p)
    return done


def _owned_by_me(p: Path) -> bool:
    """`p` exists (not followed) and belongs to the current user."""
    try:
        return os.lstat(p).st_uid == os.geteuid()
    except OSError:
        return False


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


@contextlib.contextmanager
def claim_output(target: Path, *, force: bool, made_by_us: Callable[[Path], bool],
                 what: str, inputs: Iterable[Path] = (), option: str = "-o",
                 log: Callable[[str], None] = lambda s: None,
                 allow_existing: bool = False, kind: str = "folder") -> Iterator[Path]:
    """Check, lock and tidy `target` before a command writes it; yields the path to write.

    A symbolic link is followed: the command writes (and locks) what it points to, and the
    link stays. `what` names the kind of output in messages ("prepared dataset"); `kind`
    is "folder" or "file" (a file output refuses an existing folder). An existing target
    is refused without `force` (unless `allow_existing`), and with `force` unless it is an
    empty folder (folder outputs) or `made_by_us(target)` says fastattrec made it;
    `made_by_us` may also raise a UserError that says what else is in the way.
    """
    target = resolve_output(target, option)
    refuse_inputs(target, inputs, option)
    _refuse_under_file(target, option)
    with exclusive_lock(target) as cleaned:
        for p in cleaned:
            log(f"cleaned up {p} left by an interrupted command")
        if target.exists():
            if kind == "file" and target.is_dir():
                raise UserError(f"{option} {quoted(target)} is a folder; give a file name.")
            if not (target.is_dir() or target.is_file()):
                raise UserError(f"{option} {target} is not a regular file or folder (a pipe, "
                                f"device or socket); give a path on disk.")
            empty = kind == "folder" and _empty_dir(target)
            if allow_existing and not force:
                yield target
                return
            if not (empty or made_by_us(target)):
                found = "folder" if target.is_dir() else "file"
                raise UserError(f"{target} is a {found} that fastattrec did not make (not a "
                                f"{what}); --force only replaces fastattrec's own output, so "
                                f"remove it yourself or choose another {option}.")
            if not force:
                raise UserError(f"{quoted(target)} already exists; pass --force to replace it or "
                                f"choose another {option}.")
        yield target


def resolve_output(target: Path, option: str = "-o") -> Path:
    """The absolute path an output is written to: a symbolic link at the end is followed
    (so the link stays and what it points to is replaced and locked)."""
    target = absolute(target)
    if target.is_symlink():
        try:
            target = target.resolve(strict=False)
        except (RuntimeError, OSError):
            raise UserError(f"{option} {target} is a symbolic link that loops or cannot be "
                            f"followed; choose another {option}.") from None
    return target


def foreign_files(folder: Path, ours: Iterable[str]) -> list[str]:
    """Names in `folder` that fastattrec did not write (for the --force checks)."""
    mine = set(ours)
    return sorted(p.name for p in Path(folder).iterdir() if p.name not in mine)


def _empty_dir(p: Path) -> bool:
    return p.is_dir() and not p.is_symlink() and not any(p.iterdir())


def _refuse_under_file(target: Path, option: str) -> None:
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{option} {target}: {parent} is a file, not a folder; "
                                f"choose another {option}.")
            return


def read_json_dict(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_error(path: Path, e: BaseException) -> UserError:
    """One sentence for a failed write: which path, why, and what to do."""
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0][:160] if text else
                                              type(e).__name__)
    code = getattr(e, "errno", None) or 0
    if code in (errno.ENOSPC, errno.EDQUOT) or re.search(r"No space|quota|os error 28|"
                                                          r"write failed", text, re.I):
        hint = "free some space or write elsewhere"
    elif code == errno.EROFS or re.search(r"Read-only", text, re.I):
        hint = "the file system is read-only; write elsewhere"
    else:
        hint = {
            errno.EACCES: "check its permissions or write elsewhere",
            errno.EPERM: "check its permissions or write elsewhere",
            errno.ENOTDIR: "a part of that path is a file, not a folder",
            errno.EISDIR: "that path is a folder; give a file name",
        }.get(code, "check the path")
    return UserError(f"cannot write {path} ({reason}); {hint}.")
