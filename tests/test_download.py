"""`fastattrec download` against a local HTTP server serving a small fixture archive."""

import hashlib
import http.server
import io
import threading
import zipfile
from functools import partial

import pytest

from helpers import cli

ML1M = "1::10::5::100\n1::20::3::50\n2::10::4::10\n2::30::4::11\n"


def _zip(path, entries):
    """A zip archive of `entries` (name -> text; a name ending in / is a folder entry)."""
    with zipfile.ZipFile(path, "w") as z:
        for name, text in entries.items():
            if name.endswith("/"):
                z.mkdir(name.rstrip("/"))
            else:
                z.writestr(name, text)


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ml-100k/u.data", "1\t10\t5\t100\n1\t20\t3\t50\n2\t10\t4\t10\n2\t30\t4\t11\n")
        z.writestr("ml-100k/README", "fixture\n")
    (root / "ml-100k.zip").write_bytes(buf.getvalue())
    (root / "junk.zip").write_bytes(b"not a zip")
    # A re-zipped folder (the top folder holds a folder of its own name), and an archive
    # whose ratings.dat is a folder.
    _zip(root / "rezipped.zip", {"ml-1m/ml-1m/ratings.dat": ML1M, "ml-1m/ml-1m/README": "x\n"})
    _zip(root / "folder.zip", {"ml-1m/ratings.dat/": "", "ml-1m/ratings.dat/part-0": ML1M})
    _zip(root / "marker.zip", {"ml-1m/ratings.dat": ML1M,
                               "ml-1m/.fastattrec-download.json/x": "planted\n"})
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.md5(buf.getvalue()).hexdigest()
    httpd.shutdown()


def test_download_verifies_and_unpacks(tmp_path, server):
    url, md5 = server
    dest = tmp_path / "data"
    r = cli("download", "ml-100k", "--dir", dest, "--url", f"{url}/ml-100k.zip", "--md5", md5)
    assert r.exit_code == 0, r.output
    assert (dest / "ml-100k" / "u.data").read_text().startswith("1\t10\t5\t100")
    assert not (dest / "ml-100k.zip").exists()
    prepared = cli("prep", dest / "ml-100k" / "u.data", "-o", tmp_path / "p",
                   "--test-negatives", "1")
    assert prepared.exit_code == 0, prepared.output


def test_checksum_mismatch_leaves_nothing(tmp_path, server):
    url, _ = server
    dest = tmp_path / "data"
    r = cli("download", "ml-100k", "--dir", dest, "--url", f"{url}/ml-100k.zip", "--md5", "0" * 32)
    assert r.exit_code != 0 and "checksum mismatch" in r.output
    assert not (dest / "ml-100k").exists() and not (dest / "ml-100k.zip").exists()


def test_official_checksum_is_checked_by_default(tmp_path, server):
    url, _ = server  # the fixture is not the real archive, so GroupLens' MD5 must reject it
    r = cli("download", "ml-100k", "--dir", tmp_path / "d", "--url", f"{url}/ml-100k.zip")
    assert r.exit_code != 0 and "0e33842e24a9c977be4e0107933c0723" in r.output


def test_unreachable_and_missing(tmp_path, server):
    url, _ = server
    r = cli("download", "ml-100k", "--dir", tmp_path / "d", "--url", f"{url}/absent.zip")
    assert r.exit_code != 0 and "cannot download" in r.output
    r = cli("download", "ml-100k", "--dir", tmp_path / "d", "--url", "http://127.0.0.1:9/x.zip")
    assert r.exit_code != 0 and "cannot download" in r.output


def test_existing_folder_without_the_ratings_file_is_never_deleted(tmp_path, server):
    url, md5 = server
    dest = tmp_path / "data"
    (dest / "ml-100k").mkdir(parents=True)
    (dest / "ml-100k" / "my-notes.txt").write_text("keep")
    args = ("download", "ml-100k", "--dir", dest, "--url", f"{url}/ml-100k.zip", "--md5", md5)
    r = cli(*args)
    assert r.exit_code != 0 and "holds no u.data" in r.output
    r = cli(*args, "--force")
    assert r.exit_code != 0 and "did not make" in r.output
    assert (dest / "ml-100k" / "my-notes.txt").read_text() == "keep"


def test_force_replaces_only_after_the_new_archive_is_verified(tmp_path, server):
    url, md5 = server
    dest = tmp_path / "data"
    ok = ("download", "ml-100k", "--dir", dest, "--url", f"{url}/ml-100k.zip")
    assert cli(*ok, "--md5", md5).exit_code == 0
    before = (dest / "ml-100k" / "u.data").read_bytes()
    r = cli(*ok, "--md5", "0" * 32, "--force")
    assert r.exit_code != 0 and "checksum mismatch" in r.output
    assert (dest / "ml-100k" / "u.data").read_bytes() == before
    r = cli("download", "ml-100k", "--dir", dest, "--url", f"{url}/junk.zip", "--force",
            "--md5", __import__("hashlib").md5(b"not a zip").hexdigest())
    assert r.exit_code != 0 and "not a zip archive" in r.output
    assert (dest / "ml-100k" / "u.data").read_bytes() == before
    assert cli(*ok, "--md5", md5, "--force").exit_code == 0
    assert sorted(p.name for p in dest.iterdir()) == ["ml-100k"]


def test_force_refuses_a_download_folder_holding_files_of_the_users(tmp_path, server):
    url, md5 = server
    dest = tmp_path / "data"
    args = ("download", "ml-100k", "--dir", dest, "--url", f"{url}/ml-100k.zip", "--md5", md5)
    assert cli(*args).exit_code == 0
    (dest / "ml-100k" / "my-notes.txt").write_text("keep")
    r = cli(*args, "--force")
    assert r.exit_code != 0 and "my-notes.txt" in r.output
    assert (dest / "ml-100k" / "my-notes.txt").read_text() == "keep"


def test_md5_must_look_like_one_and_hints_are_quoted(tmp_path, server):
    url, md5 = server
    r = cli("download", "ml-100k", "--dir", tmp_path / "d", "--url", f"{url}/ml-100k.zip",
            "--md5", "zz")
    assert r.exit_code != 0 and "not an MD5 checksum" in r.output
    odd = tmp_path / "odd dir"
    r = cli("download", "ml-100k", "--dir", odd, "--url", f"{url}/ml-100k.zip", "--md5", md5)
    assert r.exit_code == 0 and f"'{odd}/ml-100k/u.data'" in r.output


def test_a_rezipped_folder_holding_a_folder_of_its_own_name_unpacks(tmp_path, server):
    url, _ = server
    dest = tmp_path / "data"
    md5 = hashlib.md5((tmp_path / "www" / "rezipped.zip").read_bytes()).hexdigest()
    r = cli("download", "ml-1m", "--dir", dest, "--url", f"{url}/rezipped.zip", "--md5", md5)
    assert r.exit_code == 0, r.output
    # The single top folder is flattened once: ml-1m/ml-1m/ratings.dat -> ml-1m/ratings.dat
    # under DEST/ml-1m.
    got = dest / "ml-1m" / "ml-1m" / "ratings.dat"
    assert got.read_text() == ML1M
    assert str(got) in r.output
    assert sorted(p.name for p in (dest / "ml-1m").iterdir()) == [
        ".fastattrec-download.json", "ml-1m"]
    assert cli("prep", got, "-o", tmp_path / "p", "--test-negatives", "1").exit_code == 0


def test_an_archive_whose_ratings_file_is_a_folder_is_refused(tmp_path, server):
    url, _ = server
    dest = tmp_path / "data"
    md5 = hashlib.md5((tmp_path / "www" / "folder.zip").read_bytes()).hexdigest()
    r = cli("download", "ml-1m", "--dir", dest, "--url", f"{url}/folder.zip", "--md5", md5)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == (
        f"Error: {url}/folder.zip unpacked with ratings.dat as a folder, not a file; is it "
        f"the right archive?")
    assert not dest.exists() or sorted(dest.iterdir()) == []


def test_an_archive_holding_a_folder_named_like_the_record_is_refused(tmp_path, server):
    """The folder's own record cannot be written over a folder the archive brought: one
    sentence, from the command and from the API, and nothing left behind."""
    import fastattrec.data.download as dl
    from fastattrec.errors import UserError

    url, _ = server
    dest = tmp_path / "data"
    md5 = hashlib.md5((tmp_path / "www" / "marker.zip").read_bytes()).hexdigest()
    r = cli("download", "ml-1m", "--dir", dest, "--url", f"{url}/marker.zip", "--md5", md5)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "holds a folder named .fastattrec-download.json" in r.output.strip().splitlines()[-1]
    with pytest.raises(UserError, match="not a MovieLens archive as published"):
        dl.download("ml-1m", dest, url=f"{url}/marker.zip", md5=md5)
    assert not dest.exists() or sorted(dest.iterdir()) == []
