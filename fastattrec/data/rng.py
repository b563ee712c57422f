"""A counter-based random generator written as Polars expressions.

Every draw is `splitmix64(counter + key(seed, stream))`: a pure function of the seed, a
stream number (one per purpose: train negatives, test negatives, ...) and a per-draw
counter. Polars evaluates it in parallel inside a lazy plan, with no Python loop and no
state, so the same seed gives the same bytes on any machine and thread count. UInt64
arithmetic in Polars wraps modulo 2**64, exactly like the reference definition; `>>` is
written as floor division by a power of two, which is the same for unsigned integers.
"""

from __future__ import annotations

import polars as pl

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB

# One stream per purpose, so that changing one kind of draw never shifts another.
STREAM_TRAIN_NEG = 1
STREAM_TEST_NEG = 2
STREAM_RESAMPLE = 3


def mix64_int(x: int) -> int:
    """The splitmix64 finaliser on a Python int (reference definition)."""
    z = x & MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, stream: int) -> int:
    """A 64-bit key for (seed, stream), mixed so that nearby seeds give unrelated streams."""
    return mix64_int(mix64_int(seed & MASK64) ^ ((stream * GOLDEN) & MASK64))


def _u64(v: int) -> pl.Expr:
    return pl.lit(v, dtype=pl.UInt64)


def mix64_expr(x: pl.Expr) -> pl.Expr:
    """splitmix64's finaliser as a Polars expression on a UInt64 column."""
    z = x
    z = (z ^ (z // _u64(1 << 30))) * _u64(MIX1)
    z = (z ^ (z // _u64(1 << 27))) * _u64(MIX2)
    return z ^ (z // _u64(1 << 31))


def random_u64(seed: int, stream: int, counter: pl.Expr) -> pl.Expr:
    """Uniform 64-bit draws, one per row, from a unique non-negative `counter`."""
    key = stream_key(seed, stream)
    return mix64_expr(counter.cast(pl.UInt64) * _u64(GOLDEN) + _u64(key))


def random_below(seed: int, stream: int, counter: pl.Expr, bound: pl.Expr) -> pl.Expr:
    """Uniform integers in [0, bound) (bound >= 1); the modulo bias is below bound / 2**64."""
    return random_u64(seed, stream, counter) % bound.cast(pl.UInt64)
