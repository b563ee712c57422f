"""Small helpers shared by the tests (no fixtures here: see conftest.py)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from fastattrec.cli import main

# A hand-written MovieLens-1M style log. User 1 has a timestamp tie (items 10 and 30 at
# t=100; file order puts 10 first), user 3 has one item only (dropped), user 4 has two
# (test sample only).
TINY_ML1M = """\
1::10::5::100
1::20::3::50
1::30::4::100
1::40::1::200
2::10::4::10
2::50::2::20
2::60::5::30
3::20::5::5
4::70::3::1
4::10::3::2
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cli(*args: str):
    """Run the fastattrec CLI in-process; returns click's Result."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
