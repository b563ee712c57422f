"""`--kernel auto` on CUDA keeps the faster kernel by timing: the chooser against fake
timings and a failing candidate (the timing itself needs a GPU: tests/test_train_cuda.py),
and on the CPU no timing at all (the hand-written step is the default)."""

import json
import warnings

import pytest

from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.synth import synthesize
from fastattrec.training import TrainConfig, train
from fastattrec.training.kernel_choice import TIMED_STEPS, WARM_STEPS, choose_kernel, time_step


def test_the_faster_kernel_is_kept_and_both_timings_recorded():
    times = {"triton": 0.004, "torch": 0.003}
    kernel, record = choose_kernel(["triton", "torch"], times.__getitem__)
    assert kernel == "torch"
    assert record["chosen"] == "torch" and record["seconds_per_step"] == times
    assert "failed" not in record
    kernel, _ = choose_kernel(["triton", "torch"], {"triton": 0.001, "torch": 0.003}.get)
    assert kernel == "triton"


def test_a_kernel_that_fails_is_dropped_with_one_warning():
    def measure(k):
        if k == "triton":
            raise RuntimeError("PTX assembly failed\nlong traceback text")
        return 0.5

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernel, record = choose_kernel(["triton", "torch"], measure)
    assert kernel == "torch"
    assert record["failed"] == {"triton": "PTX assembly failed"}
    assert record["seconds_per_step"] == {"torch": 0.5}
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "triton" in msgs[0] and "\n" not in msgs[0]


def test_every_kernel_failing_raises_the_last_error():
    def measure(k):
        raise ValueError(f"{k} broke")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="torch broke"):
            choose_kernel(["triton", "torch"], measure)


def test_processes_choose_from_combined_timings():
    """Under torchrun every rank must run the same kernel: the timings are combined
    (summed over ranks) before the choice, so one rank's view does not decide alone."""
    local = {"triton": 1.0, "torch": 2.0}
    others = {"triton": 5.0, "torch": 1.0}
    kernel, record = choose_kernel(["triton", "torch"], local.__getitem__,
                                   combine=lambda s: {k: s[k] + others[k] for k in s})
    assert kernel == "torch" and record["seconds_per_step"] == {"triton": 6.0, "torch": 3.0}


def test_time_step_runs_warm_up_then_timed_steps():
    calls = []
    import torch

    sec = time_step(calls.append, torch.device("cpu"))
    assert calls == list(range(WARM_STEPS)) + list(range(TIMED_STEPS))
    assert sec >= 0.0


def test_auto_on_the_cpu_takes_the_hand_written_step_untimed(tmp_path):
    synthesize(tmp_path / "r.dat", 30, 200, 900, seed=3)
    prepare(tmp_path / "r.dat", tmp_path / "data", PrepOptions(test_negatives=10))
    lines = []
    res = train(tmp_path / "data", tmp_path / "run", TrainConfig(
        epochs=1, dim=8, device="cpu", compile=False), log=lines.append)
    assert res.backend == "structured"
    assert "kernel_choice" not in json.loads((tmp_path / "run" / "config.json").read_text())
    assert any("step: hand-written" in line for line in lines), lines


def test_a_failure_without_a_message_is_named_by_its_type():
    def measure(k):
        if k == "triton":
            raise RuntimeError()
        return 0.5

    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        kernel, record = choose_kernel(["triton", "torch"], measure)
    assert kernel == "torch" and record["failed"] == {"triton": "RuntimeError"}
