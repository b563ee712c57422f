"""The iterated k-core filter of `prep` (docs/spec.md §1.10): keep the users with at
least N interactions and the items with at least M, dropping both again and again until
every user and item left meets its minimum. Each round is a few Polars group-bys and
anti-joins over the whole log; the loop is over rounds, never over users or items.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from fastattrec.errors import UserError


@dataclass
class KCore:
    """What the k-core filter kept and dropped."""

    kept: pl.LazyFrame  # the input's rows (every column) of kept users and items
    rows_left: int
    rounds: int  # rounds that dropped something (0: the log already was a k-core)
    dropped_rows: int
    dropped_users: int
    dropped_items: int


def kcore(raw: pl.LazyFrame, min_user: int, min_item: int, streaming: bool) -> KCore:
    """The (min_user, min_item)-core of `raw` (columns user, item, ...): every kept user
    has >= min_user rows and every kept item >= min_item rows among the kept rows.

    One round counts the rows of every user and every item of the rows left and drops,
    together, every user below min_user and every item below min_item; rounds repeat
    until one drops nothing. The core is the largest subset of rows meeting both minimums,
    so it does not depend on the order of the drops (only the number of rounds does)."""
    engine = "streaming" if streaming else "auto"
    pairs = raw.select("user", "item").collect(engine=engine)  # (R, 2) the rows to count
    users0 = pairs.get_column("user").n_unique()
    items0 = pairs.get_column("item").n_unique()
    rows0 = pairs.height
    rounds = 0
    while pairs.height:
        low_users = (pairs.group_by("user").agg(pl.len().alias("n"))
                     .filter(pl.col("n") < min_user).select("user"))
        low_items = (pairs.group_by("item").agg(pl.len().alias("n"))
                     .filter(pl.col("n") < min_item).select("item"))
        if low_users.height == 0 and low_items.height == 0:
            break
        pairs = (pairs.join(low_users, on="user", how="anti")
                 .join(low_items, on="item", how="anti"))
        rounds += 1
    users = pairs.select("user").unique()
    items = pairs.select("item").unique()
    kept = (raw.join(users.lazy(), on="user", how="semi")
            .join(items.lazy(), on="item", how="semi"))
    return KCore(kept, pairs.height, rounds, rows0 - pairs.height, users0 - users.height,
                 items0 - items.height)


def kcore_rows(raw: pl.LazyFrame, source: Path, min_user: int, min_item: int,
               streaming: bool) -> tuple[pl.LazyFrame, dict[str, int]]:
    """The k-core's rows and its counts for meta.json; one sentence naming `source` when
    it leaves nothing."""
    core = kcore(raw, min_user, min_item, streaming)
    if core.rows_left == 0:
        raise UserError(
            f"{source}: no interactions are left after the k-core filter (users with at "
            f"least {min_user} and items with at least {min_item} interactions, "
            f"{core.rounds} round{'' if core.rounds == 1 else 's'}); lower "
            f"--min-user-interactions or --min-item-interactions.")
    return core.kept, {"dropped_users": core.dropped_users,
                       "dropped_interactions": core.dropped_rows,
                       "dropped_items": core.dropped_items, "kcore_rounds": core.rounds}
