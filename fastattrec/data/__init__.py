"""Data preparation: raw ratings logs -> a prepared dataset folder (Polars, lazily)."""

FORMAT_VERSION = 1  # of the prepared dataset folder; see dataset.py and the README
DATASET_KIND = "fastattrec-dataset"  # meta.json["kind"] of a folder `fastattrec prep` wrote
