"""The lock file `.NAME.lock` cannot be turned against the user: a list of paths planted
or damaged in it deletes nothing but the output's own temporaries, a lock that is a
symbolic link, a hard link or another user's file is never written, and "in use" names
only the holder's process id, on one line."""

import os
import shutil
import subprocess
import sys

import pytest

import fastattrec.outputs as outputs
from fastattrec.training import TrainConfig, train

from helpers import TINY_ML1M, cli, killed_cli, synthetic_dataset, write

ROOT = os.geteuid() == 0
OTHER_UID = 54321  # a user id that is not the one running the tests


def error_line(r):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output, r.output
    return r.output.strip().splitlines()[-1]


def snapshot(root):
    """Every file's bytes and every folder under `root` (and `root` itself)."""
    if root.is_file():
        return {".": root.read_bytes()}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "dir")
            for p in [root, *sorted(root.rglob("*"))]}


def victims(shared):
    """A folder and a file of the user's in the shared folder, as an attacker targets."""
    write(shared / "victim" / "thesis.tex", "years of work")
    (shared / "victim" / "sub").mkdir(exist_ok=True)
    (shared / "victim" / "sub" / "data.bin").write_bytes(bytes(range(256)))
    write(shared / "notes.txt", "my notes\n")
    return [shared / "victim", shared / "notes.txt"]


def plant(out, lines):
    """The lock file of `out`, written as an attacker would: a pid, then paths."""
    lock = outputs.lock_path(out)
    lock.write_bytes(b"1\n" + b"".join(os.fsencode(str(p)) + b"\n" for p in lines))
    return lock


def foreign(lock, how, monkeypatch):
    """Make `lock` another user's file: chown it (root only), or have fstat say so."""
    if how == "chown":
        if not ROOT:
            pytest.skip("chown to another user needs root")
        os.chown(lock, OTHER_UID, -1)
        return
    planted, real = os.lstat(lock), os.fstat

    def fstat(fd):
        st = real(fd)
        if (st.st_dev, st.st_ino) != (planted.st_dev, planted.st_ino):
            return st
        fields = list(st[:10])
        fields[4] = os.geteuid() + 1  # st_uid
        return os.stat_result(fields)

    monkeypatch.setattr(outputs.os, "fstat", fstat)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A small finished run folder (one epoch); tests copy it."""
    root = tmp_path_factory.mktemp("locks")
    data = synthetic_dataset(root, 40, 100, 1500, seed=2, clusters=4, test_negatives=10)
    run = root / "run"
    train(data, run, TrainConfig(epochs=1, dim=8, batch_size=128, device="cpu",
                                 compile=False), log=print)
    return run


# ---- D1: a planted list deletes nothing that is not the output's own temporary ---------

def attack_list(shared, out, mine):
    """What an attacker lists: the victims, the output or its files, paths that only lead
    to a temporary-like name through '..', a relative path; plus `mine`."""
    return [*victims(shared), out, out / "meta.json", shared / ".out.tmp-abcd1234" / ".." /
            "victim", shared / "victim" / ".." / ".out.tmp-abcd1234", "victim", *mine]


@pytest.mark.parametrize("existing", [False, True])
def test_prep_with_a_planted_list_deletes_only_its_own_temporaries(tmp_path, existing):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    shared = tmp_path / "shared"
    out = shared / "out"
    if existing:
        assert cli("prep", src, "-o", out, "--test-negatives", "1").exit_code == 0
    # A real leftover of an interrupted prep on `out`, and one named like it that is not
    # beside `out` (in the victim folder): only the first may go.
    stale = write(shared / ".out.tmp-abcd1234" / "part.parquet", "partial").parent
    plant(out, attack_list(shared, out, [stale, shared / "victim" / ".out.tmp-abcd1234"]))
    write(shared / "victim" / ".out.tmp-abcd1234", "mine too")
    before = {p: snapshot(p) for p in [*victims(shared), *([out] if existing else [])]}
    r = cli("prep", src, "-o", out, "--test-negatives", "1")
    if existing:
        assert "already exists" in error_line(r)
    else:
        assert r.exit_code == 0, r.output
    assert {p: snapshot(p) for p in before} == before
    assert not stale.exists() and f"cleaned up {stale} left by" in r.output
    assert r.output.count("cleaned up") == 1
    assert not outputs.lock_path(out).exists()


@pytest.mark.skipif(not ROOT, reason="a file of another user's needs root to make")
def test_a_listed_temporary_of_another_user_is_left_alone(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    theirs = write(tmp_path / ".out.tmp-abcd1234" / "f", "theirs").parent
    os.chown(theirs, OTHER_UID, -1)
    plant(tmp_path / "out", [theirs])
    r = cli("prep", src, "-o", tmp_path / "out", "--test-negatives", "1")
    assert r.exit_code == 0, r.output
    assert (theirs / "f").read_text() == "theirs" and "cleaned up" not in r.output


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_evaluate_with_a_planted_list_beside_the_run(run_dir, tmp_path):
    shared = tmp_path / "shared"
    run = copy_run(run_dir, shared / "run")
    (run / "eval.json").unlink(missing_ok=True)
    plant(run, [*victims(shared), run, run / "checkpoint.pt", run / "config.json"])
    before = {p: snapshot(p) for p in victims(shared)}
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    r = cli("evaluate", run)
    assert r.exit_code == 0, r.output
    assert {p: snapshot(p) for p in before} == before
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "eval.json"} == files
    assert (run / "eval.json").exists() and "cleaned up" not in r.output


def test_train_with_a_planted_list_inside_and_beside_the_run(run_dir, tmp_path):
    shared = tmp_path / "shared"
    run = copy_run(run_dir, shared / "run")
    write(run / "mine.txt", "kept")
    plant(run, [*victims(shared), run / "mine.txt", run / "checkpoint.pt", run])
    before = {p: snapshot(p) for p in [*victims(shared), run]}
    data = run_dir.parent / "data"
    assert "already holds a run" in error_line(cli("train", data, "-o", run))
    assert {p: snapshot(p) for p in before} == before


# ---- lock files that are not fastattrec's: refused, never written ------------------------

@pytest.mark.parametrize("how", ["chown", "fstat"])
def test_a_lock_file_of_another_user_is_refused(tmp_path, monkeypatch, how):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    lock = plant(out, victims(tmp_path))
    before = {p: snapshot(p) for p in [*victims(tmp_path), lock]}
    foreign(lock, how, monkeypatch)
    msg = error_line(cli("prep", src, "-o", out, "--test-negatives", "1"))
    assert msg == (f"Error: {lock} is not a lock file fastattrec can use (it belongs to another "
                   f"user (uid {OTHER_UID if how == 'chown' else os.geteuid() + 1})); have "
                   f"its owner remove it or choose another output.")
    assert {p: snapshot(p) for p in before} == before and not out.exists()


def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    notes = write(tmp_path / "notes.txt", "my notes\n")
    lock = outputs.lock_path(tmp_path / "out2")
    lock.symlink_to("notes.txt")  # ln -s notes.txt .out2.lock
    msg = error_line(cli("prep", src, "-o", tmp_path / "out2", "--test-negatives", "1"))
    assert msg == (f"Error: {lock} is not a lock file fastattrec can use (it is a symbolic link); "
                   f"remove it or choose another output.")
    assert notes.read_bytes() == b"my notes\n" and not (tmp_path / "out2").exists()
    # A link to nothing is not followed either: its target is not created.
    outputs.lock_path(tmp_path / "out3").symlink_to("created")
    assert "symbolic link" in error_line(cli("prep", src, "-o", tmp_path / "out3"))
    assert not (tmp_path / "created").exists()


def test_a_hard_linked_lock_file_is_refused_and_the_other_file_kept(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    notes = write(tmp_path / "notes.txt", "my notes\n")
    os.link(notes, outputs.lock_path(tmp_path / "out"))
    msg = error_line(cli("prep", src, "-o", tmp_path / "out"))
    assert "it has other hard links" in msg and ".out.lock" in msg
    assert notes.read_bytes() == b"my notes\n"


def test_symlinked_lock_beside_a_run_for_train_and_evaluate(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    (run / "eval.json").unlink(missing_ok=True)
    notes = write(tmp_path / "notes.txt", "my notes\n")
    outputs.lock_path(run).symlink_to(notes)
    r = cli("evaluate", run)
    assert "HR@10" in r.output  # the metrics are printed, not saved
    msg = error_line(r)
    assert "not saved to eval.json" in msg and "symbolic link" in msg
    assert not (run / "eval.json").exists()
    msg = error_line(cli("train", "--resume", run))
    assert "symbolic link" in msg and ".run.lock" in msg
    assert notes.read_bytes() == b"my notes\n"


# ---- D7: the holder named by its process id only, on one line --------------------------

_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, bytes.fromhex(sys.argv[2]))
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(60)
"""


def hold(lock, content: bytes):
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock), content.hex()],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


@pytest.mark.parametrize("content, who", [
    (b"965\n{run}/.config.json.tmp-abcd1234\n", " (process 965)"),
    (b"\xff\xfe\x00\x1b[2J garbage\nmore\n", ""),
    (b"", ""),
])
def test_in_use_names_only_the_process_id(tmp_path, run_dir, content, who):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    holder = hold(outputs.lock_path(out), content.replace(b"{run}", bytes(tmp_path)))
    try:
        r = cli("prep", src, "-o", out)
        assert error_line(r) == (f"Error: {out} is in use by another fastattrec command{who}; wait "
                                 f"for it to finish or choose another output.")
        assert len(r.output.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    run = copy_run(run_dir, tmp_path / "run")
    holder = hold(outputs.lock_path(run), content.replace(b"{run}", bytes(run)))
    try:
        msg = error_line(cli("evaluate", run))
        assert msg.endswith(f"{run} is in use by another fastattrec command{who}; wait for "
                            f"it to finish or choose another output.")
    finally:
        holder.kill()
        holder.wait()


def test_garbage_in_a_stale_lock_file_is_ignored(tmp_path):
    src = write(tmp_path / "r.dat", TINY_ML1M)
    out = tmp_path / "out"
    keep = victims(tmp_path)
    before = {p: snapshot(p) for p in keep}
    outputs.lock_path(out).write_bytes(b"\xff\xfe\x00\n" + bytes(keep[0]) + b"\n\xc3(\n" +
                                       bytes(keep[1]) + b"\x00\n" + bytes(range(1, 256)))
    r = cli("prep", src, "-o", out, "--test-negatives", "1")
    assert r.exit_code == 0, r.output
    assert {p: snapshot(p) for p in before} == before and "cleaned up" not in r.output
    assert not outputs.lock_path(out).exists()


# ---- the normal case: an interrupted command's own temporaries still go -----------------

def test_a_killed_synth_leaves_a_record_temporary_that_the_next_one_removes(tmp_path):
    out = tmp_path / "s.dat"
    args = ("synth", "-o", out, "--users", "5", "--items", "20", "--interactions", "40")
    r = killed_cli(*args, at="fastattrec.atomic:_publish_mode", match="synth.json",
                   before=True)
    assert r.returncode == 137, r.stderr
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".s.dat.synth.json.tmp-")]
    assert len(left) == 1
    cli(*args, "--force")  # refused (the log has no record) after the clean-up
    assert not left[0].exists() and not outputs.lock_path(out).exists()
