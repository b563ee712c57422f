"""Training: the loop (`loop.py`), the step (`step.py`, `cpu_step.py`), the run folder
(`checkpoint.py`), the machine (`system.py`), what a run is built from (`build.py`) and
`--kernel auto`'s timing on CUDA (`kernel_choice.py`). docs/architecture.md shows how
they fit together."""

from fastattrec.config import TrainConfig
from fastattrec.training.build import Built, build
from fastattrec.training.loop import Diverged, TrainResult, train, validation_loss

__all__ = ["Built", "Diverged", "TrainConfig", "TrainResult", "build", "train",
           "validation_loss"]
