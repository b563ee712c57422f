"""The `fastattrec` command: each subcommand parses its options and calls one library
function. Heavy imports (torch, polars) happen inside the commands, so `--help` is fast.
This module holds the group and synth, prep, train and download; `cli_results.py` holds
evaluate, recommend and export, `cli_tune.py` tune, `cli_support.py` what they all share."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from fastattrec.cli_results import evaluate, export, recommend
from fastattrec.cli_support import (
    Commands,
    file_stamp,
    interruptible,
    print_metrics,
    say,
    text_table,
    user_errors,
)
from fastattrec.cli_tune import tune
from fastattrec.config import SEED_MAX
from fastattrec.errors import UserError, quoted
from fastattrec.version import VERSION as __version__

# The same list as fastattrec.data.readers.FORMATS (a test checks), kept here so that
# `--help` does not import Polars.
PREP_FORMATS = ["auto", "ml-1m", "ml-100k", "ml-20m", "recbole", "csv", "tsv", "parquet",
                "sequence-pairs", "sequence-lines"]
# A time split evaluating fewer users than this gets a note: its metrics are noisy.
FEW_USERS = 30


def _prep_snapshot(out_dir: Path, **_) -> tuple[int, int] | None:
    return file_stamp(Path(out_dir) / "meta.json")


def _prep_interrupted(before, out_dir: Path, **_) -> str:
    """What an interrupted `prep` left: the dataset is written under a temporary name that
    is removed on the way out, so the output is the old one, or none, or the new one
    complete (when the interrupt came after it was renamed into place)."""
    now = file_stamp(Path(out_dir) / "meta.json")
    if now != before and now is not None:
        return f"interrupted after {quoted(out_dir)} was written: it is complete."
    if before is None:
        return (f"interrupted: nothing was written to {quoted(out_dir)} (the unfinished copy "
                f"was removed); run the same command again.")
    return (f"interrupted: the dataset already in {quoted(out_dir)} is untouched (the "
            f"unfinished copy was removed); run the same command again.")


def _train_snapshot(run_dir: Path | None, resume_dir: Path | None, **_):
    run = resume_dir or run_dir
    return None if run is None else file_stamp(Path(run) / "config.json")


def _train_interrupted(before, run_dir: Path | None, resume_dir: Path | None, **_) -> str:
    """What an interrupted `train` kept: the last committed epoch (checkpoint.pt), or
    nothing, and the command that goes on."""
    from fastattrec.training.checkpoint import CHECKPOINT, CONFIG, committed_epoch

    run = resume_dir or run_dir
    if run is None:
        return "interrupted."
    config = Path(run) / CONFIG
    now = file_stamp(config)
    if now is None or (resume_dir is None and now == before):
        kept = ("the run already there is untouched" if now is not None else
                "nothing was written to it" if before is None else
                "the old run's files were removed (--force) and nothing of the new one "
                "was saved")
        return (f"interrupted before training started: {kept} ({quoted(run)}); run the same "
                f"command again.")
    again = f"`fastattrec train --resume {quoted(run)}`"
    epoch = committed_epoch(Path(run))
    if epoch is None:
        return (f"interrupted before the first epoch was saved: {quoted(run)} keeps only "
                f"the run's options (config.json); start it over with {again}.")
    from fastattrec.outputs import read_json_dict

    train = (read_json_dict(config) or {}).get("train")
    total = train.get("epochs") if isinstance(train, dict) else None
    of = f" of {total}" if isinstance(total, int) else ""
    return (f"interrupted: {quoted(Path(run) / CHECKPOINT)} keeps epoch {epoch}{of}, the last "
            f"one completed; continue with {again}.")


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fastattrec")
def main() -> None:
    """AttRec, the self-attentive sequential recommender: prepare a ratings log, train,
    evaluate and recommend.

    \b
    Typical run:
      fastattrec synth -o demo/ratings.dat              # or use your own ratings file
      fastattrec prep demo/ratings.dat -o demo/data
      fastattrec train demo/data -o demo/run
      fastattrec evaluate demo/run
      fastattrec recommend demo/run --user 1
      fastattrec export demo/run -o model.pt2           # for a serving stack
      fastattrec tune demo/data -o demo/tune            # search options by validation
    """


@main.command()
@click.option("-o", "--output", "output", type=click.Path(path_type=Path), required=True,
              help="File to write (MovieLens-1M format: UserID::ItemID::Rating::Timestamp).")
@click.option("--users", default=6040, show_default=True, help="Number of users.")
@click.option("--items", default=3706, show_default=True, help="Number of items.")
@click.option("--interactions", default=1_000_209, show_default=True,
              help="Total number of ratings (split over users with a heavy tail).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
              help="Random seed (same seed, same file).")
@click.option("--clusters", type=int, default=None,
              help="Item clusters the users move between (default: items/40, 2..64).")
@click.option("--switch", default=0.15, show_default=True,
              help="Probability per step that a user moves to another cluster.")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if an earlier `synth` wrote it (its OUTPUT.synth.json "
                   "record matches); any other file is left alone.")
@user_errors
def synth(output: Path, users: int, items: int, interactions: int, seed: int,
          clusters: int | None, switch: float, force: bool) -> None:
    """Generate a synthetic ratings log with sequential structure (no download needed).

    Defaults match MovieLens-1M's size. Users walk a Markov chain over item clusters
    with Zipf popularity inside each cluster, so the next item is predictable from the
    last few: a sequential model beats popularity on it.
    """
    import time

    from fastattrec.api import synthesize

    t = time.perf_counter()
    synthesize(output, users=users, items=items, interactions=interactions, seed=seed,
               clusters=clusters, switch=switch, force=force)
    click.echo(f"wrote {quoted(output)}: {interactions:,} ratings, {users:,} users, {items:,} "
               f"items ({time.perf_counter() - t:.1f} s); its record: "
               f"{quoted(str(output) + '.synth.json')}")


@main.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder to create for the prepared dataset.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(PREP_FORMATS),
              help="Input format. auto: '::' lines are MovieLens-1M ratings.dat, 4 tab-separated "
                   "integers are MovieLens-100K u.data, a 'userId,movieId,rating,timestamp' "
                   "header is MovieLens-20M/25M ratings.csv, '.inter' is RecBole; otherwise "
                   "csv/tsv/parquet with named columns. Logs without times, in file order: "
                   "sequence-pairs ('user item' lines, whitespace separated) and "
                   "sequence-lines (one line per user: 'user item1 item2 ...'). gzip, bzip2, "
                   "xz and zstd files are unpacked on the fly.")
@click.option("--user-col", help="User column (csv/tsv/recbole/parquet). Default: guessed.")
@click.option("--item-col", help="Item column (csv/tsv/recbole/parquet). Default: guessed.")
@click.option("--time-col", help="Time column: numbers or dates. Default: guessed.")
@click.option("--rating-col", help="Rating column (optional). Default: guessed if present.")
@click.option("--trans-score", type=float, default=None,
              help="Keep rows with rating >= this (implicit feedback). Default: keep every "
                   "row, whatever its rating.")
@click.option("--min-user-interactions", type=int, default=None, metavar="N",
              help="Iterated k-core: keep only users with at least N interactions and "
                   "(with --min-item-interactions M) items with at least M, then drop again "
                   "every user and item that fell below its minimum (dropping an item can "
                   "take a user below N, and the reverse), until none does. Counted after "
                   "--trans-score, before ids are numbered. [default: users need 2, items "
                   "no minimum, no iteration]")
@click.option("--min-item-interactions", type=int, default=None, metavar="M",
              help="The items' minimum of the k-core (see --min-user-interactions); "
                   "either option turns the iterated filter on. [default: no minimum]")
@click.option("--split", "split", type=click.Choice(["leave-one-out", "time", "ratio"]),
              default="leave-one-out", show_default=True,
              help="leave-one-out: each user's last item is test, the one before "
                   "validation. time: one cut for the whole log, interactions from "
                   "--test-from on are test, from --val-from up to it validation, earlier "
                   "ones train (by default the cuts leave the last 10% of interactions by "
                   "time for test and the 10% before for validation). ratio: per user, in "
                   "time order, the last 10% of the user's interactions test and the 10% "
                   "before validation (at least one of each). Time and ratio splits are "
                   "evaluated over all items on every target of a user.")
@click.option("--val-fraction", type=float, default=None, metavar="F",
              help="--split time: the share of all interactions (the latest by time, "
                   "before the test ones) that is validation; --split ratio: the share of "
                   "each user's. Rounded half up, at least 1. [default: 0.1]")
@click.option("--test-fraction", type=float, default=None, metavar="F",
              help="--split time or ratio: the share of interactions (the latest) that is "
                   "test, as --val-fraction. [default: 0.1]")
@click.option("--val-from", default=None, metavar="TIME",
              help="--split time: the validation cut, a time in the log's units or a date "
                   "(2003-01-01, 2003-01-01T10:00:00Z); with --test-from instead of the "
                   "fractions.")
@click.option("--test-from", default=None, metavar="TIME",
              help="--split time: the test cut (as --val-from); interactions at or after "
                   "it are test.")
@click.option("--test-negatives", type=int, default=None,
              help="Distinct negatives per test user [default: 100; 101 with repeats under "
                   "--compat notebook].")
@click.option("--compat", type=click.Choice(["none", "notebook"]), default="none",
              show_default=True,
              help="notebook: sample as the original notebook (raw integer item ids as table "
                   "rows, negatives from 1..max raw id, 101 test negatives with repeats).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
              help="Seed for every random draw.")
@click.option("--streaming", is_flag=True,
              help="Run the plans on Polars' streaming engine. It still holds about 4.5x "
                   "the log's size in memory (2.5 GB for a 538 MB log), so it does not "
                   "make a log larger than memory fit.")
@click.option("--force", is_flag=True,
              help="Replace OUT_DIR if it is a prepared dataset (its meta.json says so), only "
                   "once the new one is complete; never anything else, nor the input.")
@interruptible(_prep_snapshot, _prep_interrupted)
@user_errors
def prep(input_file: Path, out_dir: Path, fmt: str, user_col, item_col, time_col, rating_col,
         trans_score, min_user_interactions, min_item_interactions, split, val_fraction,
         test_fraction, val_from, test_from, test_negatives, compat, seed, streaming,
         force) -> None:
    """Prepare a ratings log: time-ordered histories, the split, negatives.

    Each user's items are ordered by time (ties keep file order). With the default
    leave-one-out split the last item is the test target, the one before it the
    validation target, the rest train targets (--split time and ratio: see --split);
    users with a single item are dropped (or, with --min-user-interactions or
    --min-item-interactions, everything outside the k-core). Ids are remapped to 1..N
    (0 is padding). The folder is written to a temporary name and renamed only when
    complete.
    """
    import time

    from fastattrec.api import prepare

    t = time.perf_counter()
    ds = prepare(input_file, out_dir, format=fmt, user_col=user_col, item_col=item_col,
                 time_col=time_col, rating_col=rating_col, trans_score=trans_score,
                 min_user_interactions=min_user_interactions,
                 min_item_interactions=min_item_interactions, split=split,
                 val_fraction=val_fraction, test_fraction=test_fraction, val_from=val_from,
                 test_from=test_from, test_negatives=test_negatives, compat=compat,
                 seed=seed, streaming=streaming, force=force, log=say)
    c = ds.counts
    rows = [
        ("users", f"{c['users']:,}"),
        ("items", f"{c['items']:,}"),
        ("interactions", f"{c['interactions']:,}"),
        ("train samples", f"{c['train_samples']:,}"),
        ("validation samples", f"{c['val_samples']:,}"),
        ("test samples", f"{c['test_samples']:,}"),
        *(_split_rows(ds.meta["params"], c) if "test_users" in c else []),
        ("rows read", f"{c['rows_read']:,}"),
        ("rows below --trans-score", f"{c['rows_read'] - c['rows_after_trans_score']:,}"),
        *(_kcore_rows(c) if "kcore_rounds" in c else
          [("users dropped (1 item)", f"{c['dropped_users']:,}")]),
        ("ids read as (user, item)", "{user}, {item}".format(**ds.meta["source"]["id_types"])),
        ("time", f"{time.perf_counter() - t:.2f} s"),
    ]
    click.echo(text_table(rows, f"prepared {out_dir}"))
    for note in _prep_notes(c, split):
        say(f"note: {note}")


def _prep_notes(c: dict, split: str) -> list[str]:
    """What a prepared dataset will not do well, said before anyone trains on it."""
    notes = []
    if c["train_samples"] == 0:
        notes.append("there are no train samples (no user has two items before the "
                     "split's cuts), so `fastattrec train` will refuse this dataset; use a "
                     "larger log, or lower --val-fraction and --test-fraction.")
    few = [f"{c[k]:,} {what}" for k, what in (("val_users", "validation"),
                                               ("test_users", "test"))
           if split == "time" and c.get(k, FEW_USERS) < FEW_USERS]
    if few:
        notes.append(f"only {' and '.join(few)} users are evaluated; metrics over so few "
                     f"users vary widely with the cuts (move --val-from and --test-from, or "
                     f"the fractions, earlier for more).")
    return notes


def _time_text(t: float) -> str:
    """A time cut as stored, and as a date when it reads as one: dates are stored as
    microseconds since 1970 (docs/spec.md §1.1), 1e14-1e17 being the years 1973-5138."""
    if 1e14 <= t < 1e17:
        import datetime

        when = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=int(t))
        return f"{when:%Y-%m-%d %H:%M:%S}"
    return f"{t:g}" if isinstance(t, float) else str(t)


def _split_rows(params: dict, c: dict) -> list[tuple[str, str]]:
    """The summary's rows of a time or ratio split: the cuts, the users evaluated."""
    cuts = params.get("time_cuts")
    how = (f"time (validation from {_time_text(cuts[0])}, test from {_time_text(cuts[1])})"
           if cuts else
           f"ratio (validation {params['val_fraction'] or 0.1:g}, test "
           f"{params['test_fraction'] or 0.1:g} of each user)")
    return [("split", how),
            ("validation users", f"{c['val_users']:,} (+{c['val_users_without_history']:,} "
                                 f"without history, not evaluated)"),
            ("test users", f"{c['test_users']:,} (+{c['test_users_without_history']:,} "
                           f"without history, not evaluated)")]


def _kcore_rows(c: dict) -> list[tuple[str, str]]:
    """The summary's rows of what the k-core filter dropped."""
    return [("users dropped (k-core)", f"{c['dropped_users']:,}"),
            ("items dropped (k-core)", f"{c['dropped_items']:,}"),
            ("rows dropped (k-core)", f"{c['dropped_interactions']:,}"),
            ("k-core rounds", f"{c['kcore_rounds']:,}")]


def _train_options(f):
    """The `train` command's options, generated from `TrainConfig` (fastattrec/config.py):
    every field marked for the command line, with its default, help, choices and bounds."""
    from dataclasses import fields

    from fastattrec.config import CLI_KERNELS, TrainConfig, flag_of

    opts = []
    for fl in fields(TrainConfig):
        meta = fl.metadata
        if not meta.get("cli"):
            continue
        decls = [flag_of(fl), fl.name] if meta.get("flag") else [flag_of(fl)]
        kw: dict = {"default": fl.default, "show_default": True, "help": meta["help"]}
        if isinstance(fl.default, bool):
            decls = [f"{flag_of(fl)}/--no-{fl.name.replace('_', '-')}"]
        elif meta.get("choices"):
            choices = CLI_KERNELS if fl.name == "kernel" else meta["choices"]
            kw["type"] = click.Choice(list(choices))
        opts.append(click.option(*decls, **kw))
    for o in reversed(opts):
        f = o(f)
    return f


@main.command()
@click.argument("data_dir", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "run_dir", type=click.Path(path_type=Path),
              help="Run folder: config.json, checkpoints, log.csv, metrics.jsonl, curves.png.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path),
              help="Continue the interrupted run in this folder (same data and options: "
                   "an option repeated with the run's value is fine; --epochs may be raised "
                   "and --device changed). A run stopped before its first checkpoint starts "
                   "over. DATA_DIR may be given if the dataset moved: it must be the same "
                   "dataset (same fingerprint). Ctrl-C prints the epoch kept and this "
                   "command.")
@click.option("--force", is_flag=True,
              help="Replace the run in RUN_DIR (a folder `fastattrec train` made): its "
                   "checkpoints, logs and eval.json are removed first; other files stay. Not "
                   "with --resume.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar per epoch [default: when writing to a terminal].")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Options from a file: TOML (`dim = 64`, the names of config.json's "
                   "\"train\" part, optionally under [train]) or a run's own config.json, "
                   "to repeat that run. Options given on the command line override it; "
                   "data_dir in the file stands for DATA_DIR. Not with --resume.")
@_train_options
@interruptible(_train_snapshot, _train_interrupted)
@user_errors
def train(data_dir, run_dir, resume_dir, force, progress, config_file, **opts) -> None:
    """Train AttRec on a prepared dataset (DATA_DIR from `fastattrec prep`).

    Each epoch prints one line (losses, validation NDCG, speed) and writes an atomic
    checkpoint, so an interrupted run continues with --resume and ends with the same
    weights. Test metrics (sampled and full ranking; full alone for a time or ratio split)
    come every --eval-every epochs.
    Several GPUs or hosts: torchrun --nproc_per_node N -m fastattrec train ...
    """
    from fastattrec.distributed import from_environment, shutdown

    finished = False
    try:
        dist = from_environment(opts["device"])
        _train_cli(data_dir, run_dir, resume_dir, force, progress, dist, opts, config_file)
        finished = True
    finally:
        shutdown(finished)


def _train_cli(data_dir, run_dir, resume_dir, force, progress, dist, opts,
               config_file=None) -> None:
    from fastattrec import api

    main_proc = dist is None or dist.rank == 0
    log = say if main_proc else (lambda s: None)
    if progress is None:
        progress = sys.stderr.isatty()
    if resume_dir is not None:
        if run_dir is not None and Path(run_dir) != Path(resume_dir):
            raise UserError("give either -o RUN_DIR for a new run or --resume RUN_DIR, not both.")
        if config_file is not None:
            raise UserError("--config sets the options of a new run; a resumed run keeps its "
                            "own (drop --config, or start a new run with -o RUN_DIR).")
        if force:
            raise UserError("--force starts a new run over an old one and --resume continues "
                            "it; give one of them (to replace the run: fastattrec train "
                            "DATA_DIR -o RUN_DIR --force).")
        changed = _resume_changes(resume_dir, opts)
        run = api.resume(resume_dir, epochs=changed.get("epochs"), device=changed.get("device"),
                         time_budget=changed.get("time_budget"), data=data_dir,
                         progress=progress, log=log, distributed=dist)
    else:
        if run_dir is None or (data_dir is None and config_file is None):
            raise UserError("usage: fastattrec train DATA_DIR -o RUN_DIR (or --resume RUN_DIR, "
                            "or --config FILE -o RUN_DIR).")
        run = api.train(data_dir, run_dir, force=force, progress=progress, log=log,
                        distributed=dist, config=config_file,
                        **_given(opts))  # the rest: the file's, then the preset's
    if not main_proc:
        return
    last = [h for h in run._history if "test" in h]
    if last:
        first = next(iter(last[-1]["test"].values()))  # sampled, else full
        ks = sorted({int(k.split("@")[1]) for k in first if k.startswith("HR@")})
        print_metrics(api.metrics_frame({"AttRec": last[-1]["test"]}, ks),
                       f"test metrics after epoch {last[-1]['epoch']} "
                       f"({last[-1]['kernel']} kernel)")
    click.echo(f"run saved in {quoted(run.path)}")


def _given(opts: dict) -> dict:
    """The options of `opts` given on the command line (not click's defaults)."""
    ctx = click.get_current_context()
    return {k: v for k, v in opts.items()
            if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}


def _spelled(flag: str, value) -> str:
    """An option as typed: `--compile` / `--no-compile` for flags, else `--name value`."""
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value}"


def _resume_changes(resume_dir: Path, opts: dict) -> dict:
    """The options given on the command line with --resume. Repeating the run's own value
    is accepted; a different value is refused, except for --epochs, --device and
    --time-budget."""
    from fastattrec.config import RESUME_CHANGES, TrainConfig, flag_of
    from fastattrec.training.checkpoint import read_run_config

    given = _given(opts)
    saved = read_run_config(resume_dir)["train"]
    other = [k for k, v in given.items()
             if k not in RESUME_CHANGES and (k not in saved or saved[k] != v)]
    if other:
        flags = {f.name: flag_of(f) for f in TrainConfig.__dataclass_fields__.values()}
        names = ", ".join(_spelled(flags[k], given[k]) + f" (the run's: "
                          f"{_spelled(flags[k], saved[k]) if k in saved else 'unset'})"
                          for k in other)
        raise UserError(f"--resume keeps the run's options; only --epochs, --device and "
                        f"--time-budget may change (got {names}).")
    return given


@main.command()
@click.argument("name", type=click.Choice(["ml-100k", "ml-1m", "ml-20m", "ml-25m"]))
@click.option("--dir", "dest", type=click.Path(path_type=Path), default=Path("data"),
              show_default=True, help="Folder to unpack into.")
@click.option("--url", help="Download from this address instead (a mirror).")
@click.option("--md5", help="Expected MD5 of the archive at --url.")
@click.option("--force", is_flag=True,
              help="Download again even if already unpacked (replaces only a folder that "
                   "fastattrec downloaded, once the new archive is verified).")
@user_errors
def download(name, dest, url, md5, force) -> None:
    """Fetch a MovieLens archive from GroupLens, verify its MD5 and unpack it.

    MovieLens' licence forbids redistribution: keep the data out of version control.
    """
    from tqdm import tqdm

    from fastattrec.data.download import download as fetch

    bar = tqdm(unit="B", unit_scale=True, desc=name, disable=None)

    def progress(done: int, total: int) -> None:
        bar.total = total or None
        bar.n = done
        bar.refresh()

    path = fetch(name, dest, url, md5, progress, force)
    bar.close()
    click.echo(f"{name} ready: {quoted(path)}\nnext: fastattrec prep {quoted(path)} -o "
               f"{quoted(Path(dest) / (name + '-prep'))}")


main.add_command(evaluate)
main.add_command(recommend)
main.add_command(export)
main.add_command(tune)


def run() -> None:  # pragma: no cover - console entry for `python -m fastattrec`
    sys.exit(main())
