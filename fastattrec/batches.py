"""The prepared dataset on the device, and windows cut from it by index arithmetic.

The flat sequences move to the device once. A window for a target at flat row t is the
L rows before t within the same user, left-padded with 0 (Keras `pad_sequences`
defaults: pre-padding, pre-truncation). No DataLoader, no per-sample Python: a batch of
windows is one gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fastattrec.data.dataset import Prepared


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
    val_rows: torch.Tensor  # (V,) long, validation targets (position n-2)
    test_rows: torch.Tensor  # (U_test,) long, test targets (position n-1)
    test_negs: torch.Tensor  # (U_test, n_neg) long
    item_valid: torch.Tensor  # (n_items,) bool, rows that are real items
    n_items: int  # item table rows, padding included
    n_users: int  # user table rows, padding included

    @classmethod
    def from_prepared(cls, p: Prepared, device: torch.device | str) -> DeviceData:
        """Build the index arrays with numpy once, then move them to `device`."""
        lengths = p.lengths.astype(np.int64)
        n = int(lengths.sum())
        row_user = np.repeat(np.arange(1, p.n_users + 1, dtype=np.int64), lengths)
        row_pos = np.arange(n, dtype=np.int64) - np.repeat(p.offsets, lengths)
        row_len = np.repeat(lengths, lengths)
        train = np.flatnonzero((row_pos >= 1) & (row_pos <= row_len - 3))
        ends = p.offsets + lengths  # one past each user's last row
        val = (ends - 2)[lengths >= 3]
        test = (ends - 1)[lengths >= 2]
        item_valid = np.zeros(p.n_item_rows, dtype=bool)
        item_valid[p.item_rows] = True

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device)

        return cls(
            items=t(p.items.astype(np.int64)),
            negs=t(p.negs.astype(np.int64)),
            row_user=t(row_user),
            row_pos=t(row_pos),
            offsets=t(np.concatenate([[0], p.offsets])),
            lengths=t(np.concatenate([[0], lengths])),
            train_rows=t(train),
            val_rows=t(val),
            test_rows=t(test),
            test_negs=t(p.test_negs.astype(np.int64)),
            item_valid=t(item_valid),
            n_items=p.n_item_rows,
            n_users=p.n_user_rows,
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

    def latest_windows(self, users: torch.Tensor, maxlen: int) -> torch.Tensor:
        """(B, L) windows of each user's last L items (for recommendations)."""
        end = self.offsets[users] + self.lengths[users]
        return self.windows_ending(end, self.lengths[users], maxlen)

    def item_popularity(self) -> torch.Tensor:
        """(n_items,) float counts over train + validation rows (everything but test)."""
        keep = self.row_pos <= self.lengths[self.row_user] - 2
        return torch.bincount(self.items[keep], minlength=self.n_items).to(torch.float32)

    def sample_negatives(self, generator: torch.Generator, per_row: int = 1,
                         rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) fresh negatives for every row, uniform over the items the user never saw;
        (N, per_row) with `per_row` > 1 (drawn independently, with replacement); only for
        the flat rows `rows` (R,) when given.

        Exact and loop-free: with a user's distinct seen items v_0 < v_1 < ... (0-based)
        and c_j = v_j - j, the r-th unseen item is r + #{j : c_j <= r}; one searchsorted
        over the keys u * stride + c_j answers that count for all rows at once.
        """
        universe = self.n_items - 1  # item ids 1..n_items-1, as in `prep`
        stride = universe + 1
        keys = torch.unique(self.row_user * stride + (self.items - 1))  # sorted, distinct
        users = keys // stride
        first = torch.searchsorted(keys, users * stride)  # first key of each user's run
        j = torch.arange(keys.shape[0], device=self.device) - first
        cs = keys - j  # u * stride + c_j, nondecreasing
        seen = torch.bincount(users, minlength=self.n_users)  # distinct seen per user
        row_user = self.row_user if rows is None else self.row_user[rows]  # (R,)
        unseen = universe - seen[row_user]  # (R,)
        shape = (row_user.shape[0],) if per_row == 1 else (row_user.shape[0], per_row)
        u = torch.rand(shape, generator=generator, device=self.device, dtype=torch.float64)
        if per_row > 1:
            row_user, unseen = row_user[:, None].expand(shape), unseen[:, None]
        r = torch.minimum((u * unseen).long(), unseen - 1)
        start = torch.searchsorted(cs, (row_user * stride).contiguous())
        below = torch.searchsorted(cs, (row_user * stride + r).contiguous(), right=True) - start
        return r + below + 1

    def shared_negatives(self, generator: torch.Generator, steps: int, n: int) -> torch.Tensor:
        """(steps, n) negatives shared by every sample of a step: uniform over all items
        (a negative may be a sample's own item; the loss masks one equal to its target)."""
        items = torch.nonzero(self.item_valid).flatten()  # (I,) real item rows
        pick = torch.randint(items.shape[0], (steps, n), generator=generator,
                             device=self.device)
        return items[pick]
