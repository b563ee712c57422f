"""The run folder: checkpoints load safely or fail in one sentence, the checkpoint is the
commit point (logs never run ahead of it, a kill anywhere leaves a resumable run), resume
refuses other data, --force clears the old run, and a diverged run stops unsaved."""

import csv
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from fastattrec.data.prepare import PrepOptions, prepare
from fastattrec.data.synth import synthesize
from fastattrec.training import TrainConfig, train

from helpers import cli, killed_cli, synthetic_dataset

SMALL = dict(dim=8, batch_size=128, eval_every=2, device="cpu", compile=False)
ARGS = ("--dim", "8", "--batch-size", "128", "--eval-every", "2", "--device", "cpu",
        "--no-compile")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runfolder")
    return synthetic_dataset(root, 60, 200, 3000, seed=3, clusters=6, test_negatives=20)


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    train(data_dir, run, TrainConfig(epochs=4, **SMALL), log=print)
    return run


def error_line(r):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and "Aborted" not in r.output, r.output
    return r.output.strip().splitlines()[-1]


def log_epochs(run):
    rows = list(csv.reader((run / "log.csv").open()))[1:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [int(r[0]) for r in rows], [json.loads(x)["epoch"] for x in lines]


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


# ---- checkpoints: safe loading, damaged files -----------------------------------------

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_crafted_checkpoint_cannot_run_code(finished, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for f in ("config.json",):
        (run / f).write_bytes((finished / f).read_bytes())
    torch.save({"epoch": 1, "model": _Evil()}, run / "checkpoint.pt")
    monkeypatch.chdir(tmp_path)
    for args in (("evaluate", run), ("train", "--resume", run)):
        msg = error_line(cli(*args))
        assert "refused as unsafe" in msg
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not a dict"])
def test_damaged_checkpoints_are_one_sentence(finished, tmp_path, damage):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes((finished / "config.json").read_bytes())
    good = (finished / "checkpoint.pt").read_bytes()
    data = {"empty": b"", "truncated": good[: len(good) // 2], "garbage": b"\x00junk" * 50,
            "not a dict": pickle.dumps([1, 2, 3])}[damage]
    (run / "checkpoint.pt").write_bytes(data)
    for args in (("evaluate", run), ("train", "--resume", run),
                 ("recommend", run, "--user", "1")):
        msg = error_line(cli(*args))
        assert "checkpoint.pt" in msg and ("cannot be loaded" in msg or "not a fastattrec" in msg)


@pytest.mark.parametrize("text", ["", "[]", "{not json", '{"train": 5}'])
def test_damaged_config_is_one_sentence(finished, tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes((finished / "checkpoint.pt").read_bytes())
    (run / "config.json").write_text(text)
    for args in (("evaluate", run), ("train", "--resume", run)):
        msg = error_line(cli(*args))
        assert "config.json" in msg


def test_run_dir_that_is_a_file(tmp_path, data_dir):
    f = tmp_path / "f"
    f.write_text("x")
    assert "is a file" in error_line(cli("train", data_dir, "-o", f, *ARGS))
    assert "is a file" in error_line(cli("train", data_dir, "-o", f, "--force", *ARGS))
    assert f.read_text() == "x"
    assert "is a file" in error_line(cli("train", data_dir, "-o", f / "run", *ARGS))
    assert "is a file" in error_line(cli("evaluate", f))
    assert "is a file" in error_line(cli("train", "--resume", f))


# ---- the checkpoint is the commit point -------------------------------------------------

def test_kill_between_checkpoint_and_logs_then_resume_is_exact(data_dir, finished, tmp_path):
    run = tmp_path / "run"
    # write_logs: call 1 at the start, call k+1 after epoch k's checkpoint. Die before the
    # logs of epoch 3 are written: checkpoint.pt holds epoch 3, the logs epoch 2.
    r = killed_cli("train", data_dir, "-o", run, "--epochs", "4", *ARGS,
                   at="fastattrec.training.checkpoint:write_logs", nth=4, before=True)
    assert r.returncode == 137, r.stderr
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    csv_epochs, jsonl_epochs = log_epochs(run)
    assert max(jsonl_epochs) <= ckpt["epoch"] and max(csv_epochs) <= ckpt["epoch"]
    assert not list(run.glob(".*.tmp-*"))
    r = cli("train", "--resume", run)
    assert r.exit_code == 0, r.output
    a, b = weights(finished / "checkpoint.pt"), weights(run / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log_epochs(run) == ([2, 4], [1, 2, 3, 4])


def test_kill_before_a_checkpoint_rename_keeps_logs_behind(data_dir, tmp_path):
    run = tmp_path / "run"
    # Die before epoch 2's checkpoint.pt is written (best.pt of epoch 2 may be there).
    r = killed_cli("train", data_dir, "-o", run, "--epochs", "4", *ARGS,
                   at="fastattrec.training.checkpoint:save_checkpoint", nth=2, before=True,
                   match="checkpoint.pt")
    assert r.returncode == 137, r.stderr
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert log_epochs(run) == ([], [1])
    assert cli("train", "--resume", run).exit_code == 0
    assert log_epochs(run) == ([2, 4], [1, 2, 3, 4])


def test_half_written_checkpoint_of_a_killed_run_is_cleaned_up(data_dir, tmp_path):
    run = tmp_path / "run"
    # Die right after torch.save wrote epoch 2's temporary file, before its rename.
    r = killed_cli("train", data_dir, "-o", run, "--epochs", "3", *ARGS,
                   at="torch:save", nth=2, match="checkpoint.pt")
    assert r.returncode == 137, r.stderr
    assert list(run.glob(".checkpoint.pt.tmp-*"))
    assert cli("train", "--resume", run).exit_code == 0
    assert not list(run.glob(".*.tmp-*"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 3


def test_kill_before_the_first_checkpoint_can_be_resumed(data_dir, finished, tmp_path):
    run = tmp_path / "run"
    r = killed_cli("train", data_dir, "-o", run, "--epochs", "4", *ARGS,
                   at="fastattrec.training.checkpoint:save_checkpoint", nth=1, before=True)
    assert r.returncode == 137, r.stderr
    assert (run / "config.json").exists() and not (run / "checkpoint.pt").exists()
    msg = error_line(cli("train", data_dir, "-o", run, *ARGS))
    assert "--resume" in msg
    r = cli("train", "--resume", run)
    assert r.exit_code == 0, r.output
    a, b = weights(finished / "checkpoint.pt"), weights(run / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_force_clears_the_old_run_first(data_dir, finished, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in finished.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    (run / "eval.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    # Killed before the new run's first checkpoint: no old model may remain to be scored.
    r = killed_cli("train", data_dir, "-o", run, "--force", "--epochs", "1", *ARGS,
                   at="fastattrec.training.checkpoint:save_checkpoint", nth=1, before=True)
    assert r.returncode == 137, r.stderr
    for f in ("checkpoint.pt", "best.pt", "eval.json"):
        assert not (run / f).exists(), f
    assert log_epochs(run) == ([], [])  # the new run's logs: no epoch yet
    assert (run / "notes.txt").read_text() == "mine"
    assert "has not finished an epoch" in error_line(cli("evaluate", run))


def test_force_with_a_typo_in_the_data_keeps_the_old_run(finished, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for f in finished.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    msg = error_line(cli("train", tmp_path / "no-such-data", "-o", run, "--force", *ARGS))
    assert "does not exist" in msg
    assert (run / "checkpoint.pt").read_bytes() == (finished / "checkpoint.pt").read_bytes()


def test_force_refuses_a_folder_that_is_not_a_run(data_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    msg = error_line(cli("train", data_dir, "-o", mine, "--force", *ARGS))
    assert "did not make" in msg
    msg = error_line(cli("train", data_dir, "-o", data_dir, "--force", *ARGS))
    assert "input" in msg
    assert (mine / "thesis.tex").read_text() == "keep"


# ---- resume refuses other data ----------------------------------------------------------

def test_resume_refuses_a_dataset_prepared_again(data_dir, tmp_path):
    src = data_dir.parent / "r.dat"
    data = tmp_path / "data"
    prepare(src, data, PrepOptions(test_negatives=20, seed=0))
    run = tmp_path / "run"
    train(data, run, TrainConfig(epochs=1, **SMALL), log=print)
    prepare(src, data, PrepOptions(test_negatives=20, seed=9), force=True)
    msg = error_line(cli("train", "--resume", run, "--epochs", "2"))
    assert "is not the dataset" in msg
    msg = error_line(cli("evaluate", run))
    assert "prepared again" in msg
    # Prepared again exactly as before: accepted.
    prepare(src, data, PrepOptions(test_negatives=20, seed=0), force=True)
    assert cli("train", "--resume", run, "--epochs", "2").exit_code == 0


# ---- divergence -------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [("--lr", "1e30"), ("--embed-reg", "1e38")])
def test_a_diverging_run_stops_unsaved(data_dir, tmp_path, opts):
    run = tmp_path / "run"
    r = cli("train", data_dir, "-o", run, "--epochs", "3", *ARGS, *opts)
    msg = error_line(r)
    assert "diverged in epoch" in msg and "lower --lr" in msg
    if (run / "checkpoint.pt").exists():  # only epochs before the divergence are kept
        ck = torch.load(run / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["model"].values())
        assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in ck["history"])


@pytest.mark.parametrize("opt,value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-1"),
                                       ("--embed-reg", "nan"), ("--w", "nan"),
                                       ("--gamma", "inf")])
def test_non_finite_options_are_refused(data_dir, tmp_path, opt, value):
    msg = error_line(cli("train", data_dir, "-o", tmp_path / "run", opt, value, *ARGS))
    assert opt in msg
    assert not (tmp_path / "run").exists()


def test_estimated_memory_refuses_impossible_sizes(data_dir, tmp_path):
    msg = error_line(cli("train", data_dir, "-o", tmp_path / "run", "--maxlen", "100000000",
                         *ARGS))
    assert "GiB" in msg and "--maxlen" in msg


# ---- evaluate and recommend: options and outputs -----------------------------------------

@pytest.mark.parametrize("k", ["0", "-1"])
def test_evaluate_refuses_k_below_one_and_keeps_eval_json(finished, k):
    (finished / "eval.json").write_text('{"kept": true}')
    msg = error_line(cli("evaluate", finished, "-k", k))
    assert "-k must be a whole number from 1" in msg
    assert json.loads((finished / "eval.json").read_text()) == {"kept": True}


def test_evaluate_in_a_read_only_run_folder(finished, monkeypatch):
    import errno

    import fastattrec.atomic as atomic

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    r = cli("evaluate", finished)
    assert "HR@10" in r.output  # the metrics are printed
    msg = error_line(r)
    assert "were not saved" in msg and "Read-only file system" in msg


def test_full_disk_during_training_is_one_sentence(data_dir, tmp_path, monkeypatch):
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", full)
    msg = error_line(cli("train", data_dir, "-o", tmp_path / "run", "--epochs", "1", *ARGS))
    assert "cannot write" in msg and ("checkpoint.pt" in msg or "best.pt" in msg)
    assert not list((tmp_path / "run").glob(".*.tmp-*"))


def test_recommend_never_returns_seen_items_when_k_exceeds_the_unseen(tmp_path):
    # 4 items; user 2 has seen 3 of them, so only item 4 can be recommended to them.
    from helpers import write

    src = write(tmp_path / "r.dat", "1::1::5::1\n1::2::5::2\n2::3::5::1\n2::1::5::2\n"
                                    "2::2::5::3\n2::3::5::4\n3::1::5::1\n3::3::5::2\n4::4::5::1\n"
                                    "4::1::5::2\n")
    prepare(src, tmp_path / "data", PrepOptions(test_negatives=1))
    data = tmp_path / "data"
    assert cli("train", data, "-o", tmp_path / "run", "--epochs", "1", *ARGS).exit_code == 0
    r = cli("recommend", tmp_path / "run", "--user", "2", "-k", "10")
    assert r.exit_code == 0, r.output
    assert r.output.count("item ") == 1 and "item 4 " in r.output
    assert "only 1 items are unseen" in r.output
    out = tmp_path / "recs.parquet"
    r = cli("recommend", tmp_path / "run", "--all-users", "-o", out, "-k", "10")
    assert r.exit_code == 0, r.output
    import polars as pl

    recs = pl.read_parquet(out)
    assert recs.height == 2 + 1 + 2 + 2  # each user's unseen items, no more
    assert recs.filter(pl.col("raw_user") == 2).get_column("raw_item").to_list() == [4]
    assert sorted(recs.filter(pl.col("raw_user") == 1).get_column("raw_item")) == [3, 4]
    assert recs.get_column("score").is_finite().all()


def test_recommend_output_rules(finished, tmp_path):
    out = tmp_path / "recs.parquet"
    base = ("recommend", finished, "--all-users", "-k", "2")
    assert cli(*base, "-o", out).exit_code == 0
    assert "already exists" in error_line(cli(*base, "-o", out))
    assert cli(*base, "-o", out, "--force").exit_code == 0
    mine = tmp_path / "mine.parquet"
    mine.write_bytes(b"my own file")
    assert "did not make" in error_line(cli(*base, "-o", mine, "--force"))
    assert mine.read_bytes() == b"my own file"
    (tmp_path / "d").mkdir()
    assert "folder" in error_line(cli(*base, "-o", tmp_path / "d", "--force"))
    assert "input" in error_line(cli(*base, "-o", finished, "--force"))
    assert "give one of them" in error_line(cli("recommend", finished, "--user", "1",
                                                "-o", out, "--json"))


def test_recommend_movies_file_problems(finished, tmp_path):
    from helpers import write

    assert "is a folder" in error_line(cli("recommend", finished, "--user", "1", "--movies",
                                           tmp_path))
    bad = write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation\nnot a movie line\n")
    msg = error_line(cli("recommend", finished, "--user", "1", "--movies", bad))
    assert "movies.dat, line 2" in msg


def test_evaluate_during_another_command_on_the_run_does_not_write(finished):
    from fastattrec.outputs import exclusive_lock

    (finished / "eval.json").unlink(missing_ok=True)
    with exclusive_lock(finished):  # as a training or --force run would hold it
        r = cli("evaluate", finished)
    assert "HR@10" in r.output
    assert "not saved" in error_line(r) and "in use" in r.output
    assert not (finished / "eval.json").exists()
    assert cli("evaluate", finished).exit_code == 0
    assert (finished / "eval.json").exists()


# ---- the audit's second round ------------------------------------------------------------

def copy_run(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_recommend_refuses_non_finite_scores(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    for k in ("user_emb", "item_emb", "item2_emb"):
        ck["model"][k] = torch.full_like(ck["model"][k], 3e38)  # finite, but products overflow
    torch.save(ck, run / "checkpoint.pt")
    msg = error_line(cli("recommend", run, "--user", "1", "-k", "3"))
    assert "not finite" in msg and "lower --lr" in msg


def test_movies_file_with_a_repeated_id_or_the_wrong_shape(finished, tmp_path):
    from helpers import write

    dup = write(tmp_path / "movies.dat", "1::A (1995)::Drama\n2::B (1996)::Drama\n"
                                         "1::A again::Drama\n")
    msg = error_line(cli("recommend", finished, "--user", "1", "--movies", dup))
    assert "line 3" in msg and "MovieID 1 already appeared on line 1" in msg
    ratings = write(tmp_path / "ratings.dat", "1::10::5::100\n")
    msg = error_line(cli("recommend", finished, "--user", "1", "--movies", ratings))
    assert "line 1" in msg and "MovieID::Title::Genres" in msg


def test_evaluate_with_data_of_another_fingerprint_is_refused(finished, tmp_path):
    other = tmp_path / "other"
    synthesize(tmp_path / "o.dat", 60, 200, 3000, seed=9, clusters=6)
    prepare(tmp_path / "o.dat", other, PrepOptions(test_negatives=20))
    msg = error_line(cli("evaluate", finished, "--data", other))
    assert "is not the dataset" in msg
    data = json.loads((finished / "config.json").read_text())["train"]["data_dir"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in Path(data).iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert cli("evaluate", finished, "--data", copy).exit_code == 0
    ev = json.loads((finished / "eval.json").read_text())
    assert ev["data"]["path"] == str(copy.resolve()) and len(ev["data"]["fingerprint"]) == 64


@pytest.mark.parametrize("damage", ["padding negative", "negative below zero", "seen negative",
                                    "repeated negative"])
def test_damaged_negatives_are_refused(data_dir, tmp_path, damage):
    import polars as pl

    ds = tmp_path / "ds"
    ds.mkdir()
    for f in data_dir.iterdir():
        (ds / f.name).write_bytes(f.read_bytes())
    seq = pl.read_parquet(ds / "sequences.parquet")
    test = pl.read_parquet(ds / "test_negatives.parquet")
    first_user_items = seq.get_column("item")[:3].to_list()
    if damage == "padding negative":
        test = test.with_columns(pl.lit(0, pl.Int32).alias("neg"))
    elif damage == "negative below zero":
        seq = seq.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(-3)
                               .otherwise(pl.col("neg")).cast(pl.Int32).alias("neg"))
    elif damage == "seen negative":
        test = test.with_columns(pl.when(pl.int_range(pl.len()) == 0)
                                 .then(first_user_items[0]).otherwise(pl.col("neg"))
                                 .cast(pl.Int32).alias("neg"))
    else:
        test = test.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(pl.col("neg").first())
                                 .otherwise(pl.col("neg")).cast(pl.Int32).alias("neg"))
    seq.write_parquet(ds / "sequences.parquet")
    test.write_parquet(ds / "test_negatives.parquet")
    msg = error_line(cli("train", ds, "-o", tmp_path / "run", *ARGS))
    assert "do not agree" in msg


def test_resuming_a_run_that_stopped_early_changes_nothing(data_dir, tmp_path):
    run = tmp_path / "run"
    res = train(data_dir, run, TrainConfig(epochs=40, lr=3e-2, early_stop=1, **SMALL),
                log=print)
    assert res.stopped_early
    before = (run / "checkpoint.pt").read_bytes()
    r = cli("train", "--resume", run, "--epochs", "40")
    assert r.exit_code == 0 and "nothing to resume" in r.output
    assert (run / "checkpoint.pt").read_bytes() == before


def test_divergence_in_the_first_epoch_says_nothing_was_saved(data_dir, tmp_path):
    msg = error_line(cli("train", data_dir, "-o", tmp_path / "r", "--epochs", "2", "--lr",
                         "1e30", *ARGS))
    assert "saved no epoch" in msg and "checkpoint.pt" not in msg


def test_options_edited_in_config_json_are_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["kernel"] = "evil"
    (run / "config.json").write_text(json.dumps(cfg))
    for args in (("evaluate", run), ("recommend", run, "--user", "1")):
        msg = error_line(cli(*args))
        assert "config.json" in msg and "--kernel" in msg


@pytest.mark.parametrize("args,expect", [
    (("--early-stop", "-1"), "--early-stop must not be negative"),
    (("-k", "0"), "-k must be at least 1"),
    (("--seed", str(10**20)), "--seed must be between"),
    (("--threads", "100000"), "--threads"),
    (("--threads", "-1"), "--threads"),
    (("--batch-size", "0"), "--batch-size must be at least 1"),
    (("--w", "1.5"), "--w must be between 0 and 1"),
])
def test_option_errors_name_the_option(data_dir, tmp_path, args, expect):
    r = cli("train", data_dir, "-o", tmp_path / "run", *ARGS, *args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert expect in r.output


def test_a_moved_dataset_is_accepted_by_fingerprint(data_dir, tmp_path):
    """--resume with DATA_DIR, and recommend/evaluate with --data, take a moved copy of the
    dataset the run started on, and nothing else."""
    ds = tmp_path / "ds"
    ds.mkdir()
    for f in data_dir.iterdir():
        (ds / f.name).write_bytes(f.read_bytes())
    run = tmp_path / "run"
    train(ds, run, TrainConfig(epochs=1, **SMALL), log=print)
    moved = tmp_path / "moved"
    ds.rename(moved)
    assert "does not exist" in error_line(cli("train", "--resume", run, "--epochs", "2"))
    assert "does not exist" in error_line(cli("recommend", run, "--user", "1"))
    assert cli("recommend", run, "--user", "1", "--data", moved).exit_code == 0
    r = cli("train", moved, "--resume", run, "--epochs", "2")
    assert r.exit_code == 0, r.output
    assert json.loads((run / "config.json").read_text())["train"]["data_dir"] == str(moved)
    msg = error_line(cli("train", data_dir.parent / "nope", "--resume", run, "--epochs", "3"))
    assert "does not exist" in msg
    other = tmp_path / "other"
    prepare(data_dir.parent / "r.dat", other, PrepOptions(test_negatives=20, seed=5))
    assert "is not the dataset" in error_line(cli("train", other, "--resume", run, "--epochs",
                                                  "3"))


def test_user_ids_are_matched_exactly(finished, tmp_path):
    for raw in ("1_0", " 1", "+1", "\u0661", "99999999999999999999"):
        r = cli("recommend", finished, "--user", raw)
        assert r.exit_code != 0 and "Traceback" not in r.output, raw
    fifo = tmp_path / "mf"
    os.mkfifo(fifo)
    assert "not a regular file" in error_line(cli("recommend", finished, "--user", "1",
                                                  "--movies", fifo))


@pytest.mark.parametrize("field,value,expect", [
    ("epoch", "x", "epoch is"), ("history", "x", "history is"), ("best", None, "best is"),
    ("config", [], "config is"), ("stale", "x", "stale is"),
])
def test_tampered_checkpoint_fields_are_one_sentence(finished, tmp_path, field, value, expect):
    run = copy_run(finished, tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck[field] = value
    torch.save(ck, run / "checkpoint.pt")
    for args in (("evaluate", run, "--checkpoint", "last"), ("train", "--resume", run)):
        msg = error_line(cli(*args))
        assert "not a checkpoint fastattrec wrote" in msg and expect in msg


def test_sparse_or_float64_weights_are_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["model"]["user_emb"] = ck["model"]["user_emb"].double()
    torch.save(ck, run / "checkpoint.pt")
    assert "dense float32" in error_line(cli("evaluate", run, "--checkpoint", "last"))


@pytest.mark.parametrize("version", ['"1"', "true"])
def test_run_format_version_of_the_wrong_type(finished, tmp_path, version):
    run = copy_run(finished, tmp_path / "run")
    text = (run / "config.json").read_text().replace('"run_format_version": 1',
                                                      f'"run_format_version": {version}')
    (run / "config.json").write_text(text)
    msg = error_line(cli("evaluate", run))
    assert "run_format_version" in msg and "edited" in msg


def test_train_negative_that_is_the_users_own_item_is_refused(data_dir, tmp_path):
    import polars as pl

    ds = copy_run(data_dir, tmp_path / "ds")
    seq = pl.read_parquet(ds / "sequences.parquet")
    own = seq.get_column("item")[0]
    seq = seq.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(own)
                           .otherwise(pl.col("neg")).cast(pl.Int32).alias("neg"))
    seq.write_parquet(ds / "sequences.parquet")
    assert "do not agree" in error_line(cli("train", ds, "-o", tmp_path / "run", *ARGS))
    ds2 = copy_run(data_dir, tmp_path / "ds2")
    users = pl.read_parquet(ds2 / "users.parquet")
    users.with_columns(pl.lit(users.get_column("raw_user")[0]).alias("raw_user")).write_parquet(
        ds2 / "users.parquet")
    assert "do not agree" in error_line(cli("train", ds2, "-o", tmp_path / "run2", *ARGS))


# ---- issue 20: the checkpoint's model, resume rules, interruptions, odd places ----------

@pytest.mark.parametrize("key,value", [("maxlen", 50), ("maxlen", 10**12), ("dim", 100),
                                       ("mode", "dist")])
def test_model_options_edited_in_config_json_are_refused(finished, tmp_path, key, value):
    """The checkpoint's own model_config is the truth: an edited train.maxlen used to make
    evaluate crash on a size mismatch (or allocate terabytes)."""
    run = copy_run(finished, tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    was = cfg["train"][key]
    cfg["train"][key] = value
    (run / "config.json").write_text(json.dumps(cfg))
    flag = "--" + key
    for args in (("evaluate", run), ("recommend", run, "--user", "1")):
        msg = error_line(cli(*args))
        assert f"config.json says {flag} {value} but the model in" in msg
        assert f"was trained with {flag} {was}" in msg and f"set train.{key} back" in msg


def test_a_checkpoint_whose_model_config_is_impossible_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    ck["model_config"]["maxlen"] = 0
    torch.save(ck, run / "checkpoint.pt")
    msg = error_line(cli("evaluate", run, "--checkpoint", "last"))
    assert "checkpoint.pt holds a model configuration" in msg and "--maxlen" in msg


def test_resume_refuses_fewer_epochs_than_done(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    config = (run / "config.json").read_bytes()
    msg = error_line(cli("train", "--resume", run, "--epochs", "1"))
    assert msg.endswith(f"fewer than the 4 epochs {run} has done; give --epochs 4 or more.")
    assert (run / "config.json").read_bytes() == config  # not rewritten to 1 epoch


def test_resume_with_force_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "run")
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    msg = error_line(cli("train", "--resume", run, "--force"))
    assert "--force" in msg and "--resume" in msg and "give one of them" in msg
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before


def test_resume_accepts_the_runs_own_option_values(data_dir, tmp_path):
    run = tmp_path / "run"
    assert cli("train", data_dir, "-o", run, "--epochs", "1", *ARGS).exit_code == 0
    r = cli("train", "--resume", run, "--epochs", "2", *ARGS)  # the same options again
    assert r.exit_code == 0, r.output
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 2
    msg = error_line(cli("train", "--resume", run, "--epochs", "3", *ARGS[:-1], "--dim", "9"))
    assert ("only --epochs, --device and --time-budget may change (got --dim 9 (the run's: "
            "--dim 8))") in msg


def test_a_full_disk_while_saving_a_checkpoint_says_so(data_dir, tmp_path, monkeypatch):
    """torch's zip writer reports a short write as 'unexpected pos'; with no space left
    the message says so (the disk is simulated: half the file written, then nothing)."""
    import shutil

    real_save = torch.save

    def short_write(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        Path(f).write_bytes(Path(f).read_bytes()[:100])
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2240 "
                           "vs 2134")

    monkeypatch.setattr(torch, "save", short_write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9,
                                                                                  4096))
    msg = error_line(cli("train", data_dir, "-o", tmp_path / "run", "--epochs", "1", *ARGS))
    assert "no space left on device (0.0 MiB free, the checkpoint needs about" in msg
    assert f"fastattrec train --resume {tmp_path / 'run'}" in msg
    assert "enforce fail" not in msg
    assert not list((tmp_path / "run").glob(".*.tmp-*"))


def test_more_threads_than_cores_is_warned_about(data_dir, tmp_path, monkeypatch):
    import fastattrec.training.system as system

    monkeypatch.setattr(system.os, "sched_getaffinity", lambda pid: {0, 1})
    threads = torch.get_num_threads()
    try:
        r = cli("train", data_dir, "-o", tmp_path / "run", "--epochs", "1", "--threads",
                "8", *ARGS)
        assert r.exit_code == 0, r.output
        said = [line for line in r.output.splitlines() if "more than the" in line]
        assert len(said) == 1 and "--threads 8 is more than the 2 cores" in said[0]
        assert ".py:" not in r.output  # one sentence, not a Python warning with its source
    finally:
        torch.set_num_threads(threads)


def test_paths_with_a_newline_are_printed_on_one_line(data_dir, tmp_path):
    odd = tmp_path / "new\nline"
    for args in (("evaluate", odd), ("train", odd, "-o", tmp_path / "run", *ARGS),
                 ("train", "--resume", odd)):
        r = cli(*args)
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
        assert "$'" + str(tmp_path) + "/new\\nline'" in r.output


def test_prep_and_synth_paths_with_a_newline_stay_on_one_line(tmp_path):
    """Every CLI error is one printed line, whatever the file name holds."""
    odd = tmp_path / "bad\nname"
    for args in (("prep", odd, "-o", tmp_path / "x"), ("synth", "-o", tmp_path)):
        r = cli(*args)
        assert r.exit_code != 0
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error:"), r.output
    odd.mkdir()
    (odd / "meta.json").write_text("{}")
    r = cli("synth", "-o", odd)
    assert r.exit_code != 0 and "\\n" in r.output and len(r.output.strip().splitlines()) == 1


def test_a_dataset_folder_given_as_a_run_says_what_it_is(data_dir):
    r = cli("evaluate", data_dir)
    assert r.exit_code != 0
    assert r.output.strip().splitlines()[-1].endswith(
        "is a prepared dataset, not a run; train one with "
        f"`fastattrec train {data_dir} -o RUN_DIR`.")
