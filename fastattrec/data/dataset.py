"""The prepared dataset on disk, and its loader.

A prepared dataset is a folder (docs/formats.md §1):

- `sequences.parquet`  one row per kept interaction, users one after another (dense id
  order), each user's items in time order (ties in file order): `item` (int32 dense id,
  0 is padding and never occurs) and `neg` (int32): the negative drawn for the sample
  whose target is that row. Train targets are rows 1 .. n-3 of a user (0-based), the
  validation target is row n-2 and its negative is the validation negative; the test
  target is row n-1 (its negatives are in `test_negatives.parquet`).
- `users.parquet`  `user` (int32 dense id 1..U), `raw_user`, `offset` (int64 first row in
  `sequences.parquet`), `length` (int32 n >= 2); with the time or ratio split also
  `n_val`, `n_test` (int32): how many of the user's last rows are validation and test
  targets (leave-one-out: one and one, not stored; docs/spec.md §1.11).
- `items.parquet`  `item` (int32 dense id), `raw_item`.
- `test_negatives.parquet`  `user`, `neg`: the test negatives of every user with n >= 2,
  users in id order, the same count for each, in draw order (none for the time and
  ratio splits, which have no sampled protocol).
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
from fastattrec.data.splits import LEAVE_ONE_OUT, SPLITS
from fastattrec.errors import UserError, first_error_line, quoted, shown
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
    n_val: np.ndarray | None = None  # (U,) int32 validation targets per user (None: 1 each)
    n_test: np.ndarray | None = None  # (U,) int32 test targets per user (None: 1 each)

    @property
    def split(self) -> str:
        """leave-one-out, time or ratio (docs/spec.md §1.11)."""
        return split_of(self.meta)

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


def split_of(meta: dict[str, Any]) -> str:
    """The split a dataset's meta.json records (leave-one-out before there was a choice)."""
    return meta["params"].get("split", LEAVE_ONE_OUT)


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
        names = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise UserError(f"{quoted(path)} is a prepared dataset but also holds {names}, which "
                        f"fastattrec did not write; move them out before --force, or choose "
                        f"another -o.")
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
        raise UserError(f"{quoted(path)} does not exist; run `fastattrec prep INPUT -o "
                        f"{quoted(path)}` to create it.")
    if not path.is_dir():
        raise UserError(f"{quoted(path)} is a file; give the folder that `fastattrec prep` wrote.")
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise UserError(
            f"{quoted(path)} is not a prepared dataset (missing {', '.join(missing)}); give the "
            f"folder that `fastattrec prep` wrote."
        )
    again, file = _again(path), quoted(path / "meta.json")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{file} is unreadable ({e}); {again}.") from None
    if not isinstance(meta, dict):
        raise UserError(f"{file} holds a JSON {type(meta).__name__}, not the "
                        f"object fastattrec writes; {again}.")
    version = meta.get("format_version")
    if isinstance(version, str | bool):
        raise UserError(f"{file} gives format_version as {shown(version)}, but "
                        f"fastattrec writes the number {FORMAT_VERSION}: the file was edited "
                        f"or written by another tool; {again}.")
    if version != FORMAT_VERSION:
        raise UserError(
            f"{file} says dataset format {version!r}, this fastattrec reads format "
            f"{FORMAT_VERSION}; {again}."
        )
    problems = [k for k, kind in _META_KEYS.items() if not isinstance(meta.get(k), kind)]
    counts, params = meta.get("counts"), meta.get("params")
    if not problems:
        problems = [f"counts.{k}" for k in _COUNT_KEYS if not _is_int(counts.get(k))]
        if not _is_int(params.get("test_negatives_per_user")):
            problems.append("params.test_negatives_per_user")
        if params.get("split", LEAVE_ONE_OUT) not in SPLITS:
            problems.append("params.split")
    if problems:
        raise UserError(f"{file} lacks or garbles {', '.join(problems)}; {again}.")
    if params["test_negatives_per_user"] < 1 and split_of(meta) == LEAVE_ONE_OUT:
        raise UserError(f"{file} gives params.test_negatives_per_user as 0, so every test "
                        f"target would rank first against no negatives (HR@K 1.0); prepare "
                        f"it again with `fastattrec prep INPUT -o {quoted(path)} --force "
                        f"--test-negatives 100`.")
    for key, least in _COUNT_LEAST.items():
        if counts[key] < least:
            raise UserError(f"{file} gives counts.{key} as {counts[key]}, but a prepared "
                            f"dataset has at least {least}; {again}.")
    return meta


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_META_KEYS = {"counts": dict, "params": dict, "source": dict}
_COUNT_KEYS = ("item_rows", "users", "items", "interactions")
# The least each count can be: one user with two interactions of one item; the padding row.
_COUNT_LEAST = {"item_rows": 2, "users": 1, "items": 1, "interactions": 2}


def load_prepared(path: Path) -> Prepared:
    """Load a prepared dataset folder into numpy arrays, after checking every column of
    every file against meta.json and the other files (one sentence naming the file)."""
    path = Path(path)
    meta = read_meta(path)
    loo = split_of(meta) == LEAVE_ONE_OUT
    columns = {**_COLUMNS, "users.parquet": _COLUMNS["users.parquet"] + (
        () if loo else ("n_val", "n_test"))}
    frames = {name: _read_parquet(path, name, cols) for name, cols in columns.items()}
    for name, frame in frames.items():
        _check_values(path, name, frame)
    seq, users = frames["sequences.parquet"], frames["users.parquet"]
    items, test = frames["items.parquet"], frames["test_negatives.parquet"]
    counts, rows = meta["counts"], meta["counts"]["item_rows"]
    n_neg = int(meta["params"]["test_negatives_per_user"])
    lengths = users.get_column("length").to_numpy().astype(np.int64)
    offsets = users.get_column("offset").to_numpy().astype(np.int64)
    seq_items = seq.get_column("item").to_numpy()
    seq_negs = seq.get_column("neg").to_numpy()
    test_negs = test.get_column("neg").to_numpy()
    n_test_users = int((lengths >= 2).sum())
    for name, frame, key, what in (("users.parquet", users, "users", "users"),
                                   ("items.parquet", items, "items", "items"),
                                   ("sequences.parquet", seq, "interactions", "interactions")):
        if frame.height != counts[key]:
            _disagree(path, f"{name} has {frame.height:,} rows but meta.json counts "
                            f"{counts[key]:,} {what}")
    if not ((lengths >= 2).all() and int(lengths.sum()) == seq.height
            and np.array_equal(offsets, np.cumsum(lengths) - lengths)):
        _disagree(path, "users.parquet's offset and length columns do not cut "
                        "sequences.parquet into the users' sequences (each at least 2 long)")
    n_val = n_test = None
    if not loo:
        n_val = users.get_column("n_val").to_numpy().astype(np.int64)
        n_test = users.get_column("n_test").to_numpy().astype(np.int64)
        if not ((n_val >= 0).all() and (n_test >= 0).all()
                and (n_val + n_test <= lengths).all()):
            _disagree(path, "users.parquet's n_val and n_test columns are negative or add "
                            "up to more than the user's length")
    for name, col, ids in (("sequences.parquet", "item", seq_items),
                           ("sequences.parquet", "neg", seq_negs),
                           ("test_negatives.parquet", "neg", test_negs),
                           ("items.parquet", "item", items.get_column("item").to_numpy())):
        if not _in_range(ids, rows):
            _disagree(path, f"{name} column {col} holds ids outside 1..{rows - 1} "
                            f"(meta.json counts.item_rows is {rows})")
    if test.height != n_test_users * n_neg or not np.array_equal(
            test.get_column("user").to_numpy(),
            np.repeat(np.flatnonzero(lengths >= 2) + 1, n_neg)):
        _disagree(path, f"test_negatives.parquet has {test.height:,} rows but meta.json's "
                        f"params.test_negatives_per_user {n_neg} for {n_test_users:,} users "
                        f"needs {n_test_users * n_neg:,}, users in id order")
    test_negs = test_negs.astype(np.int32).reshape(n_test_users, n_neg)
    if not _ids_valid(users, items, rows):
        _disagree(path, "users.parquet or items.parquet repeats an id (or users are not "
                        "numbered 1..U in order)")
    if not _negatives_valid(test_negs, seq_items, seq_negs, lengths, rows,
                            bool(meta["params"].get("test_negatives_distinct", True))):
        _disagree(path, "a negative is one of its user's own items, or a user's test "
                        "negatives repeat")
    return Prepared(
        path=path,
        meta=meta,
        items=seq_items.astype(np.int32),
        negs=seq_negs.astype(np.int32),
        offsets=offsets,
        lengths=lengths.astype(np.int32),
        test_negs=test_negs,
        raw_users=users.get_column("raw_user"),
        raw_items=items.get_column("raw_item"),
        item_rows=items.get_column("item").to_numpy().astype(np.int32),
        n_val=None if n_val is None else n_val.astype(np.int32),
        n_test=None if n_test is None else n_test.astype(np.int32),
    )


# The columns of each file; every one but raw_user and raw_item holds whole numbers.
_COLUMNS = {"sequences.parquet": ("item", "neg"),
            "users.parquet": ("user", "raw_user", "offset", "length"),
            "items.parquet": ("item", "raw_item"),
            "test_negatives.parquet": ("user", "neg")}


def _again(path: Path) -> str:
    return f"prepare it again with `fastattrec prep INPUT -o {quoted(path)} --force`"


def _disagree(path: Path, why: str) -> None:
    raise UserError(f"{quoted(path)}: its files do not agree with each other or with "
                    f"meta.json ({why}); {_again(path)}.")


def _read_parquet(path: Path, name: str, cols: tuple[str, ...]) -> pl.DataFrame:
    """One file of the dataset, its columns checked; one sentence when it cannot be read
    (permission denied, damaged) or lacks a column."""
    file = path / name
    try:
        open(file, "rb").close()  # the system's own words for an unreadable file
        frame = pl.read_parquet(file)
    except OSError as e:
        why = e.strerror or str(e).split(" (os error")[0]
        raise UserError(f"cannot read {quoted(file)} ({why.lower()}); give fastattrec read "
                        f"access to it, or {_again(path)}.") from None
    except pl.exceptions.PolarsError as e:
        first = first_error_line(e)
        raise UserError(f"{quoted(file)} is a damaged Parquet file ({first}); "
                        f"{_again(path)}.") from None
    missing = [c for c in cols if c not in frame.columns]
    if missing:
        raise UserError(f"{quoted(file)} lacks column(s) {', '.join(missing)}; "
                        f"{_again(path)}.")
    return frame.select(cols)


def _check_values(path: Path, name: str, frame: pl.DataFrame) -> None:
    """No empty (null) value anywhere, whole numbers in every id, offset and length
    column (a float column would be cut to integers silently)."""
    for col in frame.columns:
        series = frame.get_column(col)
        nulls = series.null_count()
        if nulls:
            first = int(series.is_null().arg_max())
            raise UserError(f"{quoted(path / name)} has {nulls:,} empty (null) value(s) in "
                            f"column {col}, the first in row {first + 1:,}; fastattrec never "
                            f"writes one, so the file was edited: {_again(path)}.")
        if not col.startswith("raw_") and not series.dtype.is_integer():
            raise UserError(f"{quoted(path / name)} column {col} holds {series.dtype}, not "
                            f"whole numbers; fastattrec writes Int32/Int64 there, so the "
                            f"file was edited: {_again(path)}.")


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
