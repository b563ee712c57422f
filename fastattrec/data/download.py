"""`fastattrec download`: fetch an official GroupLens MovieLens archive, check its MD5
(the checksums GroupLens publishes beside each archive), unpack it."""

from __future__ import annotations

import hashlib
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from fastattrec.atomic import atomic_path
from fastattrec.errors import UserError

BASE = "https://files.grouplens.org/datasets/movielens/"
DATASETS = {
    "ml-100k": ("ml-100k.zip", "0e33842e24a9c977be4e0107933c0723", "u.data"),
    "ml-1m": ("ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906", "ratings.dat"),
    "ml-20m": ("ml-20m.zip", "cd245b17a1ae2cc31bb14903e1204af3", "ratings.csv"),
    "ml-25m": ("ml-25m.zip", "6b51fb2759a8657d3bfcbfc42b592ada", "ratings.csv"),
}


def download(name: str, dest: Path, url: str | None = None, md5: str | None = None,
             progress: Callable[[int, int], None] | None = None, force: bool = False) -> Path:
    """Download, verify and unpack `name` under `dest`; return the ratings file's path."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    archive_name, known_md5, ratings = DATASETS[name]
    url = url or BASE + archive_name
    want = (md5 or known_md5).lower()
    dest = Path(dest)
    folder = dest / name
    if folder.exists() and not force:
        found = list(folder.rglob(ratings))
        if found:
            return found[0]
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / archive_name
    h = hashlib.md5()
    try:
        with atomic_path(archive) as tmp:
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                total = int(resp.headers.get("Content-Length") or 0)
                done = 0
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
            if h.hexdigest() != want:
                raise UserError(f"{url}: checksum mismatch (MD5 {h.hexdigest()}, expected "
                                f"{want}); the download is damaged or changed, try again.")
    except (urllib.error.URLError, OSError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot download {url} ({getattr(e, 'reason', e)}); check the "
                        f"network or pass --url.") from None
    tmp_dir = dest / f".{name}.unpack"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp_dir)
    except zipfile.BadZipFile:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise UserError(f"{archive} is not a zip archive; delete it and try again.") from None
    # GroupLens archives hold one top folder named like the dataset; flatten it if present.
    inner = [p for p in tmp_dir.iterdir()]
    src = inner[0] if len(inner) == 1 and inner[0].is_dir() else tmp_dir
    if folder.exists():
        shutil.rmtree(folder)
    src.rename(folder)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    archive.unlink()
    found = list(folder.rglob(ratings))
    if not found:
        raise UserError(f"{url} unpacked without a {ratings}; is it the right archive?")
    return found[0]
