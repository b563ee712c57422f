"""`fastattrec synth`: exact counts, determinism, MovieLens-1M format, ties, structure."""

import numpy as np
import polars as pl
import pytest

from fastattrec.data.ratings import read_ratings
from fastattrec.data.synth import synthesize

from helpers import cli


def test_counts_format_and_determinism(tmp_path):
    a, b, c = tmp_path / "a.dat", tmp_path / "b.dat", tmp_path / "c.dat"
    synthesize(a, 50, 120, 2000, seed=3)
    synthesize(b, 50, 120, 2000, seed=3)
    synthesize(c, 50, 120, 2000, seed=4)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    lines = a.read_text().splitlines()
    assert len(lines) == 2000
    assert all(len(line.split("::")) == 4 for line in lines)
    frame, scan = read_ratings(a)
    assert scan.fmt == "ml-1m"
    assert frame.get_column("user").n_unique() == 50
    assert frame.get_column("item").is_between(1, 120).all()
    assert frame.get_column("rating").is_between(1, 5).all()
    # Times never go backwards within a user, and some ties exist (as in MovieLens).
    per_user = frame.group_by("user").agg(pl.col("time").diff().drop_nulls().alias("d"))
    gaps = np.concatenate([np.asarray(d) for d in per_user.get_column("d").to_list() if d])
    assert (gaps >= 0).all() and (gaps == 0).any()


def test_next_item_follows_the_current_cluster(tmp_path):
    """The structure a sequential model can learn: consecutive items are far more often
    from the same cluster than chance (clusters are contiguous in the hidden permutation,
    so measure it as: the next item repeats one of the user's last 5 items' clusters)."""
    path = tmp_path / "s.dat"
    synthesize(path, 200, 400, 20000, seed=0, clusters=10, switch=0.1)
    frame, _ = read_ratings(path)
    items = frame.get_column("item").to_numpy()
    users = frame.get_column("user").to_numpy()
    # Co-occurrence of consecutive items within users vs a shuffled baseline.
    same_user = users[1:] == users[:-1]
    pairs = set(zip(items[:-1][same_user], items[1:][same_user], strict=True))
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(items)
    random_pairs = set(zip(shuffled[:-1], shuffled[1:], strict=True))
    # Fewer distinct pairs than random means transitions concentrate (within clusters).
    assert len(pairs) < 0.8 * len(random_pairs)


def test_cli_refuses_to_overwrite(tmp_path):
    out = tmp_path / "s.dat"
    assert cli("synth", "-o", out, "--users", 5, "--items", 20, "--interactions", 50).exit_code == 0
    r = cli("synth", "-o", out, "--users", 5, "--items", 20, "--interactions", 50)
    assert r.exit_code != 0 and "already exists" in r.output
    bad = cli("synth", "-o", tmp_path / "t.dat", "--users", 10, "--interactions", 5)
    assert bad.exit_code != 0 and "--interactions" in bad.output


@pytest.mark.parametrize("args,expect", [
    (("--switch", "2"), "--switch is a probability"),
    (("--switch", "nan"), "--switch is a probability"),
    (("--clusters", "0"), "clusters must be a whole number from 1"),
    (("--clusters", "-3"), "clusters must be a whole number from 1"),
    (("--seed", "-1"), "--seed"),
])
def test_bad_parameters_are_refused_before_writing(tmp_path, args, expect):
    r = cli("synth", "-o", tmp_path / "s.dat", "--users", "5", "--items", "20",
            "--interactions", "40", *args)
    assert r.exit_code != 0 and "Traceback" not in r.output and expect in r.output
    assert not (tmp_path / "s.dat").exists() and not (tmp_path / "s.dat.synth.json").exists()
