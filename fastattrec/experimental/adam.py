"""Keras's Adam with its capturable step as one Triton launch (experimental).

`fastattrec.optim.KerasAdam` runs the capturable update (the step inside a CUDA graph) as
foreach operations per group. This subclass runs the same update for every group's
parameters in one Triton kernel (`fastattrec.kernels.experimental.keras_adam`), and can
zero the gradients it read (`zero_grads_after`) and leave its step counters to the
training step's bookkeeping launch (`device_step(count_steps=False)`), which the fused
one-scatter step uses. Not yet timed on a GPU against the foreach form, so only the
experimental steps use it; tests/test_optim.py checks it against the same rule.
"""

from __future__ import annotations

from typing import Any

import torch

from fastattrec.optim import KerasAdam


class TritonKerasAdam(KerasAdam):
    """KerasAdam whose capturable step is the fused Triton kernel where it runs."""

    def __init__(self, *args: Any, zero_grads_after: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The device step zeroes every gradient it reads (`zeroes_grads` says whether it
        # does): a training step whose gradients are written, not added, into buffers
        # kept between steps then needs no zeroing launch of its own.
        self.zero_grads_after = zero_grads_after
        self._counters: list[torch.Tensor] = []  # the last fused device step's counters

    copied = (*KerasAdam.copied, "zero_grads_after")

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.zero_grads_after = False
        super().__setstate__(state)
        self._counters = []

    def zeroes_grads(self) -> bool:
        """True when each step leaves the gradients it read at zero: `zero_grads_after`
        set, and every parameter updated by the fused device kernel."""
        params = [p for g in self.param_groups for p in g["params"]]
        return (self.zero_grads_after and bool(self.defaults["capturable"])
                and fused_available(params))

    @torch.no_grad()
    def device_step(self, count_steps: bool = True) -> None:
        """The capturable update (`step` of an optimiser made with capturable=True).
        With count_steps=False, the parameters the fused kernel updated are not counted:
        the caller adds 1 to each of `step_counters()` afterwards, before the next step
        (the training step does it in its bookkeeping launch)."""
        if not self.defaults["capturable"]:
            raise RuntimeError("device_step needs an optimiser made with capturable=True")
        self._device_step(count_steps)

    def _device_step(self, count_steps: bool = True) -> None:
        """One fused launch for the parameters of every group where Triton runs, and one
        launch that counts the step; foreach operations for the other groups."""
        from fastattrec.kernels.experimental.keras_adam import group_constants, keras_adam_

        fused: list[tuple] = []  # (params, states, constants) of each group
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state_of(p) for p in params]
            if fused_available(params):
                key = "_keras_consts"
                if key not in g or g[key].device != params[0].device:
                    g[key] = group_constants(g["lr"], g["betas"], self.keras_eps,
                                             g["weight_decay"], params[0].device)
                fused.append((params, states, g[key]))
                continue
            self._foreach_update(g, params, [st["step"] for st in states],
                                 [st["exp_avg"] for st in states],
                                 [st["exp_avg_sq"] for st in states])
        if fused:
            params = [p for ps, _, _ in fused for p in ps]
            states = [st for _, sts, _ in fused for st in sts]
            steps = [st["step"] for st in states]
            keras_adam_(params, [p.grad for p in params], [st["exp_avg"] for st in states],
                        [st["exp_avg_sq"] for st in states], steps,
                        [c for ps, _, c in fused for _ in ps], zero_grad=self.zero_grads_after)
            self._counters = steps
            if count_steps:
                torch._foreach_add_(steps, 1.0)

    def step_counters(self) -> list[torch.Tensor]:
        """The step counters the last fused device step read (each parameter's "step"):
        what `device_step(count_steps=False)` leaves to its caller to count."""
        return list(self._counters)


def fused_available(params: list[torch.Tensor]) -> bool:
    """The Triton kernel runs here: CUDA float32 parameters with Triton installed, or
    any float32 parameters under Triton's CPU interpreter (how the tests check it)."""
    if any(p.dtype != torch.float32 or not p.is_contiguous() for p in params):
        return False
    try:
        import triton  # noqa: F401

        from fastattrec.kernels.launch import interpreted
    except ImportError:  # no Triton on this platform
        return False
    return all(p.is_cuda for p in params) or interpreted()
