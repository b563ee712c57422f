"""Where fastattrec writes: --force replaces only what fastattrec made and never an
input; one command per output at a time; a command killed at any point loses nothing and
leaves nothing that the next command on the same output does not clean up."""

import json
import os
import subprocess
import sys
import time

import pytest

from fastattrec.data.dataset import load_prepared
from fastattrec.errors import UserError
from fastattrec.outputs import exclusive_lock, lock_path, remove_stale

from helpers import TINY_ML1M, cli, killed_cli, write


def prep(src, out, *extra):
    return cli("prep", src, "-o", out, "--test-negatives", "1", *extra)


def one_line_error(r):
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    return r.output.strip().splitlines()[-1]


# ---- --force replaces only fastattrec's own output, never an input ---------------------

def test_prep_never_overwrites_its_input(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    msg = one_line_error(prep(src, src, "--force"))
    assert "is the input" in msg
    assert src.read_text() == TINY_ML1M


def test_prep_never_replaces_the_folder_holding_its_input(tmp_path):
    folder = tmp_path / "project"
    src = write(folder / "r.dat", TINY_ML1M)
    for out in (folder, tmp_path):
        msg = one_line_error(prep(src, out, "--force"))
        assert "holds the input" in msg
    assert src.read_text() == TINY_ML1M


def test_force_refuses_a_folder_fastattrec_did_not_make(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    mine = write(tmp_path / "mine" / "notes.txt", "precious")
    msg = one_line_error(prep(src, tmp_path / "mine", "--force"))
    assert "did not make" in msg and "--force" in msg
    assert mine.read_text() == "precious"
    other = write(tmp_path / "other.txt", "precious")
    msg = one_line_error(prep(src, other, "--force"))
    assert "did not make" in msg and other.read_text() == "precious"
    # A prepared dataset is replaced, and an empty folder is fine.
    assert prep(src, tmp_path / "d").exit_code == 0
    assert prep(src, tmp_path / "d", "--force", "--seed", "5").exit_code == 0
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["params"]["seed"] == 5
    (tmp_path / "empty").mkdir()
    assert prep(src, tmp_path / "empty", "--force").exit_code == 0


def test_prep_into_the_current_folder(tmp_path, monkeypatch):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    monkeypatch.chdir(tmp_path)
    msg = one_line_error(prep(src, ".", "--force"))
    assert "holds the input" in msg
    assert src.read_text() == TINY_ML1M


def test_synth_force_replaces_only_its_own_log(tmp_path):
    out = tmp_path / "s.dat"
    assert cli("synth", "-o", out, "--users", "5", "--items", "20",
               "--interactions", "40").exit_code == 0
    r = cli("synth", "-o", out, "--users", "6", "--items", "20", "--interactions", "40",
            "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "s.dat.synth.json").read_text())["params"]["users"] == 6
    # Edited since: no longer the file synth wrote.
    out.write_text(out.read_text() + "7::1::5::1\n")
    msg = one_line_error(cli("synth", "-o", out, "--users", "5", "--items", "20",
                             "--interactions", "40", "--force"))
    assert "did not make" in msg
    mine = write(tmp_path / "mine.dat", "keep me")
    msg = one_line_error(cli("synth", "-o", mine, "--force"))
    assert "did not make" in msg and mine.read_text() == "keep me"
    (tmp_path / "dir").mkdir()
    write(tmp_path / "dir" / "x", "keep")
    msg = one_line_error(cli("synth", "-o", tmp_path / "dir", "--force"))
    assert "is a folder" in msg and (tmp_path / "dir" / "x").exists()
    (tmp_path / "empty").mkdir()
    msg = one_line_error(cli("synth", "-o", tmp_path / "empty", "--force"))
    assert "is a folder" in msg and not (tmp_path / "empty.synth.json").exists()
    # A record file of the user's beside the output is not overwritten.
    theirs = write(tmp_path / "new.dat.synth.json", "user json")
    msg = one_line_error(cli("synth", "-o", tmp_path / "new.dat", "--users", "5", "--items",
                             "20", "--interactions", "40"))
    assert "not a record fastattrec wrote" in msg and theirs.read_text() == "user json"
    assert not (tmp_path / "new.dat").exists()


def test_outputs_under_a_file_are_one_sentence(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    msg = one_line_error(prep(src, src / "out"))
    assert "is a file, not a folder" in msg
    msg = one_line_error(cli("download", "ml-100k", "--dir", src))
    assert "is a file, not a folder" in msg


def test_read_only_output_folder(tmp_path, monkeypatch):
    import errno

    import fastattrec.outputs as outputs

    src = write(tmp_path / "r.dat", TINY_ML1M)
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(outputs.os, "open", read_only)
    msg = one_line_error(prep(src, tmp_path / "ro" / "out"))
    assert "cannot write" in msg and "Read-only file system" in msg


def test_full_disk_while_writing_is_one_sentence(tmp_path, monkeypatch):
    import errno

    import polars as pl

    src = write(tmp_path / "r.dat", TINY_ML1M)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    msg = one_line_error(prep(src, tmp_path / "out"))
    assert "cannot write" in msg and "No space left" in msg
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.dat"]


def test_full_disk_under_streaming_is_not_blamed_on_the_input(tmp_path, monkeypatch):
    import polars as pl

    src = write(tmp_path / "r.dat", TINY_ML1M)

    def full(*a, **k):
        raise pl.exceptions.ComputeError("failed to write: No space left on device (os error 28)")

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", full)
    msg = one_line_error(prep(src, tmp_path / "out", "--streaming"))
    assert "cannot write" in msg and "No space left" in msg and "r.dat" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.dat"]


# ---- one command per output ------------------------------------------------------------

def test_a_second_command_on_a_locked_output_is_refused(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    hold = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "from fastattrec.outputs import exclusive_lock\n"
        f"with exclusive_lock({str(out)!r}):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout.readline().strip() == "locked"
        msg = one_line_error(prep(src, out))
        assert "in use by another fastattrec command" in msg and str(hold.pid) in msg
        msg = one_line_error(cli("train", tmp_path, "-o", out))
        assert "in use" in msg
    finally:
        hold.kill()
        hold.wait()
    # The lock dies with its process: the output is free again.
    assert prep(src, out).exit_code == 0
    assert not lock_path(out).exists()


def test_lock_is_released_and_its_file_removed(tmp_path):
    target = tmp_path / "x"
    with exclusive_lock(target):
        assert lock_path(target).exists()
        with pytest.raises(UserError, match="in use"), exclusive_lock(target):
            pass
    assert not lock_path(target).exists()
    with exclusive_lock(target):  # and can be taken again
        pass


def test_two_preps_at_once_one_wins_cleanly(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastattrec", "prep", str(src), "-o", str(out),
           "--test-negatives", "1", "--seed"]
    procs = [subprocess.Popen(cmd + [str(s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in (1, 2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    ok = [rc for rc, _ in results if rc == 0]
    refused = [err for rc, err in results if rc != 0]
    assert len(ok) >= 1
    # Either they did not overlap (second refused as existing) or the lock refused one.
    for err in refused:
        assert "in use" in err or "already exists" in err, err
    assert load_prepared(out).meta["params"]["seed"] in (1, 2)


# ---- killed commands: nothing lost, the next command tidies up -------------------------

def test_kill_between_the_renames_of_force_loses_nothing(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    assert prep(src, out, "--seed", "1").exit_code == 0
    old = (out / "test_negatives.parquet").read_bytes()
    # Without an atomic exchange: killed after the old folder was moved aside.
    r = killed_cli("prep", src, "-o", out, "--test-negatives", "1", "--seed", "2", "--force",
                   at="fastattrec.atomic:_move_aside",
                   setup="import fastattrec.atomic as A; A._exchange = lambda a, b: False")
    assert r.returncode == 137, r.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name]
    # The next command on `out` puts the old dataset back before anything else.
    msg = one_line_error(prep(src, out, "--seed", "3"))
    assert "already exists" in msg
    assert (out / "test_negatives.parquet").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.dat"]


def test_kill_after_the_exchange_leaves_the_new_dataset(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    assert prep(src, out, "--seed", "1").exit_code == 0
    r = killed_cli("prep", src, "-o", out, "--test-negatives", "1", "--seed", "2", "--force",
                   at="fastattrec.atomic:_discard", before=True)
    assert r.returncode == 137, r.stderr
    assert load_prepared(out).meta["params"]["seed"] in (1, 2)
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert stale  # the old copy, not yet deleted
    assert prep(src, out, "--seed", "3", "--force").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.dat"]


def test_stale_temporaries_of_a_killed_prep_are_removed(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    r = killed_cli("prep", src, "-o", out, "--test-negatives", "1", "--streaming",
                   at="fastattrec.data.prepare:write_parquet", before=True)
    assert r.returncode == 137, r.stderr
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert any(".tmp-" in n for n in left), left
    assert prep(src, out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.dat"]


def test_recorded_temporaries_are_cleaned_and_the_only_copy_kept(tmp_path):
    target = tmp_path / "t"
    aside = tmp_path / ".t.old-123"
    write(aside / "meta.json", "{}")
    partial = write(tmp_path / ".t.tmp-abcd_123" / "x", "partial").parent
    # What a killed holder leaves: its pid, then each temporary it created.
    lock_path(target).write_text(f"999\n{partial}\n{aside}\n")
    with exclusive_lock(target) as done:
        pass
    assert (target / "meta.json").exists() and not aside.exists() and not partial.exists()
    assert target in done and partial in done


def test_files_that_only_look_like_temporaries_are_left_alone(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    mine = [write(tmp_path / ".out.tmp-precious", "precious"),
            write(tmp_path / ".out.tmp-dir" / "f", "x"),
            write(tmp_path / ".out.old-1234", "precious")]
    assert prep(src, tmp_path / "out").exit_code == 0
    assert all(p.read_text() in ("precious", "x") for p in mine)
    assert remove_stale(tmp_path / "out", []) == []


def test_lock_file_of_a_killed_command_does_not_block(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    lock_path(out).write_text("999999")  # left by a process that no longer exists
    time.sleep(0.01)
    assert prep(src, out).exit_code == 0
    assert not lock_path(out).exists()


# ---- the audit's second round: more cases of each class ---------------------------------

def test_prep_force_keeps_the_users_files_in_a_dataset_folder(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "ds"
    assert prep(src, out).exit_code == 0
    notes = write(out / "notes.txt", "mine")
    msg = one_line_error(prep(src, out, "--force"))
    assert "notes.txt" in msg and "did not write" in msg
    assert notes.read_text() == "mine"


def test_output_symlink_is_followed_and_kept(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    real = tmp_path / "real"
    assert prep(src, real, "--seed", "1").exit_code == 0
    link = tmp_path / "link"
    link.symlink_to(real)
    assert prep(src, link, "--seed", "2", "--force").exit_code == 0
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / "meta.json").read_text())["params"]["seed"] == 2
    loop = tmp_path / "loop1"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    assert "loops" in one_line_error(prep(src, loop))


def test_pipes_and_binary_files_are_named(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error(prep(fifo, tmp_path / "o1"))
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 40)
    for fmt in ("ml-1m", "ml-100k", "sequence-pairs", "sequence-lines", "csv"):
        msg = one_line_error(prep(blob, tmp_path / "o2", "--format", fmt))
        assert "binary file" in msg, fmt
    import polars as pl

    pl.read_csv(src, separator=":", has_header=False).write_parquet(tmp_path / "x.parquet")
    msg = one_line_error(prep(tmp_path / "x.parquet", tmp_path / "o3", "--format", "ml-1m"))
    assert "is a Parquet file" in msg and "--format parquet" in msg


def test_full_disk_names_the_file_in_every_place(tmp_path, monkeypatch):
    import errno

    import fastattrec.outputs as outputs

    src = write(tmp_path / "r.dat", TINY_ML1M)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "write", full)
    msg = one_line_error(prep(src, tmp_path / "out"))
    assert ".out.lock" in msg and "free some space" in msg


def test_a_log_changed_while_prep_reads_it_is_refused(tmp_path, monkeypatch):
    import fastattrec.data.prepare as prep_mod

    src = write(tmp_path / "r.dat", TINY_ML1M)
    real = prep_mod._read_log

    def read_then_change(source, tmp, opts):
        out = real(source, tmp, opts)
        source.write_text(TINY_ML1M + "9::10::5::1\n9::20::5::2\n")  # replaced meanwhile
        return out

    monkeypatch.setattr(prep_mod, "_read_log", read_then_change)
    msg = one_line_error(prep(src, tmp_path / "out"))
    assert "changed while prep was reading it" in msg
    assert not (tmp_path / "out").exists()


def test_a_fifo_output_is_refused_not_waited_on(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    fifo = tmp_path / "of"
    os.mkfifo(fifo)
    for args in (("synth", "-o", fifo, "--force"), ("prep", src, "-o", fifo, "--force")):
        msg = one_line_error(cli(*args))
        assert "not a regular file or folder" in msg


def test_a_failed_command_removes_the_folders_it_made_for_its_output(tmp_path):
    """-o a/b/out on a bad input or a missing dataset leaves no empty a/ or a/b/ behind;
    a folder that was there before, or that holds something else, stays."""
    bad = write(tmp_path / "bad.csv", "user,item,time\n1,2,x\n")
    r = prep(bad, tmp_path / "a" / "b" / "out")
    assert r.exit_code != 0 and "'x' is not a date" in r.output
    assert not (tmp_path / "a").exists()
    r = cli("train", tmp_path / "missing", "-o", tmp_path / "runs" / "r1")
    assert r.exit_code != 0 and "does not exist" in r.output
    assert not (tmp_path / "runs").exists()
    (tmp_path / "kept" / "other").mkdir(parents=True)
    r = prep(bad, tmp_path / "kept" / "new" / "out")
    assert r.exit_code != 0
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["other"]
    good = write(tmp_path / "ratings.dat", TINY_ML1M)
    assert prep(good, tmp_path / "made" / "out").exit_code == 0
    assert (tmp_path / "made" / "out").is_dir()


def test_the_first_refusal_offers_force_only_where_force_would_work(tmp_path):
    """Without --force, an existing output fastattrec made is refused with the --force
    hint; a folder of the user's is refused saying --force would not replace it either."""
    src = write(tmp_path / "ratings.dat", TINY_ML1M)
    assert prep(src, tmp_path / "data").exit_code == 0
    msg = one_line_error(prep(src, tmp_path / "data"))
    assert "already exists; pass --force to replace it" in msg
    mine = tmp_path / "mine"
    write(mine / "notes.txt", "mine")
    for r in (prep(src, mine), cli("train", tmp_path / "data", "-o", mine, "--epochs", "1")):
        msg = one_line_error(r)
        assert "pass --force" not in msg and "did not make" in msg or \
            "is not a fastattrec run" in msg, msg
    assert (mine / "notes.txt").read_text() == "mine"
    assert cli("train", tmp_path / "data", "-o", tmp_path / "run", "--epochs", "1",
               "--device", "cpu").exit_code == 0
    msg = one_line_error(cli("train", tmp_path / "data", "-o", tmp_path / "run"))
    assert "already holds a run" in msg and "--force" in msg and "--resume" in msg
