"""Every table row a training step looks up, gathered by one launch.

Why: an AttRec step reads the user table at the batch's users, the item table at the
window items and at the (positive, negative) candidates, and the item2 table at the
candidates again: four lookups, a concatenation, and before them the index arithmetic
that picks the batch out of the epoch (a slice of the permutation, then one gather per
per-sample array). On a GPU each of those is a launch of a few microseconds that does
almost no work.

Here the rows of all the tables are numbered in one flat space, as in
`embedding_scatter.py` (table k's row r is row offsets[k] + r; `table_offsets`), the
epoch's lookups are written once, at the epoch's start, as a (T, N) index (T steps, N
lookups each), and one Triton program per block of lookups reads its step from the
device counter, its destination rows from the index and copies the rows: the gather is
the forward twin of the scatter, and both read the same index. No Python runs between
steps, so the step can be captured in a CUDA graph.

The copy is exact (values and the sign of zero), so the result equals the torch
lookups bit for bit (`gather_rows_torch`, tests/test_embedding_gather.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..launch import KernelSpec, interpreted, small_kernel_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: only the torch path exists
    triton = None

BACKENDS = ("auto", "triton", "torch")
MAX_TABLES = 3
BLOCK_N = 8  # lookups per program
MAX_BLOCK_D = 128


if triton is not None:

    @triton.jit
    def gather_block(block, out_ptr, index_ptr, step_ptr, t0_ptr, t1_ptr, t2_ptr,
                     flags_ptr, off1, off2, flag_row, n, d, FLAGS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Lookups [block BLOCK_N, (block + 1) BLOCK_N) of the step, all columns (also
        called by the training step's prologue kernel, `step_prologue.py`)."""
        r = block * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = r < n
        base = tl.load(step_ptr).to(tl.int64) * n  # row `step` of a (T, N) index
        idx = tl.load(index_ptr + base + r, mask=ok, other=0).to(tl.int64)  # flat rows
        if FLAGS:  # which lookups name another row than flag_row (the padding item's)
            tl.store(flags_ptr + r, (idx != flag_row).to(tl.uint8), mask=ok)
        # each lookup's row pointer in the table it falls in: one load per element
        src = tl.where(idx < off1, t0_ptr + idx * d,
                       tl.where(idx < off2, t1_ptr + (idx - off1) * d,
                                t2_ptr + (idx - off2) * d))  # (BLOCK_N,) pointers
        dst = out_ptr + r.to(tl.int64) * d
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            m = ok[:, None] & (cols < d)[None, :]
            v = tl.load(src[:, None] + cols[None, :], mask=m)  # an exact copy
            tl.store(dst[:, None] + cols[None, :], v, mask=m)

    @triton.jit
    def _gather_rows(out_ptr, index_ptr, step_ptr, t0_ptr, t1_ptr, t2_ptr, flags_ptr, off1,
                     off2, flag_row, n, d, FLAGS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        gather_block(tl.program_id(0), out_ptr, index_ptr, step_ptr, t0_ptr, t1_ptr,
                     t2_ptr, flags_ptr, off1, off2, flag_row, n, d, FLAGS, BLOCK_N, BLOCK_D)


def _step_index(index: torch.Tensor, step: torch.Tensor | None) -> torch.Tensor:
    """The (N,) index of one step: `index` itself (1-D), or row `step` of a (T, N) one,
    selected on the device (no read back)."""
    if index.dim() == 1:
        return index
    return index.index_select(0, step.reshape(1).long())[0]


def check_gather_args(out: torch.Tensor, tables: Sequence[torch.Tensor],
                      index: torch.Tensor, step: torch.Tensor | None,
                      flags: torch.Tensor | None = None) -> None:
    """ValueError with one sentence for arguments the gather cannot take (also checked by
    the training step's prologue, `step_prologue.py`)."""
    if flags is not None and (flags.shape != (index.shape[-1],) or flags.dtype not in (
            torch.bool, torch.uint8) or flags.device != index.device):
        raise ValueError(f"flags must be a bool or uint8 ({index.shape[-1]},) tensor on the "
                         f"index's device, got {tuple(flags.shape)} {flags.dtype}")
    if not 1 <= len(tables) <= MAX_TABLES:
        raise ValueError(f"give 1 to {MAX_TABLES} tables, got {len(tables)}")
    d = tables[0].shape[-1]
    for t in tables:
        if t.dim() != 2 or t.shape[1] != d or t.dtype != out.dtype or not t.is_contiguous():
            raise ValueError(f"tables must be contiguous (rows, {d}) {out.dtype} tensors, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if index.dim() not in (1, 2) or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"index must be an int32/int64 (N,) or (T, N) tensor, got "
                         f"{tuple(index.shape)} {index.dtype}")
    if index.dim() == 2 and (step is None or step.numel() != 1):
        raise ValueError("a (T, N) index needs `step`, a one-element tensor naming the row")
    if step is not None and (step.dtype.is_floating_point or step.device != index.device):
        raise ValueError("step must be an integer tensor on the index's device")
    n = index.shape[-1]
    if out.shape != (n, d) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({n}, {d}) tensor, got {tuple(out.shape)}")
    if not index.is_contiguous():
        raise ValueError("index must be contiguous (call .contiguous() first)")


def gather_rows_torch(out: torch.Tensor, tables: Sequence[torch.Tensor],
                      index: torch.Tensor, step: torch.Tensor | None = None,
                      flags: torch.Tensor | None = None, flag_row: int = 0) -> torch.Tensor:
    """`gather_rows_triton` in torch ops, on any device: out[i] = the flat row index[i]."""
    check_gather_args(out, tables, index, step, flags)
    idx = _step_index(index, step).long()  # (N,)
    if flags is not None:
        flags.copy_(idx != flag_row)
    offsets = [0]
    for t in tables:
        offsets.append(offsets[-1] + t.shape[0])
    rows = out.new_zeros(out.shape)
    for k, t in enumerate(tables):  # each lookup takes the row of the table it falls in
        inside = (idx >= offsets[k]) & (idx < offsets[k + 1])
        local = (idx - offsets[k]).clamp(0, max(t.shape[0] - 1, 0))
        if t.shape[0]:
            rows = torch.where(inside[:, None], t.index_select(0, local), rows)
    return out.copy_(rows)


def gather_rows_triton(out: torch.Tensor, tables: Sequence[torch.Tensor],
                       index: torch.Tensor, step: torch.Tensor | None = None,
                       flags: torch.Tensor | None = None, flag_row: int = 0) -> torch.Tensor:
    """out (N, d)[i] = row index[i] of the tables' flat row space (table k's row r is
    row offsets[k] + r), in one launch; with a (T, N) index, of row `step` (a device
    tensor read by the kernel). With `flags` (N,) bool/uint8, also flags[i] =
    (index[i] != flag_row): a training step's key mask comes out of the same launch.
    CUDA tensors, or CPU ones under TRITON_INTERPRET=1. Indices outside the flat space
    read the last table (callers keep them in range)."""
    check_gather_args(out, tables, index, step, flags)
    if triton is None:
        raise RuntimeError("gather_rows_triton needs the triton package")
    if out.device.type != "cuda" and not interpreted():
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                         "it on CPU in Triton's interpreter)")
    n, d = out.shape
    if n == 0 or d == 0:
        return out
    args, meta = launch_args(out, tables, index, step, flags, flag_row)
    _gather_rows[(programs(n),)](*args, **meta, num_warps=4)
    return out


def programs(n: int) -> int:
    """Programs of a gather of n lookups."""
    return triton.cdiv(n, BLOCK_N)


def launch_args(out: torch.Tensor, tables: Sequence[torch.Tensor], index: torch.Tensor,
                step: torch.Tensor | None, flags: torch.Tensor | None,
                flag_row: int) -> tuple[list, dict]:
    """The kernel's arguments (in order) and compile-time arguments for checked inputs."""
    n, d = out.shape
    t = list(tables) + [tables[-1]] * (MAX_TABLES - len(tables))
    big = 2**62  # tables that are not there start past every index
    off1 = tables[0].shape[0] if len(tables) > 1 else big
    off2 = off1 + tables[1].shape[0] if len(tables) > 2 else big
    if index.dim() == 1:  # one step: row 0
        step = torch.zeros(1, dtype=torch.long, device=index.device)
    f = flags.view(torch.uint8) if flags is not None and flags.dtype == torch.bool else flags
    args = [out, index, step.reshape(1), t[0], t[1], t[2], out if f is None else f, off1,
            off2, flag_row, n, d]
    return args, {"FLAGS": f is not None, "BLOCK_N": BLOCK_N,
                  "BLOCK_D": min(MAX_BLOCK_D, triton.next_power_of_2(d))}


def gather_rows_(out: torch.Tensor, tables: Sequence[torch.Tensor], index: torch.Tensor,
                 step: torch.Tensor | None = None, backend: str = "auto",
                 flags: torch.Tensor | None = None, flag_row: int = 0) -> torch.Tensor:
    """Fill out (N, d) with the flat rows `index` names (see `gather_rows_triton`).

    backend "auto": the Triton kernel on CUDA tensors or under TRITON_INTERPRET=1 when
    Triton imports, the torch form otherwise; both give the same bits."""
    if small_kernel_backend(backend, out.device, BACKENDS, triton is not None) == "triton":
        return gather_rows_triton(out, tables, index, step, flags, flag_row)
    return gather_rows_torch(out, tables, index, step, flags, flag_row)


def resource_specs(dim: int = 100) -> list[KernelSpec]:
    """The kernel as a training step launches it (an int64 (T, N) index, the key mask
    as flags), for the offline report (benchmarks/kernel_resources.py)."""
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(dim))
    return [KernelSpec("gather_rows", (block_d,), _gather_rows,
                       {"FLAGS": True, "BLOCK_N": BLOCK_N, "BLOCK_D": block_d},
                       num_warps=4, types={"index_ptr": "*i64", "step_ptr": "*i64",
                                           "flags_ptr": "*u8", "flag_row": "i64"})]


__all__ = ["BACKENDS", "BLOCK_N", "MAX_BLOCK_D", "check_gather_args", "gather_block",
           "gather_rows_", "gather_rows_torch", "gather_rows_triton", "launch_args", "programs",
           "resource_specs"]
