"""fastattrec: AttRec, the self-attentive sequential recommender, prepared with Polars and
trained with a fused Triton attention kernel on CUDA (plain torch on CPU).

The Python API (fastattrec/api.py) is imported on first use, so that `import fastattrec`
and `fastattrec --help` stay fast:

    import fastattrec as fa
    data = fa.prepare("ratings.dat", "data/ml1m")
    run = fa.train(data, "runs/ml1m")
    run.evaluate(ks=[10]), run.recommend(users=[1], k=10)
"""

from fastattrec.errors import UserError
from fastattrec.version import VERSION as __version__

_API = ("prepare", "synthesize", "train", "resume", "load_run", "load_dataset", "Dataset",
        "Run")
__all__ = ["UserError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from fastattrec import api

        return getattr(api, name)
    raise AttributeError(f"module 'fastattrec' has no attribute {name!r}")
