"""The prepared dataset on disk, and its loader.

A prepared dataset is a folder (docs/formats.md §1):

- `sequences.parquet`  one row per kept interaction, users one after another (dense id
  order), each user's items in time order (ties in file order): `item` (int32 dense id,
  0 is padding and never occurs) and `neg` (int32): the negative drawn for the sample
  whose target is that row. Train targets are rows 1 .. n-3 of a user (0-based), the
  validation target is row n-2 and its negative is the validation negative; the test
  target is row n-1 (its negatives are in `test_negatives.parquet`).
- `users.parquet`  `user` (int32 dense id 1..U), `raw_user`, `offset` (int64 first row in
  `sequences.parquet`), `length` (int32 n >= 2).
- `items.parquet`  `item` (int32 dense id), `raw_item`.
- `test_negatives.parquet`  `user`, `neg`: the test negatives of every user with n >= 2,
  users in id order, the same count for each, in draw order.
- `meta.json`  counts, every parameter, the source file's size and SHA-256, the versions.

Windows of any length are cut from the flat sequences later, on the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fastattrec.data import FORMAT_VERSION
from fastattrec.errors import UserError, quoted, shown
from fastattrec.outputs import foreign_files, read_json_dict

FILES = ("meta.json", "sequences.parquet", "users.parquet", "items.parquet",
         "test_negatives.parquet")


@dataclass
class Prepared:
    """A prepared dataset in memory (numpy arrays; nothing per row in Python)."""

    path: Path
    meta: dict[str, Any]
    items: np.ndarray  # (N,) int32 dense item ids, users one after another
    negs: np.ndarray  # (N,) int32 negative paired with the target at that row
    offsets: np.ndarray  # (U,) int64 first row of user u+1
    lengths: np.ndarray  # (U,) int32 sequence length of user u+1
    test_negs: np.ndarray  # (U_test, n_test_neg) int32, for users with length >= 2
    raw_users: pl.Series  # (U,) raw id of dense user u+1
    raw_items: pl.Series  # raw id of each item row listed in `item_rows`
    item_rows: np.ndarray  # (I,) int32 embedding rows that are real items

    @property
    def n_users(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def n_item_rows(self) -> int:
        """Rows of the item tables, padding row 0 included."""
        return int(self.meta["counts"]["item_rows"])

    @property
    def n_user_rows(self) -> int:
        return self.n_users + 1

    def test_users(self) -> np.ndarray:
        """(U_test,) dense ids of users with a test sample (length >= 2), ascending."""
        return np.flatnonzero(self.lengths >= 2).astype(np.int64) + 1


def is_prepared_dataset(path: Path) -> bool:
    """True when `path` is a folder whose meta.json says `fastattrec prep` wrote it."""
    meta = read_json_dict(Path(path) / "meta.json") if Path(path).is_dir() else None
    return meta is not None and "format_version" in meta and "fastattrec_version" in meta


def replaceable_dataset(path: Path) -> bool:
    """For `prep --force`: True when `path` is a prepared dataset holding only the files
    `prep` writes; a UserError naming them when it also holds files of the user's."""
    if not is_prepared_dataset(path):
        return False
    extra = foreign_files(path, FILES)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise UserError(f"{path} is a prepared dataset but also holds {shown}, which fastattrec "
                        f"did not write; move them out before --force, or choose another -o.")
    return True


def fingerprint(meta: dict[str, Any]) -> str:
    """SHA-256 of meta.json's canonical JSON: the source file's hash, every parameter
    (seed included) and the counts, so two preparations that differ in anything that
    changes their contents have different fingerprints."""
    canon = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def read_meta(path: Path) -> dict[str, Any]:
    """Read and check `meta.json`, or explain why `path` is not a prepared dataset."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run `fastattrec prep INPUT -o "
                        f"{quoted(path)}` to create it.")
    if not path.is_dir():
        raise UserError(f"{path} is a file; give the folder that `fastattrec prep` wrote.")
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise UserError(
            f"{path} is not a prepared dataset (missing {', '.join(missing)}); give the "
            f"folder that `fastattrec prep` wrote."
        )
    again = f"prepare it again with `fastattrec prep INPUT -o {quoted(path)} --force`"
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / 'meta.json'} is unreadable ({e}); {again}.") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path / 'meta.json'} holds a JSON {type(meta).__name__}, not the "
                        f"object fastattrec writes; {again}.")
    version = meta.get("format_version")
    if isinstance(version, str | bool):
        raise UserError(f"{path / 'meta.json'} gives format_version as {shown(version)}, but "
                        f"fastattrec writes the number {FORMAT_VERSION}: the file was edited "
                        f"or written by another tool; {again}.")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{path / 'meta.json'} says dataset format {version!r}, this fastattrec reads format "
            f"{FORMAT_VERSION}; {again}."
        )
    problems = [k for k, kind in _META_KEYS.items() if not isinstance(meta.get(k), kind)]
    counts, params = meta.get("counts"), meta.get("params")
    if not problems:
        problems = [f"counts.{k}" for k in _COUNT_KEYS if not _is_int(counts.get(k))]
        if not _is_int(params.get("test_negatives_per_user")):
            problems.append("params.test_negatives_per_user")
    if problems:
        raise UserError(f"{path / 'meta.json'} lacks or garbles {', '.join(problems)}; "
                        f"{again}.")
    return meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_META_KEYS = {"counts": dict, "params": dict, "source": dict}
_COUNT_KEYS = ("item_rows", "users", "items", "interactions")


def load_prepared(path: Path) -> Prepared:
    """Load a prepared dataset folder into numpy arrays."""
    path = Path(path)
    meta = read_meta(path)
    try:
        seq = pl.read_parquet(path / "sequences.parquet")
        users = pl.read_parquet(path / "users.parquet")
        items = pl.read_parquet(path / "items.parquet")
        test = pl.read_parquet(path / "test_negatives.parquet")
        _check_columns(path, {"sequences.parquet": (seq, ("item", "neg")),
                              "users.parquet": (users, ("user", "raw_user", "offset", "length")),
                              "items.parquet": (items, ("item", "raw_item")),
                              "test_negatives.parquet": (test, ("user", "neg"))})
    except (OSError, pl.exceptions.PolarsError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} holds a damaged Parquet file ({first}); prepare it again "
                        f"with `fastattrec prep INPUT -o {quoted(path)} --force`.") from None
    n_test_users = int((users.get_column("length") >= 2).sum())
    n_neg = int(meta["params"]["test_negatives_per_user"])
    test_negs = test.get_column("neg").to_numpy().astype(np.int32)
    lengths = users.get_column("length").to_numpy().astype(np.int64)
    offsets = users.get_column("offset").to_numpy()
    rows = meta["counts"]["item_rows"]
    consistent = (
        test_negs.shape[0] == n_test_users * n_neg
        and int(lengths.sum()) == seq.height
        and bool((lengths >= 2).all())
        and np.array_equal(offsets, np.cumsum(lengths) - lengths)
        and users.height == meta["counts"]["users"]
        and seq.height == meta["counts"]["interactions"]
        and _in_range(seq.get_column("item").to_numpy(), rows)
        and _in_range(seq.get_column("neg").to_numpy(), rows)
        and _in_range(test_negs, rows)
    )
    consistent = consistent and _ids_valid(users, items, rows)
    if consistent:
        consistent = _negatives_valid(
            test_negs.reshape(n_test_users, n_neg), seq.get_column("item").to_numpy(),
            seq.get_column("neg").to_numpy(), lengths, rows,
            bool(meta["params"].get("test_negatives_distinct", True)))
    if not consistent:
        raise UserError(f"{path}: its files do not agree with each other or with meta.json "
                        f"(ids out of range, or negatives that are a user's own items); "
                        f"prepare it again with `fastattrec prep INPUT -o {quoted(path)} --force`.")
    return Prepared(
        path=path,
        meta=meta,
        items=seq.get_column("item").to_numpy().astype(np.int32),
        negs=seq.get_column("neg").to_numpy().astype(np.int32),
        offsets=users.get_column("offset").to_numpy().astype(np.int64),
        lengths=users.get_column("length").to_numpy().astype(np.int32),
        test_negs=test_negs.reshape(n_test_users, n_neg),
        raw_users=users.get_column("raw_user"),
        raw_items=items.get_column("raw_item"),
        item_rows=items.get_column("item").to_numpy().astype(np.int32),
    )


def _in_range(ids: np.ndarray, rows: int) -> bool:
    """Real item ids: 1 .. rows-1 (0 is padding, never an item or a negative)."""
    return ids.size == 0 or (int(ids.min()) >= 1 and int(ids.max()) < rows)


def _ids_valid(users: pl.DataFrame, items: pl.DataFrame, rows: int) -> bool:
    """Users are numbered 1..U in order, items are distinct table rows, raw ids distinct."""
    u = users.get_column("user").to_numpy()
    it = items.get_column("item").to_numpy()
    return (np.array_equal(u, np.arange(1, u.shape[0] + 1))
            and users.get_column("raw_user").n_unique() == users.height
            and items.get_column("raw_item").n_unique() == items.height
            and np.unique(it).shape[0] == it.shape[0] and _in_range(it, rows))


def _negatives_valid(test_negs: np.ndarray, items: np.ndarray, negs: np.ndarray,
                     lengths: np.ndarray, rows: int, distinct: bool) -> bool:
    """No negative is one of its user's own items: the test negatives (distinct from each
    other when the dataset says so) and the train and validation negatives (rows 1..n-2 of
    each user; rows 0 and n-1 carry unused draws). Vectorised: keys user * rows + item."""
    if distinct and test_negs.size:
        srt = np.sort(test_negs, axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            return False
    owner = np.repeat(np.arange(lengths.shape[0], dtype=np.int64), lengths)
    seen = np.unique(owner * rows + items.astype(np.int64))
    tested = np.flatnonzero(lengths >= 2)  # row of each test user in users.parquet
    asked = (tested[:, None].astype(np.int64) * rows + test_negs.astype(np.int64)).ravel()
    pos = np.arange(owner.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    used = (pos >= 1) & (pos <= np.repeat(lengths, lengths) - 2)
    asked = np.concatenate([asked, owner[used] * rows + negs[used].astype(np.int64)])
    hit = np.searchsorted(seen, asked)
    hit = np.minimum(hit, seen.shape[0] - 1)
    return seen.size == 0 or not (seen[hit] == asked).any()


def _check_columns(path: Path, frames: dict[str, tuple[pl.DataFrame, tuple[str, ...]]]) -> None:
    for name, (frame, cols) in frames.items():
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise UserError(f"{path / name} lacks column(s) {', '.join(missing)}; prepare it "
                            f"again with `fastattrec prep INPUT -o {quoted(path)} --force`.")
