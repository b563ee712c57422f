"""What every launcher shares: argument checks, buffers and the choice of configuration.

Each kernel layout (`attention_tiles.py`, `attention.py`'s blocks and long windows,
`experimental/attention_split.py`) offers a few candidate configurations per (L, d); on CUDA each is
timed once with `triton.testing.do_bench` and the fastest kept (`pick`); under
TRITON_INTERPRET=1 a fixed one is used, since the interpreter's time says nothing.
`benchmarks/kernel_resources.py` compiles every candidate offline and the test suite fails
when one of them spills, so the tuner only ever chooses between spill-free kernels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_chosen: dict[tuple, tuple] = {}
_autotune = [True]


def interpreted() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def small_kernel_backend(backend: str, device: torch.device, choices: Sequence[str],
                         have_triton: bool) -> str:
    """"triton" or "torch" for a kernel offered in both forms (the embedding gather and
    scatter): `backend` itself, or for "auto" the Triton kernel on CUDA tensors or under
    TRITON_INTERPRET=1 when Triton imports, the torch form otherwise."""
    if backend not in choices:
        raise ValueError(f"backend must be one of {tuple(choices)}, got {backend!r}")
    if backend == "auto":
        return "triton" if have_triton and (device.type == "cuda" or interpreted()) else "torch"
    return backend


def set_autotune(enabled: bool) -> None:
    """Turn the timing of candidate configurations on or off (off: the first candidate).

    Tests switch it off so that each shape compiles one configuration, not several."""
    _autotune[0] = bool(enabled)


def chosen_configs() -> dict[tuple, tuple]:
    """The configurations picked so far, keyed by (kind, L, d, precision, B >= 16384,
    interpreted), for benchmark reports."""
    return dict(_chosen)


def pick(kind: str, length: int, dim: int, precision: str, b: int,
         run: Callable[[tuple], None], cands: Sequence[tuple],
         interp_choice: Callable[[Sequence[tuple]], tuple] | None = None) -> tuple:
    """The fastest of `cands` for this (kind, L, d, precision, size class), timed once.

    `run(cfg)` launches the kernel with configuration `cfg`. Under the interpreter the
    candidate `interp_choice(cands)` (default: the first) is used without timing.
    """
    key = (kind, length, dim, precision, b >= 16384, interpreted())
    if key in _chosen:
        return _chosen[key]
    if interpreted():
        best = interp_choice(cands) if interp_choice else cands[0]
    elif len(cands) == 1 or not _autotune[0]:
        best = cands[0]
    else:
        from triton.testing import do_bench

        times = []
        for c in cands:
            try:
                times.append((do_bench(lambda c=c: run(c), warmup=5, rep=20), c))
            except Exception:  # a candidate that does not fit this GPU (resources)
                continue
        if not times:
            raise RuntimeError(f"no Triton configuration compiled for {kind} L={length}, "
                               f"d={dim}")
        best = min(times)[1]
    _chosen[key] = best
    return best


def force_config(kind: str, length: int, dim: int, precision: str, b: int, cfg: tuple) -> None:
    """Make `pick` return `cfg` for this key (tests run every candidate this way)."""
    _chosen[(kind, length, dim, precision, b >= 16384, interpreted())] = cfg


def forget_configs(keep: dict[tuple, tuple] | None = None) -> None:
    """Drop every choice made so far, or put back exactly the choices `keep` (a
    `chosen_configs()` result)."""
    _chosen.clear()
    _chosen.update(keep or {})


@functools.cache
def sm_count(index: int) -> int:
    """Multiprocessors of CUDA device `index` (persistent grids size themselves by it)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def check_inputs(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                 pos: torch.Tensor) -> None:
    """ValueError with one sentence for any argument the kernels cannot take."""
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, d), got shape {tuple(x.shape)}")
    b, length, dim = x.shape
    if mask.shape != (b, length):
        raise ValueError(f"mask must be (B, L) = {(b, length)}, got {tuple(mask.shape)}")
    if w.shape != (dim, dim):
        raise ValueError(f"w must be (d, d) = {(dim, dim)}, got {tuple(w.shape)}")
    if pos.shape != (length, dim):
        raise ValueError(f"pos must be (L, d) = {(length, dim)}, got {tuple(pos.shape)}")
    for name, t in (("x", x), ("w", w), ("pos", pos)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    if mask.dtype not in (torch.bool, torch.uint8, torch.int8):
        raise ValueError(f"mask must be bool or uint8, got {mask.dtype}")
    if not mask.is_contiguous():
        raise ValueError("mask must be contiguous (call .contiguous() first)")
    devices = {t.device for t in (x, mask, w, pos)}
    if len(devices) != 1:
        names = sorted(map(str, devices))
        raise ValueError(f"x, mask, w and pos must be on one device, got {names}")
    if x.device.type != "cuda" and not interpreted():
        raise ValueError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 to run "
                         "it on CPU in Triton's interpreter)")


def mask_bytes(mask: torch.Tensor) -> torch.Tensor:
    """The key mask as one byte per slot, without a copy."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def checked_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The upstream gradient (B, d), contiguous, or ValueError."""
    b, _, dim = x.shape
    grad = grad.contiguous()
    if grad.shape != (b, dim) or grad.dtype != torch.float32:
        raise ValueError(f"grad must be float32 (B, d) = {(b, dim)}, got {tuple(grad.shape)}")
    return grad


@dataclass(frozen=True)
class KernelSpec:
    """One kernel at one configuration, as a launcher would compile it: what the offline
    resource report (`benchmarks/kernel_resources.py`) compiles for sm_90a."""

    kind: str  # the tuner's name for the kernel, e.g. "tile_fwd"
    config: tuple  # the candidate, as `pick` names it; () for a single configuration
    fn: Any  # the @triton.jit function
    constexprs: dict = field(default_factory=dict)  # compile-time arguments
    num_warps: int = 4
    num_stages: int = 1
    types: dict = field(default_factory=dict)  # argument -> Triton type, where not the rule

    def signature(self) -> dict[str, str]:
        """Triton's type string per argument: `types` first, then pointers named *_ptr
        (the mask as bytes), `scale` a float32, other run-time arguments int32, the rest
        compile-time."""
        sig = {}
        for name in self.fn.arg_names:
            if name in self.types:
                sig[name] = self.types[name]
            elif name in self.constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = "*u8" if name == "mask_ptr" else "*fp32"
            else:
                sig[name] = "fp32" if name == "scale" else "i32"
        return sig


__all__ = ["KernelSpec", "check_inputs", "checked_grad", "chosen_configs", "force_config",
           "forget_configs", "interpreted", "mask_bytes", "pick", "set_autotune", "sm_count",
           "small_kernel_backend"]
