"""`fastattrec prep`: a ratings log -> a prepared dataset folder (docs/spec.md §1).

The log is read once into a typed frame (or, with `streaming`, sunk to a Parquet file
that the later plans scan), then every output is one lazy Polars plan over it: dense id
maps, the time-ordered flat sequences, per-user offsets, the train/validation negatives
(one per row) and the test negatives. Nothing loops over users or rows in Python.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from fastattrec.atomic import atomic_dir, atomic_write_json
from fastattrec.data import DATASET_KIND, FORMAT_VERSION
from fastattrec.data.compressed import decompress_to
from fastattrec.data.dataset import replaceable_dataset
from fastattrec.data.filters import kcore_rows
from fastattrec.data.negatives import distinct_test_draws, map_unseen, seen_reference
from fastattrec.data.ratings import read_ratings, sink_ratings
from fastattrec.data.readers import SEQUENCES, ColumnNames, check_file
from fastattrec.data.rng import STREAM_TEST_NEG, STREAM_TRAIN_NEG, random_below
from fastattrec.data.splits import (
    LEAVE_ONE_OUT,
    SplitOptions,
    TimeCuts,
    check_split,
    split_counts,
    split_users,
)
from fastattrec.errors import UserError, first_error_line
from fastattrec.outputs import claim_output, file_sha256
from fastattrec.version import VERSION as __version__

COMPAT_MODES = ("none", "notebook")
NOTEBOOK_TEST_NEGATIVES = 101
ROW_GROUP = 1 << 20  # rows per Parquet row group, fixed so output bytes depend on content


@dataclass(frozen=True)
class PrepOptions:
    """Every parameter of a preparation; all of them are recorded in meta.json."""

    fmt: str = "auto"
    columns: ColumnNames = field(default_factory=ColumnNames)
    trans_score: float | None = None  # None: keep every row
    test_negatives: int | None = None  # None: 100, or 101 with --compat notebook
    compat: str = "none"
    seed: int = 0
    streaming: bool = False
    min_user_interactions: int | None = None  # None: 2 (single-item users dropped)
    min_item_interactions: int | None = None  # None: no minimum; either one: k-core
    split: SplitOptions = field(default_factory=SplitOptions)  # leave-one-out by default

    @property
    def kcore(self) -> bool:
        """True when the iterated k-core filter is on (docs/spec.md §1.10)."""
        return self.min_user_interactions is not None or self.min_item_interactions is not None


@dataclass
class PrepSummary:
    """What `prep` did, for the printed table."""

    out_dir: Path
    counts: dict[str, int]
    seconds: float
    steps: list[tuple[str, float]]


def _collect(lf: pl.LazyFrame, streaming: bool) -> pl.DataFrame:
    return lf.collect(engine="streaming") if streaming else lf.collect()


def prepare(
    source: Path,
    out_dir: Path,
    opts: PrepOptions,
    force: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> PrepSummary:
    """Prepare `source` into `out_dir` (written atomically; see module docstring).

    Phases: read the log (and filter ratings), split off single-item users (or keep the
    k-core) and number the ids, order each user's sequence and split it (validation and
    test counts), draw the negatives, write the files and meta.json.
    `force` replaces an existing prepared dataset, never anything else (outputs.py)."""
    source, out_dir = Path(source), Path(out_dir)
    n_test_neg = _check_options(opts)
    check_file(source)
    t0 = time.perf_counter()
    steps: list[tuple[str, float]] = []

    def step(name: str) -> None:
        now = time.perf_counter() - t0
        steps.append((name, now))
        log(f"[{now:6.2f}s] {name}")

    with claim_output(out_dir, force=force, made_by_us=replaceable_dataset,
                      what="prepared dataset", inputs=[source], log=log) as out_dir, \
            atomic_dir(out_dir, force=True) as tmp:
        step("reading " + str(source))
        before = _identity(source)
        sha256 = file_sha256(source)
        raw, scan, rows_read = _read_log(source, tmp, opts)
        id_types = _id_types(raw)
        if not opts.streaming:
            _same_source(source, before)  # the frame in memory is what was hashed
        step("splitting users")
        ids = _split_users(raw, source, opts)
        step("ordering sequences")
        seq, users = _order_sequences(ids, opts.streaming, opts.split.split == "time")
        users, cuts = split_users(seq, users, source, opts.split, scan.time_dates)
        seq = seq.select("user", "item")
        _check_enough_unseen(users, ids.universe, n_test_neg, source, opts)
        step("drawing negatives")
        train_negs, test_negs = _draw_negatives(seq, users, ids.universe, n_test_neg, opts)
        step("writing " + str(out_dir))
        loo = opts.split.split == LEAVE_ONE_OUT
        _write_tables(tmp, out_dir, seq, train_negs, users, ids.item_map, test_negs, loo)
        phases = split_counts(users)
        counts = {
            "rows_read": rows_read,
            "rows_after_trans_score": ids.rows_kept,
            "users": users.height,
            "items": ids.item_map.height,
            "item_rows": ids.universe + 1,
            "interactions": seq.height,
            "train_samples": phases["train_samples"],
            "val_samples": phases["val_samples"],
            "test_samples": phases["test_samples"],
            **ids.dropped,
            **({} if loo else {k: v for k, v in phases.items() if "users" in k}),
        }
        _same_source(source, before)  # (streaming reads the source until here)
        atomic_write_json(tmp / "meta.json", _meta(source, scan.fmt, opts, n_test_neg,
                                                   ids.universe, counts, sha256,
                                                   before[0], id_types, cuts))
    seconds = time.perf_counter() - t0
    steps.append(("done", seconds))
    return PrepSummary(out_dir=out_dir, counts=counts, seconds=seconds, steps=steps)


def _check_options(opts: PrepOptions) -> int:
    """Refuse bad options before any work; returns the number of test negatives (0 for
    the time and ratio splits, which have no sampled protocol)."""
    if opts.compat not in COMPAT_MODES:
        raise UserError(f"unknown --compat {opts.compat!r}; use one of {', '.join(COMPAT_MODES)}.")
    check_split(opts.split, opts.fmt, SEQUENCES)
    if opts.split.split != LEAVE_ONE_OUT:
        if opts.compat == "notebook":
            raise UserError(f"--compat notebook reproduces the notebook's leave-one-out "
                            f"split, so it cannot be used with --split {opts.split.split}; "
                            f"drop one of them.")
        if opts.test_negatives is not None:
            raise UserError(f"--test-negatives draws the negatives of the sampled protocol, "
                            f"which ranks one test item per user and exists only for the "
                            f"leave-one-out split; --split {opts.split.split} is evaluated "
                            f"over all items, so drop --test-negatives.")
        return 0
    n_test_neg = opts.test_negatives
    if n_test_neg is None:
        n_test_neg = NOTEBOOK_TEST_NEGATIVES if opts.compat == "notebook" else 100
    if n_test_neg < 1:
        raise UserError(f"--test-negatives must be at least 1, got {n_test_neg}.")
    if opts.trans_score is not None and not math.isfinite(opts.trans_score):
        raise UserError(f"--trans-score must be a finite number, got {opts.trans_score}.")
    if opts.min_user_interactions is not None and opts.min_user_interactions < 2:
        raise UserError(f"--min-user-interactions must be at least 2 (a user needs 2 "
                        f"interactions to give a sample), got {opts.min_user_interactions}; "
                        f"omit it to keep every user with 2 or more.")
    if opts.min_item_interactions is not None and opts.min_item_interactions < 1:
        raise UserError(f"--min-item-interactions must be at least 1, got "
                        f"{opts.min_item_interactions}; omit it to keep every item.")
    if opts.kcore and opts.compat == "notebook":
        raise UserError("--min-user-interactions and --min-item-interactions cannot be used "
                        "with --compat notebook, which reproduces the notebook's data (no "
                        "k-core filter) and draws negatives from every raw id up to the "
                        "largest, dropped items included; drop the minimums or --compat.")
    return n_test_neg


def _read_log(source: Path, tmp: Path, opts: PrepOptions) -> tuple[pl.LazyFrame, Any, int]:
    """The typed log (user, item, time, _line), rating-filtered; its scan; rows read."""
    with relabelled(source, tmp) as plain:
        if opts.streaming:
            raw, scan = sink_ratings(plain, tmp / "_canonical.parquet", opts.fmt, opts.columns)
        else:
            frame, scan = read_ratings(plain, opts.fmt, opts.columns)
            raw = frame.lazy()
    rows_read = int(_collect(raw.select(pl.len()), opts.streaming).item())
    trans = opts.trans_score
    if trans is not None and not scan.has_rating:
        raise UserError(
            f"{source} has no rating column, so --trans-score cannot filter; "
            f"drop --trans-score or name the column with --rating-col."
        )
    if trans is not None:
        nan = _collect(raw.filter(pl.col("rating").is_nan()).head(1), opts.streaming)
        if nan.height:
            raise UserError(
                f"{source}, {scan.row_word} {nan.item(0, '_line')}: the rating is NaN, so "
                f"--trans-score cannot judge it; fix or remove that {scan.row_word}.")
        raw = raw.filter(pl.col("rating") >= trans)
    raw = raw.select("user", "item", "time", "_line")
    if opts.compat == "notebook":
        raw = _check_notebook_ids(raw, source, opts.streaming)
    return raw, scan, rows_read


@dataclass
class _Ids:
    """The rows kept (users with >= 2 items, or the k-core) and the dense id maps."""

    kept: pl.LazyFrame
    rows_kept: int
    dropped: dict[str, int]  # the counts of what was dropped, for meta.json
    user_map: pl.DataFrame  # raw_user, user
    item_map: pl.DataFrame  # item, raw_item
    universe: int  # negatives are drawn from items 1..universe


def _split_users(raw: pl.LazyFrame, source: Path, opts: PrepOptions) -> _Ids:
    """Drop single-item users (or keep the k-core) and number users and items
    (docs/spec.md §1.3, §1.8)."""
    streaming, notebook = opts.streaming, opts.compat == "notebook"
    per_user = _collect(raw.group_by("user").agg(pl.len().alias("n")), streaming)
    rows_kept = int(per_user.get_column("n").sum())
    if rows_kept == 0:
        raise UserError(
            f"{source}: no rows left after --trans-score {opts.trans_score or 0:g}; lower it "
            f"(ratings below it are dropped)."
        )
    if opts.kcore:
        kept, dropped = kcore_rows(raw, source, opts.min_user_interactions or 2,
                                   opts.min_item_interactions or 1, streaming)
    else:
        kept = raw.join(
            per_user.lazy().filter(pl.col("n") >= 2).select("user"), on="user", how="semi"
        )
        short = per_user.filter(pl.col("n") < 2)
        dropped = {"dropped_users": short.height,
                   "dropped_interactions": int(short.get_column("n").sum())}
    user_map = _collect(
        kept.select(pl.col("user").alias("raw_user")).unique().sort("raw_user")
        .with_row_index("user", offset=1).with_columns(pl.col("user").cast(pl.Int32)),
        streaming,
    )
    if user_map.height == 0:
        raise UserError(
            f"{source}: every user has a single interaction, so no sample can be made; "
            f"each user needs at least 2."
        )
    raw_items = kept.select(pl.col("item").alias("raw_item")).unique().sort("raw_item")
    if notebook:  # raw ids are table rows; the universe is 1..max raw id before dropping
        item_map = _collect(raw_items.with_columns(pl.col("raw_item").cast(pl.Int32)
                                                   .alias("item")), streaming)
        universe = int(_collect(raw.select(pl.col("item").max()), streaming).item())
    else:
        item_map = _collect(raw_items.with_row_index("item", offset=1)
                            .with_columns(pl.col("item").cast(pl.Int32)), streaming)
        universe = item_map.height
    return _Ids(kept, rows_kept, dropped, user_map, item_map.select("item", "raw_item"),
                universe)


def _order_sequences(ids: _Ids, streaming: bool, keep_time: bool = False
                     ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Flat sequences (user, item[, time]) in (user, time, file line) order, and the users
    table (user, length, distinct, offset, raw_user) (docs/spec.md §1.4)."""
    seq = _collect(
        ids.kept.join(ids.user_map.lazy(), left_on="user", right_on="raw_user")
        .drop("user").rename({"user_right": "user"})
        .join(ids.item_map.lazy(), left_on="item", right_on="raw_item")
        .drop("item").rename({"item_right": "item"})
        .sort("user", "time", "_line")
        .select("user", "item", *(["time"] if keep_time else [])),
        streaming,
    )
    users = _collect(
        seq.lazy().group_by("user").agg(
            pl.len().cast(pl.Int32).alias("length"),
            pl.col("item").n_unique().cast(pl.Int64).alias("distinct"),
        ).sort("user")
        .with_columns((pl.col("length").cast(pl.Int64).cum_sum() - pl.col("length"))
                      .alias("offset"))
        .join(ids.user_map.lazy(), on="user"),
        streaming,
    ).with_columns((ids.universe - pl.col("distinct")).alias("unseen"))
    return seq, users


def _check_enough_unseen(users: pl.DataFrame, universe: int, n_test_neg: int, source: Path,
                         opts: PrepOptions) -> None:
    """Every user needs an unseen item, and N distinct ones for N distinct test negatives."""
    full = users.filter(pl.col("unseen") < 1)
    if full.height:
        raise UserError(
            f"{source}: user {full.item(0, 'raw_user')} has interacted with every one of "
            f"the {universe} items, so no negative can be drawn; remove that user."
        )
    if opts.compat != "notebook" and n_test_neg:
        short = users.filter(pl.col("unseen") < n_test_neg)
        if short.height:
            row = short.row(0, named=True)
            raise UserError(
                f"{source}: user {row['raw_user']} has seen {row['distinct']} of the "
                f"{universe} items, so {n_test_neg} distinct test negatives cannot be "
                f"drawn; lower --test-negatives to at most {row['unseen']}."
            )


def _draw_negatives(seq: pl.DataFrame, users: pl.DataFrame, universe: int, n_test_neg: int,
                    opts: PrepOptions) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One negative per row (neg) and the test negatives (user, neg) (docs/spec.md §1.7)."""
    stride = universe + 1
    ref = seen_reference(seq.lazy(), stride).collect()
    train_plan = map_unseen(
        seq.lazy().with_row_index("g").join(users.lazy().select("user", "unseen"), on="user")
        .with_columns(random_below(opts.seed, STREAM_TRAIN_NEG, pl.col("g"), pl.col("unseen"))
                      .alias("r"))
        .select("g", "user", "r"),
        ref.lazy(), stride,
    ).sort("g").select("neg")
    test_users = users.filter(pl.col("length") >= 2).select("user", "unseen")
    if n_test_neg == 0:  # the time and ratio splits: no sampled protocol, no test negatives
        test_plan = pl.LazyFrame(schema={"user": pl.Int32, "neg": pl.Int32})
        train_negs, test_negs = pl.collect_all(
            [train_plan, test_plan], engine="streaming" if opts.streaming else "auto")
        return train_negs, test_negs
    if opts.compat == "notebook":  # independent draws, repeats allowed
        draws = (
            test_users.lazy()
            .with_columns(pl.int_ranges(0, n_test_neg).alias("k")).explode("k")
            .with_columns(
                random_below(
                    opts.seed, STREAM_TEST_NEG,
                    pl.col("user").cast(pl.UInt64) * (1 << 32) + pl.col("k").cast(pl.UInt64),
                    pl.col("unseen"),
                ).alias("r")
            ).select("user", pl.col("k").cast(pl.Int64), "r")
            .collect()
        )
    else:
        draws = distinct_test_draws(test_users, n_test_neg, opts.seed)
    test_plan = map_unseen(draws.lazy(), ref.lazy(), stride).sort("user", "k").select(
        "user", "neg")
    # Both negative tables in one call, so Polars runs them side by side.
    train_negs, test_negs = pl.collect_all(
        [train_plan, test_plan], engine="streaming" if opts.streaming else "auto")
    return train_negs, test_negs


def _write_tables(tmp: Path, out_dir: Path, seq: pl.DataFrame, train_negs: pl.DataFrame,
                  users: pl.DataFrame, item_map: pl.DataFrame, test_negs: pl.DataFrame,
                  loo: bool = True) -> None:
    """The four Parquet files (docs/formats.md §1); a failed write is one sentence. The
    users' n_val and n_test columns are written for the time and ratio splits only
    (leave-one-out's are one and one)."""
    try:
        write_parquet(pl.DataFrame({"item": seq.get_column("item").cast(pl.Int32),
                                    "neg": train_negs.get_column("neg")}),
                      tmp / "sequences.parquet")
        write_parquet(users.select("user", "raw_user", "offset", "length",
                                   *([] if loo else ["n_val", "n_test"])),
                      tmp / "users.parquet")
        write_parquet(item_map, tmp / "items.parquet")
        write_parquet(test_negs, tmp / "test_negatives.parquet")
    except (OSError, pl.exceptions.PolarsError) as e:
        raise UserError(f"cannot write {out_dir} ({first_error_line(e)}); "
                        f"check free space and permissions, or write elsewhere.") from None
    (tmp / "_canonical.parquet").unlink(missing_ok=True)


def _id_types(raw: pl.LazyFrame) -> dict[str, str]:
    """How the user and item ids were read: "integer" or "string" (ratings.py decides)."""
    schema = raw.collect_schema()
    return {col: "integer" if schema[col].is_integer() else "string"
            for col in ("user", "item")}


def _identity(source: Path) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): changes whenever the file is rewritten or replaced."""
    st = source.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _same_source(source: Path, before: tuple[int, int, int]) -> None:
    """Refuse to record a file that changed while it was read: the hash in meta.json (the
    dataset's fingerprint) must describe the bytes that were parsed."""
    try:
        now = _identity(source)
    except OSError:
        now = None
    if now != before:
        raise UserError(f"{source} changed while prep was reading it; run prep again once "
                        f"nothing writes to it.")


def _meta(source: Path, fmt: str, opts: PrepOptions, n_test_neg: int, universe: int,
          counts: dict[str, int], sha256: str, size: int, id_types: dict[str, str],
          cuts: TimeCuts | None = None) -> dict[str, Any]:
    """meta.json: versions, the source's identity, every parameter, the counts."""
    return {
        "kind": DATASET_KIND,
        "format_version": FORMAT_VERSION,
        "fastattrec_version": __version__,
        "source": {
            "path": str(source.resolve()),
            "size": size,
            "sha256": sha256,
            "format": fmt,
            "id_types": id_types,
        },
        "params": {
            "format": opts.fmt,
            "columns": asdict(opts.columns),
            "trans_score": opts.trans_score,
            "test_negatives_per_user": n_test_neg,
            "test_negatives_distinct": opts.compat != "notebook",
            "compat": opts.compat,
            "seed": opts.seed,
            "min_user_interactions": opts.min_user_interactions,
            "min_item_interactions": opts.min_item_interactions,
            "split": opts.split.split,
            "val_fraction": opts.split.val_fraction,
            "test_fraction": opts.split.test_fraction,
            "val_from": opts.split.val_from,
            "test_from": opts.split.test_from,
            "time_cuts": None if cuts is None else [cuts.val, cuts.test],
            "negative_universe": [1, universe],
            "streaming": opts.streaming,
        },
        "counts": counts,
    }


def write_parquet(frame: pl.DataFrame, path: Path) -> None:
    """Write `frame` so that equal contents give equal bytes: one chunk, fixed row groups
    (Polars' parallel plans return a varying number of chunks, and each chunk would
    otherwise become its own row group)."""
    frame.rechunk().write_parquet(path, compression="zstd", row_group_size=ROW_GROUP,
                                  statistics=True)


@contextlib.contextmanager
def relabelled(source: Path, folder: Path) -> Iterator[Path]:
    """Yield a readable plain file for `source` (unpacked into `folder` when compressed);
    messages about the unpacked copy name `source` instead."""
    plain = decompress_to(source, folder)
    try:
        yield plain
    except UserError as e:
        if plain == source:
            raise
        raise UserError(str(e).replace(str(plain), str(source))) from None
    finally:
        if plain != source:
            plain.unlink(missing_ok=True)


def _check_notebook_ids(raw: pl.LazyFrame, source: Path, streaming: bool) -> pl.LazyFrame:
    """--compat notebook keeps raw item ids as embedding rows: they must be integers >= 1."""
    schema = raw.collect_schema()
    if not schema["item"].is_integer():
        raise UserError(
            f"{source}: --compat notebook keeps raw item ids as table rows, so they must be "
            f"integers, but the item column holds {schema['item']}; drop --compat."
        )
    low = _collect(raw.select(pl.col("item").min()), streaming).item()
    if low is not None and low < 1:
        raise UserError(
            f"{source}: --compat notebook needs item ids >= 1 (0 is padding) but found "
            f"{low}; drop --compat."
        )
    return raw
