"""What a run trains with: the model initialised from the seed, Adam, the random
generators and the training step, from the run's options; and for `--kernel auto` on
CUDA, the kernel chosen by timing both inside that step (kernel_choice.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastattrec.batches import DeviceData
from fastattrec.config import AttRecConfig, TrainConfig
from fastattrec.errors import UserError
from fastattrec.kernels import resolve_backend, triton_available
from fastattrec.model import AttRec
from fastattrec.optim import KerasAdam, make_optimizer
from fastattrec.training.cpu_step import CpuStep
from fastattrec.training.kernel_choice import choose_kernel, time_step
from fastattrec.training.step import AutogradStep, CudaGraphStep, Samples, Step


@dataclass
class Built:
    """A run's model, optimiser, random generators and training step."""

    model: AttRec
    mcfg: AttRecConfig
    opt: KerasAdam
    gens: dict[str, torch.Generator]
    step: Step


def build(cfg: TrainConfig, data: DeviceData, device: torch.device, kernel: str,
          distributed: Any = None) -> Built:
    """The model (initialised from the seed), Adam, the generators and the step: on the
    CPU with the structured attention and the notebook's loss the hand-written step, on
    CUDA with --compile the CUDA-graph step (captured here; not with dropout, whose masks
    come from the run's own generator), else autograd; the experimental steps on request."""
    use_graph = (cfg.compile and device.type == "cuda" and distributed is None
                 and cfg.dropout == 0.0)
    mcfg = AttRecConfig.of_run(cfg, data.n_users, data.n_items, kernel)
    model = AttRec(mcfg, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    model.set_item_rows(data.item_valid)
    if cfg.compile and device.type == "cuda":
        model.compile_loss()
    gens = {"shuffle": torch.Generator(device=device).manual_seed(cfg.seed + 1),
            "negatives": torch.Generator(device=device).manual_seed(cfg.seed + 2)}
    if cfg.dropout > 0:  # (only then: older checkpoints hold the two above)
        gens["dropout"] = torch.Generator(device=device).manual_seed((cfg.seed + 3) % 2**63)
        model.dropout_generator = gens["dropout"]
        # every rank draws the same seeds and masks its own rows of the global batch
        model.dropout_shard = distributed.rank if distributed else 0
    shard = (distributed.rank, distributed.world) if distributed else (0, 1)
    samples = Samples(data, cfg.maxlen, cfg.batch_size, shard, cfg.n_negatives,
                      shared=cfg.negatives == "shared")
    if cfg.experimental():
        from fastattrec.experimental.steps import build_experimental

        opt, step = build_experimental(cfg, model, samples, device, use_graph, distributed)
        return Built(model, mcfg, opt, gens, step)
    opt = make_optimizer(model, cfg, device, capturable=use_graph)
    if (device.type == "cpu" and distributed is None and kernel == "structured"
            and cfg.hand_written_step()):
        return Built(model, mcfg, opt, gens, CpuStep(model, opt, samples, compile=cfg.compile))
    step = AutogradStep(model, opt, samples, distributed.wrap(model) if distributed else None)
    if use_graph:
        step = CudaGraphStep(step)
        step.capture()
    return Built(model, mcfg, opt, gens, step)


def experimental_bytes(cfg: TrainConfig, meta: dict, distributed: Any) -> dict[str, int]:
    """What a run's experimental step allocates besides the default's arrays (for the
    memory check), by name."""
    if not cfg.experimental():
        return {}
    from fastattrec.experimental.steps import extra_bytes

    return extra_bytes(cfg, meta, distributed)


def build_choosing(cfg: TrainConfig, data: DeviceData, device: torch.device,
                   saved: dict, distributed: Any, log: Callable[[str], None]
                   ) -> tuple[Built, str, dict | None]:
    """`build` with the kernel --kernel names; for `auto` on CUDA, the faster of the Triton
    kernel and the reference inside this run's step on this GPU (kernel_choice.py), or
    the choice a resumed run recorded. Returns (built, kernel, the choice's record)."""
    recorded = saved.get("kernel_choice")
    if cfg.kernel != "auto" or device.type != "cuda" or not triton_available():
        kernel = resolve_kernel(cfg.kernel, device)
        return build(cfg, data, device, kernel, distributed), kernel, None
    if recorded:
        kernel = recorded["chosen"]
        return build(cfg, data, device, kernel, distributed), kernel, recorded

    def measure(kernel: str) -> float:
        b = build(cfg, data, device, kernel, distributed)
        samples = b.step.samples
        samples.shuffle(torch.Generator(device).manual_seed(0))  # realistic batches
        b.step.start_epoch()
        return time_step(lambda i: b.step(i % samples.n_steps), device)

    combine = None
    if distributed is not None:
        def combine(sec: dict[str, float]) -> dict[str, float]:
            keys = sorted(sec)
            t = distributed.all_sum(torch.tensor([sec[k] for k in keys], device=device))
            return dict(zip(keys, t.tolist(), strict=True))
    kernel, record = choose_kernel(["triton", "torch"], measure, combine)
    log("--kernel auto: " + ", ".join(f"{k} {s * 1e3:.3f} ms/step" for k, s in
                                      record["seconds_per_step"].items()) + f"; using {kernel}")
    # built again from the seed: the run is exactly the run of --kernel <choice>
    return build(cfg, data, device, kernel, distributed), kernel, record


def resolve_kernel(kernel: str, device: torch.device) -> str:
    try:
        return resolve_backend(kernel, device)
    except RuntimeError as e:
        raise UserError(f"--kernel {kernel}: {e}.") from None
