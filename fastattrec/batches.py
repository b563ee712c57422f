"""The prepared dataset on the device, and windows cut from it by index arithmetic.

The flat sequences move to the device once. A window for a target at flat row t is the
L rows before t within the same user, left-padded with 0 (Keras `pad_sequences`
defaults: pre-padding, pre-truncation). No DataLoader, no per-sample Python: a batch of
windows is one gather.

Each user's sequence is train items, then `n_val` validation and `n_test` test items
(one and one for leave-one-out; docs/spec.md §1.11). Validation and test are `Phase`s:
one query per evaluated user, whose window is the L items before the user's first
target of that phase, and whose targets are all of the user's items in that phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from fastattrec.data.dataset import Prepared


@dataclass
class Phase:
    """The queries of one evaluation phase (validation or test), one per evaluated user:
    a user is evaluated when it has a target in the phase and an item before it."""

    users: torch.Tensor  # (P,) long, dense user of each query, ascending
    ends: torch.Tensor  # (P,) long, flat row of the query's first target (window ends here)
    avail: torch.Tensor  # (P,) long, the user's rows before it (its history)
    rows: torch.Tensor  # (M,) long, flat rows of every target, query by query
    owner: torch.Tensor  # (M,) long, query (0..P-1) of each target row
    rank_rows: torch.Tensor  # (D,) long, `rows` without a repeated (query, item)
    rank_owner: torch.Tensor  # (D,) long, nondecreasing query of each `rank_rows` entry
    skipped: int  # users with a target in the phase but no earlier item (not evaluated)

    @property
    def n(self) -> int:
        """Number of queries (evaluated users)."""
        return int(self.users.shape[0])

    @classmethod
    def build(cls, offsets: np.ndarray, first: np.ndarray, count: np.ndarray,
              items: np.ndarray, n_items: int, to) -> Phase:
        """The phase whose targets are user u's rows first[u] .. first[u] + count[u] - 1
        (positions within the user; arrays (U,) over users 1..U); `to` moves an array to
        the device. Host-side numpy, once per load."""
        ok = (first >= 1) & (count >= 1)
        users = np.flatnonzero(ok).astype(np.int64) + 1
        ends = offsets[ok] + first[ok]
        cnt = count[ok].astype(np.int64)
        owner = np.repeat(np.arange(users.shape[0], dtype=np.int64), cnt)
        rows = np.repeat(ends, cnt) + np.arange(owner.shape[0]) - np.repeat(
            np.cumsum(cnt) - cnt, cnt)
        # One entry per distinct (query, item): a repeated target is one relevant item.
        key = owner * n_items + items[rows].astype(np.int64)
        keep = np.sort(np.unique(key, return_index=True)[1])
        return cls(to(users), to(ends), to(first[ok].astype(np.int64)), to(rows), to(owner),
                   to(rows[keep]), to(owner[keep]), int(((count >= 1) & (first < 1)).sum()))

    @classmethod
    def of_rows(cls, data: DeviceData, rows: torch.Tensor) -> Phase:
        """One query per flat row of `rows` (B,): that row is its only target, the rows
        before it in its user are its history."""
        q = torch.arange(rows.shape[0], device=rows.device)
        return cls(data.row_user[rows], rows, data.row_pos[rows], rows, q, rows, q, 0)


# Users x items up to which sample_negatives looks negatives up in a table of every user's
# unseen items (int32, at most 128 MiB) instead of searching for each one.
UNSEEN_TABLE_MAX = 2**25


@dataclass
class UnseenIndex:
    """Where user u's r-th unseen item is, for r in 0..unseen[u] - 1 (items 1..I-1 in
    ascending order, without the items of the user's sequence).

    With the user's distinct seen items v_0 < v_1 < ... (0-based) and c_j = v_j - j, the
    r-th unseen item is r + #{j : c_j <= r} + 1: `cs` holds the keys u * stride + c_j,
    sorted, and `user_start[u]` where user u's keys begin, so one searchsorted counts. Where
    users x items is at most UNSEEN_TABLE_MAX, `table[table_start[u] + r]` holds the same
    item, found by one gather."""

    unseen: torch.Tensor  # (U + 1,) long, unseen items per user
    stride: int
    # the table's form: every user's unseen items in order (sum of unseen,) int32, and the
    # offset of user u's (U + 1,) long; else None
    table: torch.Tensor | None
    table_start: torch.Tensor | None
    # the search's form (without the table): u * stride + c_j over every user's distinct
    # seen items (S,) long, and where user u's keys begin (U + 1,) long; else None
    cs: torch.Tensor | None
    user_start: torch.Tensor | None

    @classmethod
    def build(cls, row_user: torch.Tensor, items: torch.Tensor, n_users: int,
              n_items: int) -> UnseenIndex:
        universe = n_items - 1  # item ids 1..n_items-1, as in `prep`
        stride = universe + 1
        keys = torch.unique(row_user * stride + (items - 1))  # sorted, distinct
        users = keys // stride
        unseen = universe - torch.bincount(users, minlength=n_users)
        if n_users * universe <= UNSEEN_TABLE_MAX:
            seen = torch.zeros(n_users * universe, dtype=torch.bool, device=keys.device)
            seen[users * universe + keys % stride] = True
            flat = torch.nonzero(~seen).flatten()  # row-major: user by user, items ascending
            table = (flat % universe + 1).to(torch.int32)
            return cls(unseen, stride, table, torch.cumsum(unseen, 0) - unseen, None, None)
        first = torch.searchsorted(keys, users * stride)  # first key of each user's run
        cs = keys - (torch.arange(keys.shape[0], device=keys.device) - first)
        user_start = torch.searchsorted(cs, torch.arange(n_users, device=keys.device) * stride)
        return cls(unseen, stride, None, None, cs, user_start)

    def pick(self, user: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The r-th unseen item (long, r's shape) of each `user` (r's shape)."""
        if self.table is not None:
            return self.table[self.table_start[user] + r].long()
        below = torch.searchsorted(self.cs, (user * self.stride + r).contiguous(),
                                   right=True) - self.user_start[user]
        return r + below + 1


@dataclass
class DeviceData:
    """Index tensors of a prepared dataset, on one device."""

    items: torch.Tensor  # (N,) long, item of each flat row
    negs: torch.Tensor  # (N,) long, fixed negative paired with the target at each row
    row_user: torch.Tensor  # (N,) long, dense user id of each row
    row_pos: torch.Tensor  # (N,) long, position of the row within its user (0-based)
    offsets: torch.Tensor  # (U + 1,) long, offsets[u] = first row of user u (u >= 1)
    lengths: torch.Tensor  # (U + 1,) long, lengths[u] = sequence length (0 for u = 0)
    train_rows: torch.Tensor  # (T,) long, rows whose item is a train target
    val_rows: torch.Tensor  # (V,) long, validation targets (leave-one-out: position n-2)
    test_rows: torch.Tensor  # (U_test,) long, test targets (leave-one-out: position n-1)
    test_negs: torch.Tensor  # (U_test, n_neg) long (n_neg = 0 but for leave-one-out)
    item_valid: torch.Tensor  # (n_items,) bool, rows that are real items
    n_items: int  # item table rows, padding included
    n_users: int  # user table rows, padding included
    val: Phase | None = None  # the validation queries (val.rows is val_rows)
    test: Phase | None = None  # the test queries (test.rows is test_rows)
    n_test_rows: torch.Tensor | None = None  # (U + 1,) long, test items per user
    split: str = "leave-one-out"

    @property
    def leave_one_out(self) -> bool:
        """One test target per user, with its sampled negatives (docs/spec.md §1.5)."""
        return self.split == "leave-one-out"

    @classmethod
    def from_prepared(cls, p: Prepared, device: torch.device | str) -> DeviceData:
        """Build the index arrays with numpy once, then move them to `device`."""
        lengths = p.lengths.astype(np.int64)
        n = int(lengths.sum())
        ones = np.ones_like(lengths)
        n_val = ones if p.n_val is None else p.n_val.astype(np.int64)
        n_test = ones if p.n_test is None else p.n_test.astype(np.int64)
        n_train = lengths - n_val - n_test  # (U,) train items: the first of each user
        row_user = np.repeat(np.arange(1, p.n_users + 1, dtype=np.int64), lengths)
        row_pos = np.arange(n, dtype=np.int64) - np.repeat(p.offsets, lengths)
        train = np.flatnonzero((row_pos >= 1) & (row_pos < np.repeat(n_train, lengths)))
        item_valid = np.zeros(p.n_item_rows, dtype=bool)
        item_valid[p.item_rows] = True

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        val = Phase.build(p.offsets, n_train, n_val, p.items, p.n_item_rows, t)
        test = Phase.build(p.offsets, n_train + n_val, n_test, p.items, p.n_item_rows, t)

        return cls(
            items=t(p.items.astype(np.int64)),
            negs=t(p.negs.astype(np.int64)),
            row_user=t(row_user),
            row_pos=t(row_pos),
            offsets=t(np.concatenate([[0], p.offsets])),
            lengths=t(np.concatenate([[0], lengths])),
            train_rows=t(train),
            val_rows=val.rows,
            test_rows=test.rows,
            test_negs=t(p.test_negs.astype(np.int64)),
            item_valid=t(item_valid),
            n_items=p.n_item_rows,
            n_users=p.n_user_rows,
            val=val,
            test=test,
            n_test_rows=t(np.concatenate([[0], n_test])),
            split=p.split,
        )

    @property
    def device(self) -> torch.device:
        return self.items.device

    def train_arrays(self, maxlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """int32 (T, L) windows, (T,) users and (T,) targets of every train sample, cut
        once so that a training step gathers three rows instead of recomputing them."""
        rows = self.train_rows
        return (self.windows_before(rows, maxlen).to(torch.int32),
                self.row_user[rows].to(torch.int32), self.items[rows].to(torch.int32))

    def windows_before(self, rows: torch.Tensor, maxlen: int) -> torch.Tensor:
        """(B, L) windows of the items before target rows `rows` (B,) in their user."""
        return self.windows_ending(rows, self.row_pos[rows], maxlen)

    def windows_ending(self, end: torch.Tensor, avail: torch.Tensor,
                       maxlen: int) -> torch.Tensor:
        """(B, L) windows of the `avail` (B,) rows before flat row `end` (B,), pre-padded."""
        slot = torch.arange(maxlen, device=end.device)  # (L,)
        idx = end[:, None] - maxlen + slot[None, :]  # (B, L)
        valid = slot[None, :] >= (maxlen - avail)[:, None]
        return torch.where(valid, self.items[idx.clamp(min=0)], 0)

    def query_windows(self, phase: Phase, maxlen: int, lo: int = 0,
                      hi: int | None = None) -> torch.Tensor:
        """(B, L) windows of queries lo..hi-1 of `phase`: the items before each first
        target."""
        return self.windows_ending(phase.ends[lo:hi], phase.avail[lo:hi], maxlen)

    def latest_windows(self, users: torch.Tensor, maxlen: int) -> torch.Tensor:
        """(B, L) windows of each user's last L items (for recommendations)."""
        end = self.offsets[users] + self.lengths[users]
        return self.windows_ending(end, self.lengths[users], maxlen)

    def item_popularity(self) -> torch.Tensor:
        """(n_items,) float counts over train + validation rows (everything but test)."""
        n_test = self.n_test_rows if self.n_test_rows is not None else torch.ones_like(
            self.lengths)
        keep = self.row_pos < (self.lengths - n_test)[self.row_user]
        return torch.bincount(self.items[keep], minlength=self.n_items).to(torch.float32)

    def sample_negatives(self, generator: torch.Generator, per_row: int = 1,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) fresh negatives for every row, uniform over the items the user never saw;
        (N, per_row) with `per_row` > 1 (drawn independently, with replacement); only for
        the flat rows `rows` (R,) when given.

        Exact and loop-free: a uniform r in 0..unseen_u - 1 per draw picks user u's r-th
        unseen item, looked up in `unseen_index` (a table of every user's unseen items,
        or a search where that table would be too large; both give the same item).
        """
        index = self.unseen_index
        row_user = self.row_user if rows is None else self.row_user[rows]  # (R,)
        unseen = index.unseen[row_user]  # (R,)
        shape = (row_user.shape[0],) if per_row == 1 else (row_user.shape[0], per_row)
        u = torch.rand(shape, generator=generator, device=self.device, dtype=torch.float64)
        if per_row > 1:
            row_user, unseen = row_user[:, None].expand(shape), unseen[:, None]
        r = torch.minimum((u * unseen).long(), unseen - 1)
        return index.pick(row_user, r)

    @cached_property
    def unseen_index(self) -> UnseenIndex:
        """Every user's unseen items, built once per dataset (the sequences never change)."""
        return UnseenIndex.build(self.row_user, self.items, self.n_users, self.n_items)

    def shared_negatives(self, generator: torch.Generator, steps: int, n: int) -> torch.Tensor:
        """(steps, n) negatives shared by every sample of a step: uniform over all items
        (a negative may be a sample's own item; the loss masks one equal to its target)."""
        items = torch.nonzero(self.item_valid).flatten()  # (I,) real item rows
        pick = torch.randint(items.shape[0], (steps, n), generator=generator,
                             device=self.device)
        return items[pick]
