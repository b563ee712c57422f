"""Data preparation: raw ratings logs -> a prepared dataset folder (Polars, lazily)."""

FORMAT_VERSION = 1  # of the prepared dataset folder; see docs/formats.md §1
DATASET_KIND = "fastattrec-dataset"  # meta.json["kind"] of a folder `fastattrec prep` wrote
