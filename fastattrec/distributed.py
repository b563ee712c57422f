"""Training on several processes (GPUs or hosts) with torch.distributed.

Launch with torchrun; fastattrec notices the environment it sets:

    torchrun --nproc_per_node 2 -m fastattrec train DATA_DIR -o RUN_DIR

Every process holds the whole (small) prepared dataset and a replica of the model. Each
global batch of --batch-size samples is split into equal shards, one per process, taken
from the same seeded permutation; DistributedDataParallel averages the gradients. Each
process's loss is its shard's share of the global batch's loss times the number of
processes, so the average is exactly the single-process gradient of the same global batch.
Rank 0 writes logs and checkpoints; evaluation is sharded by user and gathered.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Distributed:
    """This process's place in the group and the collectives training needs."""

    rank: int
    world: int
    device: torch.device

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[lo, hi) of the contiguous block of n items that process `rank` takes."""
        r = self.rank if rank is None else rank
        return n * r // self.world, n * (r + 1) // self.world

    def shard(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's part of `rows` (contiguous blocks, in order)."""
        lo, hi = self.bounds(rows.shape[0])
        return rows[lo:hi]

    def gather(self, t: torch.Tensor, total: int,
               sizes: list[int] | None = None) -> torch.Tensor:
        """Concatenate every process's `shard` result, in rank order (`sizes`: each
        process's length, when they are not `bounds(total)`'s)."""
        if sizes is None:
            sizes = [hi - lo for lo, hi in (self.bounds(total, r) for r in range(self.world))]
        width = max(sizes)
        padded = torch.zeros((width, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


def from_environment(device: str) -> Distributed | None:
    """Join the process group that torchrun describes (None when not launched by it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Distributed(rank, world, dev)


def shutdown(finished: bool = False) -> None:
    """Leave the process group. After a run every process `finished`, first wait for all
    of them, so that none tears its connections down while another still talks to it."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
