"""Training paths not yet measured to win on a GPU: the one-scatter step and its fused
eight-launch form, multi-step CUDA graphs, the Triton Adam (the tensor-core precisions
and the split attention layout are in `fastattrec.kernels.experimental`).

Nothing in the default path imports this package: `fastattrec.training.build.build` reaches it
only when a run sets an experimental option (`TrainConfig.experimental()`), and the run's
first line names those options. `benchmarks/gpu_check.sh` measures them against the
default on a GPU; a path is promoted out of here only by such a measurement.
"""
