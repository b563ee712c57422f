"""Data preparation: raw ratings logs -> a prepared dataset folder (Polars, lazily)."""
