"""The prepared dataset on disk, and its loader.

A prepared dataset is a folder (see README, "Prepared dataset format"):

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

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fastattrec.data import FORMAT_VERSION
from fastattrec.errors import UserError

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


def read_meta(path: Path) -> dict[str, Any]:
    """Read and check `meta.json`, or explain why `path` is not a prepared dataset."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; run `fastattrec prep` to create it.")
    if not path.is_dir():
        raise UserError(f"{path} is a file; give the folder that `fastattrec prep` wrote.")
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise UserError(
            f"{path} is not a prepared dataset (missing {', '.join(missing)}); "
            f"run `fastattrec prep INPUT -o {path}`."
        )
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path / 'meta.json'} is unreadable ({e}); prepare it again.") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path} has dataset format {meta.get('format_version')}, this fastattrec reads "
            f"format {FORMAT_VERSION}; prepare it again with this version."
        )
    return meta


def load_prepared(path: Path) -> Prepared:
    """Load a prepared dataset folder into numpy arrays."""
    path = Path(path)
    meta = read_meta(path)
    seq = pl.read_parquet(path / "sequences.parquet")
    users = pl.read_parquet(path / "users.parquet")
    items = pl.read_parquet(path / "items.parquet")
    test = pl.read_parquet(path / "test_negatives.parquet")
    n_test_users = int((users.get_column("length") >= 2).sum())
    n_neg = int(meta["params"]["test_negatives_per_user"])
    test_negs = test.get_column("neg").to_numpy().astype(np.int32)
    if test_negs.shape[0] != n_test_users * n_neg:
        raise UserError(f"{path}: test_negatives.parquet does not match users.parquet; "
                        f"prepare it again.")
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
