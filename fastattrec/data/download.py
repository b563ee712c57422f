"""`fastattrec download`: fetch an official GroupLens MovieLens archive, check its MD5
(the checksums GroupLens publishes beside each archive), unpack it."""

from __future__ import annotations

import hashlib
import re
import secrets
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from fastattrec.atomic import atomic_dir, atomic_write_json, is_write_failure, scratch_file
from fastattrec.errors import UserError, shown
from fastattrec.outputs import claim_output, read_json_dict, write_error

MARKER = ".fastattrec-download.json"  # written into every folder that download unpacks
BASE = "https://files.grouplens.org/datasets/movielens/"
DATASETS = {
    "ml-100k": ("ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "u.data"),
    "ml-1m": ("ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ratings.dat"),
    "ml-20m": ("ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "ratings.csv"),
    "ml-25m": ("ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", "ratings.csv"),
}


def download(name: str, dest: Path, url: str | None = None, md5: str | None = None,
             progress: Callable[[int, int], None] | None = None, force: bool = False) -> Path:
    """Download, verify and unpack `name` under `dest`; return the ratings file's path.

    An existing DEST/NAME holding the ratings file is reused. With `force` it is replaced,
    but only if fastattrec downloaded it (its `.fastattrec-download.json` says so) and only
    after the new archive has been verified and unpacked completely."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    archive_name, known_md5, ratings = DATASETS[name]
    url = url or BASE + archive_name
    want = (md5 or known_md5).lower()
    if not re.fullmatch(r"[0-9a-f]{32}", want):
        raise UserError(f"--md5 {shown(md5)} is not an MD5 checksum (32 hexadecimal digits).")
    folder = Path(dest) / name
    with claim_output(folder, force=force, made_by_us=made_by_download, option="--dir",
                      what="MovieLens folder that `fastattrec download` made",
                      allow_existing=True) as folder:
        if folder.exists() and not force:
            found = ratings_files(folder, ratings) if folder.is_dir() else []
            if found and made_by_download(folder):
                return found[0]
            if found:
                raise UserError(f"{folder} already holds {found[0].name} but was not "
                                f"downloaded by fastattrec, so its contents are unchecked; "
                                f"prepare that file directly, or choose another --dir.")
            raise UserError(f"{folder} exists but holds no {ratings}; move it away, or pass "
                            f"--force if `fastattrec download` made it.")
        # The archive is a scratch file beside the folder (kept under the folder's name, so
        # the next command on it cleans up after a kill); the folder is replaced last.
        with scratch_file(folder) as archive:
            _fetch(url, archive, want, progress, folder)
            with atomic_dir(folder, force=True) as tmp:
                _unpack(archive, tmp, url, ratings)
                if (tmp / MARKER).exists() and not (tmp / MARKER).is_file():
                    raise UserError(f"the archive at {url} holds a folder named {MARKER}, "
                                    f"the name fastattrec gives its own record; it is not "
                                    f"a MovieLens archive as published.")
                files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
                atomic_write_json(tmp / MARKER, {"dataset": name, "url": url, "md5": want,
                                                 "files": files})
    return ratings_files(folder, ratings)[0]


def ratings_files(folder: Path, ratings: str) -> list[Path]:
    """The files named `ratings` under `folder` (folders of that name are not), the
    shallowest first."""
    return sorted((p for p in Path(folder).rglob(ratings) if p.is_file()),
                  key=lambda p: (len(p.parts), str(p)))


def made_by_download(folder: Path) -> bool:
    """True when `folder` was unpacked by `fastattrec download` (it holds MARKER); a
    UserError naming them when files were added to it since (--force would delete them)."""
    folder = Path(folder)
    marker = read_json_dict(folder / MARKER)
    if marker is None:
        return False
    if not isinstance(marker.get("files"), list):
        return True  # no list of its files to compare with
    known = set(marker["files"]) | {MARKER}
    extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                   if p.is_file() and str(p.relative_to(folder)) not in known)
    if extra:
        raise UserError(f"{folder} was downloaded by fastattrec but now also holds "
                        f"{', '.join(extra[:5])}; move them out before --force.")
    return True


def _fetch(url: str, path: Path, want: str, progress, folder: Path) -> None:
    """Stream `url` into `path` (a scratch file beside `folder`), checking its MD5."""
    h = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(path, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while block := resp.read(1 << 20):
                out.write(block)
                h.update(block)
                done += len(block)
                if progress:
                    progress(done, total)
    except (urllib.error.URLError, OSError, ValueError) as e:
        if is_write_failure(e, (path,)):
            raise write_error(folder.parent, e) from None
        raise UserError(f"cannot download {shown(url, 100)} ({getattr(e, 'reason', e)}); check the "
                        f"network or pass --url.") from None
    if h.hexdigest() != want:
        raise UserError(f"{shown(url, 100)}: checksum mismatch (MD5 {h.hexdigest()}, expected "
                        f"{want}); the download is damaged or changed, try again.")


def _unpack(archive: Path, into: Path, url: str, ratings: str) -> None:
    """Extract `archive` into the folder `into`, flattening a single top folder."""
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(into)
    except zipfile.BadZipFile:
        raise UserError(f"{url} is not a zip archive; check --url.") from None
    # GroupLens archives hold one top folder named like the dataset; flatten it if present.
    # It is renamed aside first, since it may hold a child of its own name (a re-zipped
    # `ml-1m/ml-1m/`), which could not be moved onto it.
    inner = list(into.iterdir())
    if len(inner) == 1 and inner[0].is_dir():
        top = inner[0].rename(into / f".flatten-{secrets.token_hex(8)}")
        for p in list(top.iterdir()):
            p.rename(into / p.name)
        top.rmdir()
    if not ratings_files(into, ratings):
        if any(p.is_dir() for p in into.rglob(ratings)):
            raise UserError(f"{url} unpacked with {ratings} as a folder, not a file; is it "
                            f"the right archive?")
        raise UserError(f"{url} unpacked without a {ratings}; is it the right archive?")
