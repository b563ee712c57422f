"""Kernels not yet measured to win on a GPU, kept beside the default path to be timed.

- the one-scatter training step's chain: `embedding_gather` (every table row of a step
  in one launch), `embedding_scatter` (the rows' gradients summed by one deterministic
  scatter), and the fused eight-launch step's kernels `pair_loss`, `step_prologue`,
  `step_tail` and `keras_adam`;
- `attention_split`: the attention with its projections in cuBLAS (a second layout of
  the block kernels, `benchmarks/bench_kernel.py --impls triton split`);
- `emulation`: a numpy model of the tensor-core precisions' products, for the precision
  tests and `benchmarks/precision_check.py`.

The default path (`fastattrec.kernels`, its `short_term_attention` and `attention.py`)
never imports this package (tests/test_imports.py checks it); these modules import the
default path's public names only. This file imports nothing, so importing one module
here (say the numpy-only `emulation`) does not import the others.
"""
