"""What the training run needs from the machine: the device, CPU threads, memory."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import torch

from fastattrec.config import TrainConfig
from fastattrec.errors import UserError, shown


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a user error."""
    if not isinstance(name, str):
        raise UserError(f"--device must be cpu, cuda or auto, got {shown(name)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU here "
                        "(is this a CPU-only torch build?); use --device cpu.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"--device must be cpu, cuda or auto, got {shown(name)}.")
    return torch.device(name)


def check_memory(cfg: TrainConfig, meta: dict, device: torch.device,
                 extra: dict[str, int] | None = None) -> None:
    """Refuse options whose arrays cannot fit, with an estimate, before allocating them
    (an impossible --maxlen would otherwise be killed by the system, unexplained).
    `extra`: more named byte counts (what an experimental step allocates)."""
    c = meta["counts"]
    n, t = int(c["interactions"]), int(c.get("train_samples", c["interactions"]))
    rows = int(c["users"]) + 1 + 2 * int(c["item_rows"])
    parts = {
        "the training windows (train samples x --maxlen)": 12 * t * cfg.maxlen,
        "the embedding tables with their gradients and Adam moments": 16 * rows * cfg.dim,
        "one batch's activations (--batch-size x --maxlen x --dim)":
            40 * cfg.batch_size * cfg.maxlen * cfg.dim,
        "the prepared sequences": 48 * n,
        "validation windows": 4 * min(65536, n) * cfg.maxlen * cfg.dim * 4,
    }
    parts.update(extra or {})
    need = sum(parts.values())
    have = available_memory(device)
    if have is not None and need > 0.9 * have:
        worst = max(parts, key=parts.get)
        raise UserError(f"these options need about {need / 2**30:,.1f} GiB of {device.type} "
                        f"memory, mostly for {worst}, but about {have / 2**30:,.1f} GiB is "
                        f"available; lower --maxlen (now {cfg.maxlen}), --batch-size "
                        f"(now {cfg.batch_size}) or --dim (now {cfg.dim}).")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process on `device` (None when it cannot be told)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 32 MiB for reuse instead of unmapping them.

    A CPU training step allocates a few dozen megabyte-sized temporaries; by default
    glibc returns each to the kernel and the next step page-faults it in again, which
    showed up as a third of the step's time in system calls. Returns False where this is
    not glibc (nothing is changed there)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
        return ok and libc.mallopt(m_trim_threshold, 256 << 20) == 1
    except (OSError, AttributeError):
        return False


def set_threads(n: int, log: Callable[[str], None] | None = None) -> int:
    """Use `n` CPU threads for torch; 0 picks `free_cores()`. Returns the number used.
    More threads than cores is slower (every parallel region waits for the threads that
    have no core), so asking for that is said once, through `log` (else a warning)."""
    cores = usable_cores()
    if n > cores:
        msg = (f"note: --threads {n} is more than the {cores} cores this process may use; "
               f"that is slower than {cores} threads (each parallel step waits for threads "
               f"without a core); give --threads {cores} or fewer, or 0 to choose.")
        if log is not None:
            log(msg)
        else:
            warnings.warn(msg, stacklevel=2)
    n = n or free_cores()
    torch.set_num_threads(n)
    return n


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), busy or not."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_cores() -> int:
    """Cores this process may use that are not busy with other work right now.

    On a shared machine a thread pool as wide as the machine loses badly when another
    process holds a core: every parallel region waits for the thread that is not
    scheduled (measured on 2 cores beside one busy process: 2 threads 3-5x slower than
    idle, 1 thread about 1.5x). The count of other runnable threads is read from
    /proc/loadavg (the minimum of a few samples, so a passing blip does not count)."""
    cores = usable_cores()
    samples = []
    for _ in range(5):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return cores
        samples.append(max(0, running - 1))  # minus the thread reading it
        time.sleep(0.01)
    return max(1, cores - min(samples))
