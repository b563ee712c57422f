"""The embedding gradients of a training step summed into the tables in one deterministic launch.

Why: a GPU AttRec step looks rows up four times (users in the user table, the windows and
the (pos, neg) items in the item table, the items again in the item2 table), and the
backward adds each lookup's (n, d) gradient into its table's gradient. With `index_add_`
that is four scatters; on CUDA each one uses atomic adds (the order of the additions, so
the last bits of the result, change from run to run), and PyTorch's deterministic path
sorts the index on every call (about ten kernels per scatter). Here the destination rows
of the whole step are sorted once (`plan_segments`) and one Triton kernel (`scatter_rows_`)
sums them, one program per destination row and block of columns, without atomics.

Plan. For N source rows with destination rows `index` (N,):

- `order` (N,): a *stable* sort permutation of the positions by destination row;
- `rows` (S,): the distinct destination rows, ascending;
- `starts` (S + 1,): segment s is `order[starts[s]:starts[s + 1]]`, the positions that go
  to `rows[s]`, in increasing position order.

Summation order. Program s adds its segment's source rows one after the other in that
order, in float32, starting from -0.0 (the exact identity of IEEE addition, so a sum of
one row is that row, bit for bit), then adds the sum to `out[rows[s]]` (`accumulate`) or
writes it there. Every step of that is fixed by the index alone, so the result is
bit-reproducible, and equal bit for bit to the float32 loop "for p in 0..N-1:
acc[index[p]] += src[p]" (tests/test_embedding_scatter.py checks exactly that). The
torch fallback `scatter_rows_torch_` performs the same additions in the same order, so it
gives the same bits on any device.

Several tables in one launch: put their gradients in one (R_1 + R_2 + ..., d) buffer (the
tables' `.grad` can be views of it) and shift each lookup's rows by its table's offset
(`table_offsets`); for AttRec, with user rows U and item rows I:

    index = cat([users, U + windows, U + items, U + I + items])       # (N,)
    src   = cat([du, dx.reshape(-1, d), de.reshape(-1, d), de2.reshape(-1, d)])  # (N, d)
    buffer (U + 2 I, d) = [user grad; item grad; item2 grad]

Planning an epoch at once. `plan_segments` also takes a (T, N) index, T steps of N
lookups each, and returns T plans in one padded layout: `rows` (T, N), `starts`
(T, N + 1), `count` (T,) segments per step (the rest is padding, never read). One
segmented sort plans the epoch; `plan.step(t)` is then a fixed-shape plan whose launch
grid is N programs (those past `count` return at once). A training step passes
`step=` instead, the device tensor counting the epoch's steps: the kernel reads it and
picks its rows of the plan itself, so a CUDA graph of one or many steps replays with no
copy and no sort between steps (the training loop's one-scatter step, planned by
`fastattrec/epoch_batches.py`). A 1-D index gives one exact plan (S read back from the
device). Planning with `check=True` reads the index's range back to check it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..launch import KernelSpec, interpreted, small_kernel_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: only the torch path exists
    triton = None

BACKENDS = ("auto", "triton", "torch")
UNROLL = 4  # source rows loaded per loop trip (loads in flight; the adds stay in order)
MAX_BLOCK_D = 256

if triton is not None:

    @triton.jit
    def _scatter_rows(out_ptr, src_ptr, order_ptr, rows_ptr, starts_ptr, count_ptr, step_ptr,
                      n, d, ACCUMULATE: tl.constexpr, STEPPED: tl.constexpr,
                      UNROLL: tl.constexpr, BLOCK_D: tl.constexpr):
        # program (s, j): segment s, columns [j BLOCK_D, (j + 1) BLOCK_D)
        s = tl.program_id(0)
        if STEPPED:  # step `t` of a padded plan of several steps: its rows of the plan
            t = tl.load(step_ptr).to(tl.int64)
            order_ptr += t * n
            rows_ptr += t * n
            starts_ptr += t * (n + 1)
            count_ptr += t
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < d
        if s < tl.load(count_ptr):  # programs past the step's segment count do nothing
            start = tl.load(starts_ptr + s)
            end = tl.load(starts_ptr + s + 1)
            acc = tl.full([BLOCK_D], -0.0, tl.float32)
            for i in range(start, end, UNROLL):
                # UNROLL independent loads, then the adds in position order; rows past
                # the segment's end read -0.0, which leaves acc unchanged bit for bit.
                for k in tl.static_range(UNROLL):
                    ok = i + k < end
                    p = tl.load(order_ptr + i + k, mask=ok, other=0)
                    # cols < (d or 0): the column mask, empty past the end (one compare;
                    # the interpreter mishandles a vector mask & a scalar one)
                    x = tl.load(src_ptr + p * d + cols, mask=cols < tl.where(ok, d, 0),
                                other=-0.0)
                    acc = acc + x
            dst = out_ptr + tl.load(rows_ptr + s) * d + cols
            if ACCUMULATE:
                acc = tl.load(dst, mask=cmask, other=0.0) + acc
            tl.store(dst, acc, mask=cmask)


@dataclass(frozen=True)
class SegmentPlan:
    """Where the source rows of a scatter go, grouped by destination row (see the module
    docstring). All tensors int64 on the index's device.

    Exact plan (1-D index): order (N,), rows (S,), starts (S + 1,), count 0-d (= S).
    Padded plans (2-D index, T steps): order (T, N), rows (T, N), starts (T, N + 1),
    count (T,); per step, entries past `count` are padding (rows 0, starts N)."""

    order: torch.Tensor
    rows: torch.Tensor
    starts: torch.Tensor
    count: torch.Tensor
    n_rows: int  # the destination rows are in [0, n_rows)

    @property
    def steps(self) -> int | None:
        """T for a plan of several steps, None for a single plan."""
        return self.order.shape[0] if self.order.dim() == 2 else None

    def step(self, t: int) -> SegmentPlan:
        """Step t of a plan of several steps: a padded single plan (views, no copy)."""
        if self.steps is None:
            raise ValueError("step(t) needs a plan made from a 2-D (steps, N) index")
        return SegmentPlan(self.order[t], self.rows[t], self.starts[t], self.count[t],
                           self.n_rows)


def table_offsets(table_rows: Sequence[int]) -> list[int]:
    """First row of each table in the concatenated buffer, and the total row count last:
    table_offsets([U, I, I]) == [0, U, U + I, U + 2 I]."""
    out = [0]
    for r in table_rows:
        out.append(out[-1] + int(r))
    return out


def plan_segments(index: torch.Tensor, n_rows: int, check: bool = True) -> SegmentPlan:
    """The segments of `index` (N,) or (T, N): integer destination rows in [0, n_rows).

    A (T, N) index is planned per row (step) with one segmented sort and comes back
    padded to N segments per step, so every step's plan has the same shapes; a 1-D index
    gives an exact plan. Stable sorting keeps positions in increasing order within each
    segment, which fixes the order of the additions. `check=False` skips the range check
    (which reads the index back); with a (T, N) index nothing is then read back, so the
    planning can be captured in a CUDA graph."""
    if index.dim() not in (1, 2):
        raise ValueError(f"index must be (N,) or (T, N), got shape {tuple(index.shape)}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"index must hold integers, got {index.dtype}")
    idx = index.long()
    if check and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_rows):
        raise ValueError(f"index values must lie in [0, {n_rows}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    idx2 = idx if idx.dim() == 2 else idx[None]  # (T, N)
    t, n = idx2.shape
    dev = idx2.device
    key, order = torch.sort(idx2, dim=1, stable=True)  # (T, N) each
    new = torch.ones_like(key, dtype=torch.bool)  # (T, N): first position of a segment
    new[:, 1:] = key[:, 1:] != key[:, :-1]
    seg = torch.cumsum(new, dim=1) - 1  # (T, N): segment of each sorted position
    count = new.sum(dim=1)  # (T,)
    pos = torch.arange(n, device=dev).expand(t, n)
    # Scatter each segment's first position and row to column `seg`; every other position
    # goes to its own column past the kept ones, so no two writes share a destination
    # (deterministic, also under torch.use_deterministic_algorithms).
    rows = torch.zeros((t, 2 * n), dtype=torch.long, device=dev)
    rows.scatter_(1, torch.where(new, seg, n + pos), key)
    starts = torch.full((t, 2 * n + 1), n, dtype=torch.long, device=dev)
    starts.scatter_(1, torch.where(new, seg, n + 1 + pos), pos)
    rows, starts = rows[:, :n], starts[:, : n + 1]  # (T, N), (T, N + 1)
    if idx.dim() == 2:
        return SegmentPlan(order, rows.contiguous(), starts.contiguous(), count, n_rows)
    s = int(count[0])
    return SegmentPlan(order[0], rows[0, :s].contiguous(), starts[0, : s + 1].contiguous(),
                       count[0], n_rows)


def _check(out: torch.Tensor, src: torch.Tensor, plan: SegmentPlan,
           step: torch.Tensor | None = None) -> None:
    """ValueError with one sentence for arguments the scatter cannot take."""
    if plan.steps is not None and step is None:
        raise ValueError("scatter a plan of several steps one step at a time: plan.step(t), "
                         "or pass step=, a one-element device tensor naming the step")
    if step is not None and (plan.steps is None or step.numel() != 1
                             or step.dtype.is_floating_point or step.device != out.device):
        raise ValueError("step= takes a one-element integer tensor on out's device, with a "
                         "plan of several steps")
    if out.dim() != 2 or src.dim() != 2 or out.shape[1] != src.shape[1]:
        raise ValueError(f"out must be (R, d) and src (N, d), got {tuple(out.shape)} and "
                         f"{tuple(src.shape)}")
    if src.shape[0] != plan.order.shape[-1]:
        raise ValueError(f"src has {src.shape[0]} rows, the plan {plan.order.shape[-1]}")
    if plan.n_rows > out.shape[0]:
        raise ValueError(f"the plan targets rows < {plan.n_rows}, out has {out.shape[0]}")
    for name, t in (("out", out), ("src", src)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    devices = {t.device for t in (out, src, plan.order, plan.rows, plan.starts, plan.count)}
    if len(devices) != 1:
        raise ValueError(f"out, src and the plan must be on one device, got "
                         f"{sorted(map(str, devices))}")


def scatter_rows_triton_(out: torch.Tensor, src: torch.Tensor, plan: SegmentPlan,
                         accumulate: bool = True, step: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """out[rows[s]] (+)= the ordered sum of src[order[starts[s]:starts[s + 1]]], for every
    segment s, in one launch (CUDA tensors, or CPU ones under TRITON_INTERPRET=1).

    out: (R, d) float32, src: (N, d) float32. Rows that no segment names are untouched,
    whether or not `accumulate`. With a plan of several steps, `step` (a one-element
    device tensor, read by the kernel, so a CUDA graph can replay it) names the step.
    Returns out."""
    _check(out, src, plan, step)
    if triton is None:
        raise RuntimeError("scatter_rows_triton_ needs the triton package")
    if out.device.type != "cuda" and not interpreted():
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                         "it on CPU in Triton's interpreter)")
    n_seg, d = plan.rows.shape[-1], out.shape[1]  # S, or N for a padded plan
    if n_seg == 0 or d == 0:
        return out
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(d))
    grid = (n_seg, triton.cdiv(d, block_d))
    stepped = step is not None
    _scatter_rows[grid](out, src, plan.order, plan.rows, plan.starts, plan.count,
                        step.reshape(1) if stepped else plan.count, plan.order.shape[-1], d,
                        ACCUMULATE=accumulate, STEPPED=stepped, UNROLL=UNROLL,
                        BLOCK_D=block_d, num_warps=max(1, block_d // 128))
    return out


def scatter_rows_torch_(out: torch.Tensor, src: torch.Tensor, plan: SegmentPlan,
                        accumulate: bool = True, step: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """`scatter_rows_triton_` in torch ops, on any device: the same additions in the same
    order, so the same bits. Rank k of every segment at once, longest segments first, so
    it takes (longest segment) rounds of a gather and an add; one host synchronisation
    (two with `step`, which is read back)."""
    _check(out, src, plan, step)
    if step is not None:
        plan = plan.step(int(step))
    s, d = int(plan.count), out.shape[1]
    if s == 0 or d == 0:
        return out
    starts, rows = plan.starts[: s + 1], plan.rows[:s]
    lengths = starts[1:] - starts[:-1]  # (S,)
    by_len = torch.argsort(lengths, descending=True, stable=True)
    first = starts[:-1][by_len]  # (S,) first slot in `order` of each segment, longest first
    # active[k]: how many segments have more than k rows (a prefix of the sorted ones)
    active = (s - torch.cumsum(torch.bincount(lengths), 0)).tolist()
    acc = torch.full((s, d), -0.0, dtype=out.dtype, device=out.device)  # (S, d)
    for k, m in enumerate(active):
        if m == 0:
            break
        acc[:m] += src.index_select(0, plan.order.index_select(0, first[:m] + k))
    rows = rows[by_len]  # distinct, so index_copy_ writes each row once
    if accumulate:
        acc = out.index_select(0, rows) + acc
    out.index_copy_(0, rows, acc)
    return out


def scatter_rows_(out: torch.Tensor, src: torch.Tensor, plan: SegmentPlan,
                  accumulate: bool = True, backend: str = "auto",
                  step: torch.Tensor | None = None) -> torch.Tensor:
    """Sum the rows of src (N, d) into out (R, d) by `plan`, or by step `step` of a plan
    of several steps (see `scatter_rows_triton_`).

    backend "auto": the Triton kernel on CUDA tensors or under TRITON_INTERPRET=1 when
    Triton imports, the torch fallback otherwise; both give the same bits."""
    if small_kernel_backend(backend, out.device, BACKENDS, triton is not None) == "triton":
        return scatter_rows_triton_(out, src, plan, accumulate, step)
    return scatter_rows_torch_(out, src, plan, accumulate, step)


def resource_specs(dim: int = 100) -> list[KernelSpec]:
    """The kernel as `scatter_rows_triton_` launches it for rows of `dim` floats, with a
    single plan and with a step of an epoch's plan (for the offline report,
    benchmarks/kernel_resources.py)."""
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(dim))
    return [KernelSpec("scatter_rows", (block_d, stepped), _scatter_rows,
                       {"ACCUMULATE": True, "STEPPED": stepped, "UNROLL": UNROLL,
                        "BLOCK_D": block_d},
                       num_warps=max(1, block_d // 128),
                       types={f"{n}_ptr": "*i64" for n in ("order", "rows", "starts",
                                                           "count", "step")})
            for stepped in (False, True)]


__all__ = ["BACKENDS", "SegmentPlan", "plan_segments", "resource_specs", "scatter_rows_",
           "scatter_rows_torch_", "scatter_rows_triton_", "table_offsets"]
