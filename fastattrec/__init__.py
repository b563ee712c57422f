"""fastattrec: AttRec, the self-attentive sequential recommender, prepared with Polars and
trained with a fused Triton attention kernel on CUDA (plain torch on CPU)."""

__version__ = "0.1.0"
