"""Negative sampling without Python loops: every draw is a Polars expression.

A user u who has seen k_u distinct items out of a universe of `n` items (ids 1..n) has
M_u = n - k_u unseen ones. A negative is drawn as r ~ U[0, M_u) and mapped to the r-th
unseen item exactly, with no rejection loop: with the user's seen items sorted as
v_0 < v_1 < ... (0-based ids) and c_j = v_j - j, the r-th unseen id is
r + #{j : c_j <= r}. That count comes from one as-of join on the key u * stride + c,
which is a single sorted merge for every draw of every user at once.
"""

from __future__ import annotations

import polars as pl

from fastattrec.data.rng import STREAM_TEST_NEG, random_below
from fastattrec.errors import UserError


def seen_reference(seq: pl.LazyFrame, stride: int, item_offset: int = 1) -> pl.LazyFrame:
    """Per user, the as-of table (key, ref_user, cnt) of their distinct seen items.

    `seq` has columns user, item (ids item_offset .. item_offset + n - 1).
    """
    sk = pl.col("user").cast(pl.Int64) * stride + pl.col("item").cast(pl.Int64) - item_offset
    distinct = (
        seq.select("user", sk.alias("sk"))
        .sort("sk")
        .filter(pl.col("sk") != pl.col("sk").shift(1).fill_null(-1))
        .with_columns(pl.int_range(pl.len(), dtype=pl.Int64).over("user").alias("j"))
    )
    return (
        distinct.select(
            (pl.col("sk") - pl.col("j")).alias("key"),
            pl.col("user").alias("ref_user"),
            (pl.col("j") + 1).alias("cnt"),
        )
        # Several seen items can share a key (a run of consecutive ids); the last row of
        # the run carries the full count, so keep only that one.
        .filter(pl.col("key") != pl.col("key").shift(-1).fill_null(-1))
    )


def map_unseen(
    queries: pl.LazyFrame, ref: pl.LazyFrame, stride: int, item_offset: int = 1
) -> pl.LazyFrame:
    """Turn draws (user, r) into item ids (column `neg`); other columns pass through.

    The result is sorted by the join key, not in the order of `queries`: sort it back
    by one of the passed-through columns.
    """
    q = queries.with_columns(
        (pl.col("user").cast(pl.Int64) * stride + pl.col("r").cast(pl.Int64)).alias("key")
    ).sort("key")
    joined = q.join_asof(ref, on="key", strategy="backward", check_sortedness=False)
    below = pl.when(pl.col("ref_user") == pl.col("user")).then(pl.col("cnt")).otherwise(0)
    return joined.with_columns(
        (pl.col("r").cast(pl.Int64) + below + item_offset).cast(pl.Int32).alias("neg")
    ).drop("key", "ref_user", "cnt")


def _candidates(todo: pl.LazyFrame, seed: int) -> pl.LazyFrame:
    """`extra` fresh draws r in [0, unseen) per user, numbered k = drawn .. drawn+extra-1."""
    return (
        todo.with_columns(pl.int_ranges(pl.col("drawn"), pl.col("drawn") + pl.col("extra"))
                          .alias("k"))
        .explode("k")
        .with_columns(
            random_below(
                seed, STREAM_TEST_NEG,
                pl.col("user").cast(pl.UInt64) * (1 << 32) + pl.col("k").cast(pl.UInt64),
                pl.col("unseen"),
            ).alias("r")
        )
        .select("user", pl.col("k").cast(pl.Int64), "r")
    )


def _first_distinct(frame: pl.LazyFrame, n_neg: int) -> pl.LazyFrame:
    """Per user, the first `n_neg` distinct r in draw order (rows arrive in draw order)."""
    return (
        frame.unique(subset=["user", "r"], keep="first", maintain_order=True)
        .filter(pl.int_range(pl.len()).over("user") < n_neg)
    )


def _extra(need: pl.Expr, have: pl.Expr) -> pl.Expr:
    # Over-draw (more so when few unseen items remain) so that one round nearly always
    # suffices: a fresh candidate is new with probability (unseen - have) / unseen.
    return (
        need.cast(pl.Float64) * pl.col("unseen").cast(pl.Float64)
        / (pl.col("unseen") - have).clip(lower_bound=1).cast(pl.Float64) * 1.25 + 8
    ).ceil().cast(pl.Int64)


def distinct_test_draws(
    users: pl.DataFrame, n_neg: int, seed: int, max_rounds: int = 64
) -> pl.DataFrame:
    """Draw `n_neg` distinct r per user (columns user, unseen) in [0, unseen).

    Candidates are drawn i.i.d. and the first `n_neg` distinct ones are kept, which is
    exactly sampling without replacement. Users still short after a round draw again;
    the loop runs over rounds (nearly always one), never over users.
    """
    todo = users.select("user", "unseen").with_columns(
        pl.lit(0, pl.Int64).alias("drawn"), _extra(pl.lit(n_neg), pl.lit(0)).alias("extra"))
    have = _first_distinct(_candidates(todo.lazy(), seed), n_neg).collect()
    for _ in range(max_rounds):
        counts = have.group_by("user").agg(pl.len().alias("n"), pl.col("k").max().alias("kmax"))
        short = (todo.join(counts, on="user", how="left")
                 .with_columns(pl.col("n").fill_null(0))
                 .filter(pl.col("n") < n_neg))
        if short.height == 0:
            return have.sort("user", "k")
        # Continue each short user's draw numbering after everything drawn so far.
        short = short.with_columns(
            (pl.col("drawn") + pl.col("extra")).alias("drawn"),
            _extra(n_neg - pl.col("n"), pl.col("n")).alias("extra"),
        )
        todo = todo.join(short.select("user", "drawn", "extra"), on="user", how="left",
                         suffix="_new").with_columns(
            pl.coalesce("drawn_new", "drawn").alias("drawn"),
            pl.coalesce("extra_new", "extra").alias("extra"),
        ).drop("drawn_new", "extra_new")
        more = _candidates(short.select("user", "unseen", "drawn", "extra").lazy(), seed)
        have = _first_distinct(pl.concat([have.lazy(), more]), n_neg).collect()
    raise UserError("could not draw distinct test negatives; try another --seed.")
