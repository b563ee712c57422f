"""A training step's inputs in one launch: its table rows, its key mask and P W.

The fused training step (`fastattrec/training.py`, `EpochRunner._fused_step`) starts with
two independent pieces of work: gathering the batch's table rows (and flagging the window
slots that hold the padding item: the key mask), and the attention's position term P W.
Neither is worth a launch of its own, so one grid does both: its first programs run the
gather's blocks (`embedding_gather.gather_block`), the last ones P W's
(`position_terms.projection_block`). Same code, same bits as the two separate kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .. import position_terms as pt
from ..launch import KernelSpec
from . import embedding_gather as eg


@triton.jit
def _step_prologue(out_ptr, index_ptr, step_ptr, t0_ptr, t1_ptr, t2_ptr, flags_ptr, off1,
                   off2, flag_row, n, d, pos_ptr, w_ptr, pw_ptr, gather_programs,
                   FLAGS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   D: tl.constexpr, PW_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if pid < gather_programs:
        eg.gather_block(pid, out_ptr, index_ptr, step_ptr, t0_ptr, t1_ptr, t2_ptr,
                        flags_ptr, off1, off2, flag_row, n, d, FLAGS, BLOCK_N, BLOCK_D)
    else:  # P W, one program per (position, block of columns)
        k = pid - gather_programs
        per_row = tl.cdiv(D, PW_BLOCK)
        pt.projection_block(k // per_row, k % per_row, pos_ptr, w_ptr, pw_ptr, D, PW_BLOCK)


def step_prologue_(out: torch.Tensor, tables: Sequence[torch.Tensor], index: torch.Tensor,
                   step: torch.Tensor, flags: torch.Tensor, flag_row: int,
                   pos: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`gather_rows_(out, tables, index, step, flags=flags, flag_row=flag_row)` and
    P W (L, d) of pos (L, d) and w (d, d), in one launch; returns P W."""
    eg.check_gather_args(out, tables, index, step, flags)
    length, dim = pos.shape
    if w.shape != (dim, dim) or out.shape[1] != dim:
        raise ValueError(f"pos (L, d), w (d, d) and the rows must share d, got "
                         f"{tuple(pos.shape)}, {tuple(w.shape)}, {tuple(out.shape)}")
    pw = torch.empty((length, dim), dtype=torch.float32, device=pos.device)
    args, meta = eg.launch_args(out, tables, index, step, flags, flag_row)
    gather = eg.programs(out.shape[0])
    grid = gather + length * triton.cdiv(dim, pt.BLOCK_N)
    _step_prologue[(grid,)](*args, pos, w, pw, gather, **meta, D=dim, PW_BLOCK=pt.BLOCK_N,
                            num_warps=4)
    return pw


def resource_specs(dim: int) -> list[KernelSpec]:
    """The kernel as the training step launches it (for benchmarks/kernel_resources.py)."""
    block_d = min(eg.MAX_BLOCK_D, triton.next_power_of_2(dim))
    return [KernelSpec("step_prologue", (block_d,), _step_prologue,
                       {"FLAGS": True, "BLOCK_N": eg.BLOCK_N, "BLOCK_D": block_d, "D": dim,
                        "PW_BLOCK": pt.BLOCK_N}, num_warps=4,
                       types={"index_ptr": "*i64", "step_ptr": "*i64", "flags_ptr": "*u8",
                              "flag_row": "i64"})]


__all__ = ["resource_specs", "step_prologue_"]
