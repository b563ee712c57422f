"""Every batch of an epoch, cut and planned once at the epoch's start (the one-scatter step).

The default training step picks its batch out of the epoch with a dozen small kernels
(the permutation's slice, one gather per per-sample array, the padding mask, the count)
and, with `TrainConfig.one_scatter`, would sort its scatter's destination rows as well.
All of that depends only on the epoch's permutation and negatives, so `EpochBatches.fill`
does it for the whole epoch at once, into buffers that stay put (CUDA graphs read them):

- `index` (T, N) int64: step t's N looked-up table rows in the flat row space of the
  three tables (user rows, then item rows, then item2 rows): the batch's users, its
  window items, its (positive, negative) candidates in the item table, the candidates
  again in the item2 table (`lookups` gives the layout);
- the scatter plan of every step (`plan_segments` of `index`: one segmented sort);
- `aux` (T, B + 1) float32: which slots hold samples (`valid`, 1 or 0: the last batch is
  padded to B), then how many (`count`); fixed by the sizes alone, written once.

A step then reads row `step` of these with a device counter: one gather kernel for all
its table rows, which also flags the window slots that hold the padding item (the key
mask, `kernels/embedding_gather.py`), one selection of `aux`, and the scatter for all
the rows' gradients (`kernels/embedding_scatter.py`). The batches are exactly the default
step's: slot j of step t is sample perm[min(t B + j, T_train - 1)], valid when
t B + j < T_train.
"""

from __future__ import annotations

import torch

from fastattrec.kernels.experimental.embedding_scatter import SegmentPlan, plan_segments


def lookups(batch: int, maxlen: int) -> tuple[int, int, int, int]:
    """How many of a step's N lookups go to users, window items, item candidates and
    item2 candidates, in that order: (B, B L, 2 B, 2 B)."""
    return batch, batch * maxlen, 2 * batch, 2 * batch


CHUNK = 512  # steps planned at once: the planning's temporaries stay below ~0.5 GB


def plan_bytes(n_train: int, batch: int, maxlen: int) -> int:
    """Device memory the buffers take (for the memory check before a run)."""
    steps = -(-n_train // batch)
    n = sum(lookups(batch, maxlen))
    # index, order, rows (T, N) and starts (T, N + 1) int64, and aux; while planning,
    # a chunk's temporaries (the sort, the (t, 2N) scatters: about 12 int64 per lookup)
    return steps * (8 * 4 * n + 4 * (batch + 1)) + min(steps, CHUNK) * 12 * 8 * n


class EpochBatches:
    """The fixed-shape buffers of one epoch's batches; `fill` writes them in place."""

    def __init__(self, n_train: int, batch: int, maxlen: int, n_users: int, n_items: int,
                 device: torch.device) -> None:
        self.n_train, self.batch, self.maxlen = n_train, batch, maxlen
        self.n_users, self.n_items = n_users, n_items
        self.n_steps = -(-n_train // batch)
        t, n = self.n_steps, sum(lookups(batch, maxlen))
        self.n_lookups = n
        self.n_rows = n_users + 2 * n_items  # the flat row space of the three tables
        dev = device
        self.index = torch.zeros((t, n), dtype=torch.long, device=dev)
        self.order = torch.zeros((t, n), dtype=torch.long, device=dev)
        self.rows = torch.zeros((t, n), dtype=torch.long, device=dev)
        self.starts = torch.zeros((t, n + 1), dtype=torch.long, device=dev)
        self.segments = torch.zeros((t,), dtype=torch.long, device=dev)
        # (T, B + 1): valid (1 or 0) of every slot, then the sample count, per step
        slots = torch.arange(t * batch, device=dev).view(t, batch)
        count = (n_train - slots[:, 0]).clamp(max=batch)  # (T,)
        self.aux = torch.cat([(slots < n_train).float(), count[:, None].float()], dim=1)
        self.padding_row = n_users  # the item table's row 0 in the flat row space

    @property
    def plan(self) -> SegmentPlan:
        """Every step's scatter plan (padded; a step reads its own rows of it)."""
        return SegmentPlan(self.order, self.rows, self.starts, self.segments, self.n_rows)

    @torch.no_grad()
    def fill(self, perm: torch.Tensor, users: torch.Tensor, windows: torch.Tensor,
             targets: torch.Tensor, negs: torch.Tensor) -> None:
        """Cut and plan the epoch whose order of train samples is `perm` (T_train,), from
        the per-sample users (T_train,), windows (T_train, L), targets and negatives
        (T_train,), in place. No host synchronisation."""
        b, length = self.batch, self.maxlen
        nu, ni = self.n_users, self.n_items
        for t0 in range(0, self.n_steps, CHUNK):  # chunks of steps bound the temporaries
            t1 = min(t0 + CHUNK, self.n_steps)
            t = t1 - t0
            slots = torch.arange(t0 * b, t1 * b, device=perm.device)  # positions in perm
            idx = perm[slots.clamp(max=self.n_train - 1)]  # (t B,) samples, padded at the end
            u = users[idx].long().view(t, b)
            w = windows[idx].long().view(t, b * length)
            items = torch.stack([targets[idx], negs[idx]], dim=1).long().view(t, 2 * b)
            index = self.index[t0:t1]
            index.copy_(torch.cat([u, nu + w, nu + items, nu + ni + items], dim=1))
            plan = plan_segments(index, self.n_rows, check=False)
            for dst, src in ((self.order, plan.order), (self.rows, plan.rows),
                             (self.starts, plan.starts), (self.segments, plan.count)):
                dst[t0:t1].copy_(src)

    def step_aux(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid (B,), count 0-d) of step `step` (a 0-d device tensor): one launch."""
        row = self.aux.index_select(0, step.reshape(1))[0]  # (B + 1,)
        return row[:self.batch], row[self.batch]

    def window_mask(self, flags: torch.Tensor) -> torch.Tensor:
        """The key mask (B, L) among a step's lookup flags (N,) from the gather
        (`flag_row=padding_row`): the window slots, in order (a view)."""
        b, length = self.batch, self.maxlen
        return flags[b:b + b * length].view(b, length)


__all__ = ["EpochBatches", "lookups", "plan_bytes"]
