"""Adam with the notebook's epsilon placement (docs/spec.md §3.1).

The notebook trains with Keras's Adam, whose update is

    p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)

with eps added to the raw sqrt(v). PyTorch's Adam adds eps to the bias-corrected
sqrt(v / (1 - b2^t)) instead. The two differ only in the first few thousand steps, and
most for rows whose gradient is tiny (table rows that only the L2 term touches), but
they differ, so fastattrec uses the Keras rule. They agree exactly when PyTorch's eps is
eps / sqrt(1 - b2^t), so:

- the eager path (CPU, and CUDA without graphs) sets that eps before every step and runs
  PyTorch's fused Adam: one multi-tensor kernel, nothing extra per step;
- the capturable path (a CUDA graph, where no Python runs between replays) does the same
  arithmetic with device tensors and foreach kernels, the step count on the device.

tests/test_optim.py checks both forms against the rule written out in float64. A Triton
form of the capturable step lives apart, in `fastattrec.experimental.adam`.

Both keep PyTorch's state layout (`step`, `exp_avg`, `exp_avg_sq`), so checkpoints move
between them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from fastattrec.config import TrainConfig


class KerasAdam(torch.optim.Adam):
    """torch.optim.Adam with eps added to sqrt(v) before bias correction (Keras's rule).

    `weight_decay` is L2 added to the gradient, as in torch.optim.Adam (not AdamW).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-7,
                 weight_decay: float = 0.0, capturable: bool = False,
                 fused: bool | None = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         capturable=capturable, fused=None if capturable else fused,
                         foreach=False if not capturable else None)
        self.keras_eps = eps
        self._t: int | None = None  # steps taken so far (eager path), read once from state
        self._moments: list | None = None  # per group: state dicts, exp_avgs, exp_avg_sqs, steps

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # this optimiser's own path, whatever wrote the state; set before loading, as torch
        # places the saved step counts by these options (a CPU run resumed in a CUDA graph
        # needs them on the GPU)
        own = {key: self.defaults[key] for key in ("capturable", "fused", "foreach")}
        before = {p: dict(st) for p, st in self.state.items()}
        super().load_state_dict({**state_dict, "param_groups": [
            {**g, **own} for g in state_dict["param_groups"]]})
        for g in self.param_groups:
            g["eps"] = self.keras_eps
        self._keep_tensors(before)
        self._t = None
        self._moments = None

    @torch.no_grad()
    def _keep_tensors(self, before: dict) -> None:
        """Loaded state goes into the state tensors that existed before the load (same
        shape, dtype and device), in place: a CUDA graph captured before a resume
        replays with the resumed moments and step count, not with the tensors the load
        would have replaced."""
        for p, st in self.state.items():
            for k, v in st.items():
                old = before.get(p, {}).get(k)
                if (torch.is_tensor(old) and torch.is_tensor(v) and old.shape == v.shape
                        and old.dtype == v.dtype and old.device == v.device):
                    st[k] = old.copy_(v)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._moments = None  # (the constructor calls this before _moments exists)

    # attributes beyond torch's optimiser state that copies and pickles keep (subclasses add)
    copied = ("keras_eps",)

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy, pickle
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self.copied}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        kept = {k: state.pop(k) for k in self.copied if k in state}
        super().__setstate__(state)
        self.keras_eps = self.defaults["eps"]
        self.__dict__.update(kept)
        self._t = None
        self._moments = None

    def _steps_taken(self) -> int:
        if self._t is None:  # once per run or resume: one read of the stored step count
            steps = [st["step"] for st in self.state.values() if "step" in st]
            self._t = int(steps[0].item()) if steps else 0
        return self._t

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - the Optimizer signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.defaults["capturable"]:
            self._device_step()
            return loss
        t = self._steps_taken() + 1
        for g in self.param_groups:
            g["eps"] = self.keras_eps / math.sqrt(1.0 - g["betas"][1] ** t)
        if not self._fused_step():
            super().step()
        self._t = t
        return loss

    def _moments_current(self) -> bool:
        """The cached lists still name every group's parameters' current state."""
        if self._moments is None or len(self._moments) != len(self.param_groups):
            return False
        for g, (states, *_) in zip(self.param_groups, self._moments, strict=True):
            params = g["params"]
            if len(params) != len(states) or any(
                    self.state.get(p) is not st for p, st in zip(params, states, strict=True)):
                return False
        return True

    def _fused_step(self) -> bool:
        """What torch.optim.Adam's fused step does (step counters + 1, then one
        `_fused_adam_` per group), without its per-step regrouping of the tensors: on the
        CPU that Python costs as much as the update. False, and nothing done, unless every
        parameter has a gradient and its state (the first step goes through Adam), and
        no group asks for an Adam option this call does not pass (amsgrad, maximize...)."""
        if not self.defaults["fused"] or any(
                g.get(k) for g in self.param_groups
                for k in ("amsgrad", "maximize", "differentiable", "decoupled_weight_decay")):
            return False
        if not self._moments_current():
            moments = []
            for g in self.param_groups:
                states = [self.state.get(p) for p in g["params"]]
                if not all(states):
                    return False
                moments.append((states, [st["exp_avg"] for st in states],
                                [st["exp_avg_sq"] for st in states],
                                [st["step"] for st in states]))
            self._moments = moments
        grads = [[p.grad for p in g["params"]] for g in self.param_groups]
        if any(gr is None for gs in grads for gr in gs):
            return False
        for g, gs, (_, m, v, steps) in zip(self.param_groups, grads, self._moments,
                                           strict=True):
            b1, b2 = g["betas"]
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(g["params"], gs, m, v, [], steps, amsgrad=False, lr=g["lr"],
                               beta1=b1, beta2=b2, weight_decay=g["weight_decay"],
                               eps=g["eps"], maximize=False, grad_scale=None, found_inf=None)
        return True

    def _device_step(self) -> None:
        """The Keras update from device tensors only (safe to capture in a CUDA graph):
        foreach operations per group, the step count on the device."""
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state_of(p) for p in params]
            self._foreach_update(g, params, [st["step"] for st in states],
                                 [st["exp_avg"] for st in states],
                                 [st["exp_avg_sq"] for st in states])

    def _state_of(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """p's Adam state, created at zero on p's device on its first step."""
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _foreach_update(self, g: dict, params: list, steps: list, m: list, v: list) -> None:
        b1, b2 = g["betas"]
        torch._foreach_add_(steps, 1.0)
        grads = [p.grad for p in params]
        if g["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=g["weight_decay"])
        torch._foreach_lerp_(m, grads, 1.0 - b1)
        torch._foreach_mul_(v, b2)
        torch._foreach_addcmul_(v, grads, grads, value=1.0 - b2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_add_(denom, self.keras_eps)
        t = steps[0].double()  # every parameter of a group has taken the same steps
        alpha = (g["lr"] * torch.sqrt(1.0 - torch.pow(b2, t)) / (1.0 - torch.pow(b1, t)))
        step_m = torch._foreach_mul(m, alpha.to(torch.float32))
        torch._foreach_addcdiv_(params, step_m, denom, value=-1.0)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        for g in sd["param_groups"]:  # derived device constants (experimental) are not state
            g.pop("_keras_consts", None)
        return sd


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                   capturable: bool, cls: type[KerasAdam] | None = None,
                   **extra: Any) -> KerasAdam:
    """Adam as docs/spec.md §3.1-3.2 (eps 1e-7, placed as in Keras); L2 on the tables as
    weight decay 2*lambda. `capturable`: the step runs inside a CUDA graph; `cls` and
    `extra`: a subclass and its options (the experimental Triton form)."""
    groups = [
        {"params": model.tables(), "weight_decay": 2.0 * cfg.embed_reg},
        {"params": [model.proj], "weight_decay": 0.0},
    ]
    return (cls or KerasAdam)(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-7,
                              capturable=capturable and device.type == "cuda", fused=True,
                              **extra)
