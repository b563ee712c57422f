"""`fastattrec synth`: deterministic MovieLens-format logs with real sequential structure.

Items belong to clusters with Zipf popularity inside each cluster. Every user walks a
Markov chain over clusters: at each step they stay in their cluster or, with probability
`switch`, jump to a nearby one (mostly the next). So the next item is predictable from the
recent ones (its cluster), which a sequential model can learn and popularity cannot.
Timestamps advance by random gaps, a share of them zero, so ties occur as in MovieLens.

Everything is vectorised with numpy, users in fixed-size chunks (each with its own seeded
generator), so 100M interactions never hold a Python object per row, and the output is
the same for the same arguments whatever the machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from fastattrec.atomic import atomic_path, atomic_write_json
from fastattrec.errors import UserError
from fastattrec.outputs import claim_output, file_sha256, read_json_dict
from fastattrec.version import VERSION as __version__

SYNTH_KIND = "fastattrec-synth"
USERS_PER_CHUNK = 20_000
T0 = 956_703_932  # first MovieLens-1M timestamp, for realism only


def synth_record(path: Path) -> Path:
    """The record `synth` writes beside its log: PATH.synth.json."""
    path = Path(path)
    return path.with_name(path.name + ".synth.json")


def _record(path: Path) -> dict | None:
    rec = read_json_dict(synth_record(path))
    return rec if rec is not None and rec.get("kind") == SYNTH_KIND else None


def made_by_synth(path: Path) -> bool:
    """True when `path` is a log written by `synth` and unchanged since (its record's
    size and SHA-256 match)."""
    path = Path(path)
    rec = _record(path)
    if rec is None or not path.is_file():
        return False
    return rec.get("size") == path.stat().st_size and rec.get("sha256") == file_sha256(path)


def _user_lengths(rng: np.random.Generator, users: int, interactions: int) -> np.ndarray:
    """Heavy-tailed lengths (each >= 3 where possible) summing exactly to `interactions`."""
    floor = 3 if interactions >= 3 * users else 1
    weights = rng.lognormal(mean=0.0, sigma=1.0, size=users)
    extra = interactions - floor * users
    lengths = floor + np.floor(weights / weights.sum() * extra).astype(np.int64)
    short = interactions - int(lengths.sum())
    # Hand out the rounding remainder to the users with the largest fractional parts.
    frac = weights / weights.sum() * extra
    frac -= np.floor(frac)
    lengths[np.argsort(-frac, kind="stable")[:short]] += 1
    return lengths


def _cluster_tables(rng: np.random.Generator, items: int, clusters: int):
    """Item ids per cluster (shuffled) and each cluster's shifted CDF for one searchsorted."""
    perm = rng.permutation(items) + 1
    sizes = np.full(clusters, items // clusters)
    sizes[: items % clusters] += 1
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rank_in_cluster = np.arange(items) - np.repeat(starts, sizes)
    p = 1.0 / (rank_in_cluster + 1.0) ** 0.8
    sums = np.add.reduceat(p, starts)
    cdf = np.cumsum(p) - np.repeat(np.cumsum(sums) - sums, sizes)
    cdf /= np.repeat(sums, sizes)
    shifted = cdf + np.repeat(np.arange(clusters), sizes)  # cluster c's CDF lies in (c, c+1]
    shifted[np.cumsum(sizes) - 1] = np.arange(1, clusters + 1)  # exact upper ends
    return perm, shifted


def synthesize(
    path: Path, users: int, items: int, interactions: int, seed: int = 0,
    clusters: int | None = None, switch: float = 0.15, force: bool = False,
) -> dict[str, int]:
    """Write a `UserID::ItemID::Rating::Timestamp` log to `path`; return its counts.

    Beside it, `PATH.synth.json` records the parameters and the file's SHA-256, which is
    how `force` knows that an existing PATH is a log this command wrote (and unchanged)."""
    if users < 1 or items < 2 or interactions < users:
        raise UserError(
            f"need --users >= 1, --items >= 2 and --interactions >= --users "
            f"(got {users}, {items}, {interactions})."
        )
    if not 0 <= seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2^63 - 1, got {seed}.")
    if not (math.isfinite(switch) and 0.0 <= switch <= 1.0):
        raise UserError(f"--switch is a probability: give a number from 0 to 1, got {switch}.")
    if clusters is not None and clusters < 1:
        raise UserError(f"--clusters must be at least 1, got {clusters}.")
    clusters = clusters or int(np.clip(items // 40, 2, 64))
    if clusters > items:
        raise UserError(f"--clusters {clusters} exceeds --items {items}.")
    base = np.random.default_rng([seed, 0])
    lengths = _user_lengths(base, users, interactions)
    perm, shifted = _cluster_tables(base, items, clusters)
    global_p = 1.0 / np.arange(1, items + 1) ** 1.0
    global_cdf = np.cumsum(global_p) / global_p.sum()
    global_perm = base.permutation(items) + 1
    rating_cdf = np.cumsum([0.06, 0.11, 0.26, 0.35, 0.22])

    with claim_output(path, force=force, made_by_us=made_by_synth, kind="file",
                      what="log written by `fastattrec synth`") as path:
        record_path = synth_record(path)
        if record_path.is_dir() or (record_path.exists() and _record(path) is None):
            raise UserError(f"{record_path} exists and is not a record fastattrec wrote; "
                            f"`synth` keeps its record there, so move it away or choose "
                            f"another -o.")
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as out:
                _write_chunks(out, users, lengths, perm, shifted, global_cdf, global_perm,
                              rating_cdf, clusters, switch, seed)
            size, sha = tmp.stat().st_size, file_sha256(tmp)
        record = {"kind": SYNTH_KIND, "fastattrec_version": __version__, "size": size,
                  "sha256": sha,
                  "params": {"users": users, "items": items, "interactions": interactions,
                             "seed": seed, "clusters": clusters, "switch": switch}}
        atomic_write_json(record_path, record)  # after the log: it never names a missing file
    return {"users": users, "items": items, "interactions": interactions,
            "clusters": clusters}


def _write_chunks(out, users: int, lengths: np.ndarray, perm: np.ndarray,
                  shifted: np.ndarray, global_cdf: np.ndarray, global_perm: np.ndarray,
                  rating_cdf: np.ndarray, clusters: int, switch: float, seed: int) -> None:
    """The log, users in chunks of USERS_PER_CHUNK, each chunk from its own generator."""
    for chunk, lo in enumerate(range(0, users, USERS_PER_CHUNK)):
        hi = min(users, lo + USERS_PER_CHUNK)
        rng = np.random.default_rng([seed, 1, chunk])
        n = lengths[lo:hi]
        total = int(n.sum())
        owner = np.repeat(np.arange(lo, hi), n)
        first = np.zeros(total, dtype=bool)
        first[np.cumsum(n) - n] = True
        # Cluster walk: a jump at each switch, cumulated within each user.
        jump = np.where(rng.random(total) < switch,
                        rng.choice([1, 1, 1, 2, -1], size=total), 0)
        start = rng.integers(0, clusters, size=hi - lo)
        jump[first] = start
        walk = np.cumsum(jump)
        walk -= np.repeat(walk[np.cumsum(n) - n] - start, n)
        cluster = np.mod(walk, clusters)
        item = perm[np.searchsorted(shifted, cluster + rng.random(total), side="left")]
        noise = rng.random(total) < 0.1
        item[noise] = global_perm[np.searchsorted(global_cdf, rng.random(noise.sum()))]
        gaps = np.where(rng.random(total) < 0.3, 0, rng.exponential(3600.0, total))
        gaps[first] = 0
        t = np.cumsum(gaps)
        t -= np.repeat(t[np.cumsum(n) - n], n)
        t += np.repeat(T0 + rng.integers(0, 3 * 365 * 86400, size=hi - lo), n)
        rating = np.searchsorted(rating_cdf, rng.random(total) * rating_cdf[-1]) + 1
        frame = pl.DataFrame({
            "u": owner + 1, "a": None, "i": item, "b": None, "r": rating, "c": None,
            "t": t.astype(np.int64),
        }, schema={"u": pl.Int64, "a": pl.String, "i": pl.Int64, "b": pl.String,
                   "r": pl.Int64, "c": pl.String, "t": pl.Int64})
        # `::` is written as ':' around an empty column: Polars separators are one byte.
        frame.write_csv(out, separator=":", include_header=False, quote_style="never",
                        null_value="")
