"""Compressed logs: a whole file decompresses to exactly its bytes (every frame, member or
stream of it), and a file cut anywhere short of its end (an interrupted download) is
refused as truncated, naming the file, for each of the four codecs."""

import bz2
import gzip
import lzma

import pytest
import zstandard

from fastattrec.data.compressed import decompress_to
from fastattrec.errors import UserError

from helpers import cli

# A MovieLens-1M log: 12 users with 10 items each, each user's times increasing.
RAW = "".join(f"{u}::{i}::{(u * i) % 5 + 1}::{u * 1000 + i}\n"
              for u in range(1, 13) for i in range(1, 11)).encode()
CODECS = {
    "gzip": (".gz", gzip.compress, "member"),
    "bzip2": (".bz2", bz2.compress, "stream"),
    "xz": (".xz", lzma.compress, "stream"),
    "zstd": (".zst", lambda b: zstandard.ZstdCompressor().compress(b), "frame"),
}


@pytest.mark.parametrize("kind", CODECS)
def test_a_whole_file_decompresses_to_its_bytes(tmp_path, kind):
    suffix, compress, _ = CODECS[kind]
    src = tmp_path / f"ratings.dat{suffix}"
    src.write_bytes(compress(RAW))
    (tmp_path / "scratch").mkdir()
    assert decompress_to(src, tmp_path / "scratch").read_bytes() == RAW


@pytest.mark.parametrize("kind", CODECS)
def test_every_concatenated_part_is_read(tmp_path, kind):
    """Two frames (zstd), members (gzip) or streams (bzip2, xz) one after the other, as
    `pzstd` or `cat a.gz b.gz` write them: both halves come out."""
    suffix, compress, _ = CODECS[kind]
    half = len(RAW) // 2
    src = tmp_path / f"ratings.dat{suffix}"
    src.write_bytes(compress(RAW[:half]) + compress(RAW[half:]))
    (tmp_path / "scratch").mkdir()
    assert decompress_to(src, tmp_path / "scratch").read_bytes() == RAW


@pytest.mark.parametrize("kind", CODECS)
def test_a_file_cut_at_any_point_is_refused_as_truncated(tmp_path, kind):
    """Every prefix of the compressed file, from its first byte to all but its last, for a
    one-part and a two-part file (but for the cut right after the first part, which leaves
    a complete one-part file)."""
    suffix, compress, unit = CODECS[kind]
    half = len(RAW) // 2
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    src = tmp_path / f"ratings.dat{suffix}"
    first = compress(RAW[:half])
    for data, whole in ((compress(RAW), set()), (first + compress(RAW[half:]), {len(first)})):
        for n in set(range(1, len(data))) - whole:
            src.write_bytes(data[:n])
            with pytest.raises(UserError) as e:
                decompress_to(src, scratch)
            assert str(e.value) == (f"{src} is truncated (the {kind} stream ends "
                                    f"mid-{unit}); download it again."), n
            assert list(scratch.iterdir()) == [], n  # the partial copy is removed


@pytest.mark.parametrize("kind", CODECS)
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.97])
def test_prep_names_a_truncated_file_and_writes_nothing(tmp_path, kind, keep):
    suffix, compress, unit = CODECS[kind]
    data = compress(RAW)
    src = tmp_path / f"ratings.dat{suffix}"
    src.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "out"
    r = cli("prep", src, "-o", out, "--test-negatives", "1")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == (
        f"Error: {src} is truncated (the {kind} stream ends mid-{unit}); download it again.")
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
