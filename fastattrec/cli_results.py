"""`fastattrec evaluate`, `recommend` and `export`: a trained run's metrics and top-K
lists, on the terminal, as JSON on stdout, or as a table file by its extension; the model
as one file a serving stack loads."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fastattrec.cli_support import print_metrics, user_errors
from fastattrec.errors import UserError, quoted

_TABLE_HELP = (".csv, .parquet, .json (a list of row objects) or .jsonl (one row object a "
               "line), from the name's extension")


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--protocol", type=click.Choice(["sampled", "full", "both", "sasrec"]),
              default="both",
              show_default=True,
              help="sampled: the target against its user's test negatives drawn by prep "
                   "(distinct, fixed; the notebook); full: against every item the user has "
                   "not had before; both: those two; sasrec: the SASRec paper's, against "
                   "100 negatives drawn with replacement from the items the user never "
                   "rated (seeded, the same on every evaluation). Datasets prepared with "
                   "--split time or ratio have full ranking only (both means full), over "
                   "every test item of a user, with Recall@K too.")
@click.option("-k", "ks", multiple=True, type=int, default=(1, 5, 10, 20), show_default=True,
              help="Cut-offs K for HR@K and NDCG@K (repeat the option).")
@click.option("--ndcg-log", type=click.Choice(["2", "e"]), default=None,
              help="NDCG's log base [default: the run's].")
@click.option("--checkpoint", type=click.Choice(["auto", "best", "last"]), default="auto",
              show_default=True,
              help="best.pt, checkpoint.pt, or auto: best with --early-stop runs, else last.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Prepared data [default: the run's DATA_DIR].")
@click.option("--device", default="auto", show_default=True)
@click.option("--no-baseline", is_flag=True, help="Skip the popularity baseline.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Also write the metrics table (model, protocol, HR@K, NDCG@K, [Recall@K,] "
                   "MRR, users, "
                   f"checkpoint, epoch) to this file: {_TABLE_HELP}.")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if an earlier `evaluate` wrote it.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only the results, as eval.json holds them, as one JSON document on "
                   "stdout (messages go to stderr).")
@user_errors
def evaluate(run_dir, protocol, ks, ndcg_log, checkpoint, data_dir, device, no_baseline,
             output, force, as_json) -> None:
    """Evaluate a trained run beside the popularity baseline (HR@K, NDCG@K, MRR; Recall@K
    too for a time or ratio split).

    Writes eval.json into RUN_DIR (unless another command is working on the run), and with
    -o the metrics table to OUTPUT.
    """
    from fastattrec import api

    if output is not None:
        _table_output(output, run_dir)
    run = api.load_run(run_dir)
    with _claim_table(output, force, run_dir, "metrics", "evaluate") as out:
        unsaved = None
        try:
            run.evaluate(protocol, ks, ndcg_log, checkpoint, device, not no_baseline,
                         data_dir, save=True)
        except UserError as e:
            if run.last_evaluation is None:
                raise
            unsaved = e  # measured, but eval.json was not written: still show and keep them
        ev = run.last_evaluation
        frame = api.evaluation_frame(ev, sorted(set(ks)))
        if out is not None:
            from fastattrec.tables import write_table

            write_table(frame, out, "metrics")
    if as_json:
        click.echo(_json(ev))
    else:
        print_metrics(frame, _eval_title(run_dir, ev))
        if output is not None:
            click.echo(f"wrote the metrics to {quoted(output)}")
    if unsaved is not None:
        raise unsaved


def _eval_title(run_dir, ev: dict) -> str:
    return (f"{quoted(run_dir)} ({ev['checkpoint']} checkpoint, epoch {ev['epoch']}; NDCG log base "
            f"{ev['ndcg_log']}; model evaluated in {ev['seconds']:.3f} s)")


def _json(obj) -> str:
    """One JSON document, as eval.json is written."""

    return json.dumps(obj, indent=2, sort_keys=True)


def _table_output(output: Path, run_dir: Path) -> None:
    """Check a table's -o before any work: not an input or a folder, a known extension,
    and not eval.json."""
    from fastattrec.outputs import refuse_inputs, resolve_output
    from fastattrec.tables import table_format

    refuse_inputs(resolve_output(output), [run_dir])
    if Path(output).is_dir():
        raise UserError(f"-o {quoted(output)} is a folder; give a file name such as "
                        f"{quoted(Path(output) / 'table.csv')}.")
    table_format(output)
    if resolve_output(output) == resolve_output(Path(run_dir) / "eval.json"):
        raise UserError(f"-o {quoted(output)} is the run's eval.json, which evaluate writes "
                        f"itself; choose another -o.")


def _claim_table(output: Path | None, force: bool, run_dir: Path, kind: str, command: str):
    """claim_output for a table file (nothing when `output` is None)."""
    import contextlib

    from fastattrec.outputs import claim_output
    from fastattrec.tables import made_table

    if output is None:
        return contextlib.nullcontext(None)
    return claim_output(output, force=force, made_by_us=lambda p: made_table(p, kind),
                        what=f"{kind} file that `fastattrec {command}` wrote", kind="file",
                        inputs=[run_dir])


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--user", "raw_user", help="Raw user id (as in the ratings file).")
@click.option("--all-users", is_flag=True,
              help="Recommend for every user (with -o FILE or --json).")
@click.option("--history", "history",
              help="Score this history instead of the user's latest window: raw item ids, "
                   "oldest first, comma-separated (12,7,31). With --user, that user's "
                   "long-term part is used and their dataset items count as seen; without, "
                   "a new user (the mean trained user). No retraining.")
@click.option("--histories", "histories_file", type=click.Path(path_type=Path),
              help="Score every history in this file (CSV, TSV, Parquet or JSON lines with "
                   "user and item columns, optionally time; each user's rows oldest first): "
                   "users of the dataset as with --history --user, others as new users.")
@click.option("--skip-unknown-items", is_flag=True,
              help="With --history/--histories: leave out items the run's dataset lacks "
                   "(refused by default; the model has no embedding for them).")
@click.option("-k", "k", default=10, show_default=True, help="Items per user.")
@click.option("--items", "--movies", "items", type=click.Path(path_type=Path),
              help="The dataset's item file, to add titles: MovieLens movies.dat or ML-100K "
                   "u.item, a RecBole .item file, or a CSV, TSV or Parquet file with an id "
                   "column (raw_item, item_id, item or movieId) and a title column. A file "
                   "lacking any of the dataset's items, or of another dataset, is refused.")
@click.option("--allow-missing", is_flag=True,
              help="With --items: use a file that lacks some of the dataset's items (their "
                   "title is left empty) or that holds mostly other items.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write the recommendations (raw_user, rank, raw_item, score[, title]) to "
                   f"this file instead of printing them: {_TABLE_HELP}.")
@click.option("--json", "as_json", is_flag=True,
              help="Print only the rows, as one JSON list of row objects on stdout (not "
                   "with -o).")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if an earlier `recommend` wrote it.")
@click.option("--checkpoint", type=click.Choice(["auto", "best", "last"]), default="auto",
              show_default=True)
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Prepared data [default: the run's DATA_DIR]; a moved or copied folder "
                   "of the same dataset (same fingerprint).")
@click.option("--device", default="auto", show_default=True)
@user_errors
def recommend(run_dir, raw_user, all_users, history, histories_file, skip_unknown_items, k,
              items,
              allow_missing, output, as_json, force, checkpoint, data_dir,
              device) -> None:
    """Top-K items for a user from their latest window, excluding items they have seen;
    or for histories the model was not trained on (--history, --histories).

    A user who has seen all but N items gets only those N."""
    from fastattrec import api

    if histories_file is not None and (raw_user or history or all_users):
        raise UserError("--histories FILE scores the file's users; drop --user, --history "
                        "and --all-users.")
    if history is not None and all_users:
        raise UserError("--history is one user's history; drop --all-users (or give a file "
                        "of histories with --histories).")
    if skip_unknown_items and history is None and histories_file is None:
        raise UserError("--skip-unknown-items is for --history or --histories.")
    if history is None and histories_file is None and bool(raw_user) == bool(all_users):
        raise UserError("give exactly one of --user RAW_ID, --all-users, --history ITEMS "
                        "or --histories FILE.")
    if output is not None and as_json:
        raise UserError("--json prints the rows and -o writes them to a file; give one of "
                        "them.")
    if (all_users or histories_file) and output is None and not as_json:
        what = "--all-users" if all_users else "--histories"
        raise UserError(f"{what} writes a table: add -o FILE (.csv, .parquet, .json or "
                        f".jsonl), or --json to print it.")
    histories = None
    if history is not None:
        listed = [x.strip() for x in history.split(",")]
        if not all(listed):
            raise UserError(f"--history {history!r} has an empty item; give raw item ids "
                            f"separated by commas, oldest first, such as 12,7,31.")
        histories = {raw_user: listed}
    elif histories_file is not None:
        histories = histories_file
    if allow_missing and items is None:
        raise UserError("--allow-missing is for --items FILE; give the item file too.")
    if k < 1:
        raise UserError(f"-k must be at least 1, got {k}.")
    if output is not None:
        _table_output(output, run_dir)
    run = api.load_run(run_dir)
    users = None if all_users or histories is not None else [raw_user]
    with _claim_table(output, force, run_dir, "recommendations", "recommend") as out:
        frame = run.recommend(users, k, checkpoint, device, items, data_dir, allow_missing,
                              histories, skip_unknown_items, "--history")
        if out is not None:
            from fastattrec.tables import write_table

            write_table(frame, out, "recommendations")
    from fastattrec.cli_support import say

    if histories_file is not None:
        say(f"each user's rows of {quoted(histories_file)} taken oldest first "
            f"{run.history_order}")
    new = run.new_users
    if new:
        who = (f"user {new[0]} is" if len(new) == 1 else f"{len(new):,} users are")
        say(f"{who} not in the run's dataset: scored with the mean trained user "
            f"(docs/spec.md §4.10)")
    if as_json:
        click.echo(frame.write_json())
    elif output is not None:
        n_users = frame.get_column("raw_user").n_unique()
        who = (f"user {raw_user}" if raw_user else "the history" if history
               else f"{n_users:,} users")
        click.echo(f"wrote {frame.height:,} recommendations for {who} to {quoted(output)}")
    else:
        who = (f"user {raw_user}" if raw_user else "a new user")
        given = f" with history {history}" if history else ""
        click.echo(f"top {frame.height} for {who}{given}:"
                   + (f" (only {frame.height} items are unseen)" if frame.height < k else ""))
        for row in frame.iter_rows(named=True):
            title = f"  {row['title']}" if row.get("title") else ""
            click.echo(f"{row['rank']:3d}. item {row['raw_item']}  (score {row['score']:.4f})"
                       f"{title}")


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="The model file: .pt2 (torch.export; torch.export.load(path).module()) "
                   "or .onnx (needs onnx and onnxscript), from the name's extension.")
@click.option("--checkpoint", type=click.Choice(["auto", "best", "last"]), default="auto",
              show_default=True,
              help="best.pt, checkpoint.pt, or auto: best with --early-stop runs, else last.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path),
              help="Prepared data [default: the run's DATA_DIR].")
@click.option("--force", is_flag=True, help="Replace an export fastattrec wrote.")
@user_errors
def export(run_dir, output, checkpoint, data_dir, force) -> None:
    """Write the trained model as one file for serving: goodness(users, windows).

    Inputs: user rows (B,) int64, 0 for a user the model was not trained on (the mean
    trained user); windows (B, L) int64 item rows, oldest first, left-padded with 0.
    Output: (B, item rows) float32 scores, higher is better, -inf off items; leave out
    the items a user has seen before ranking. The raw id -> row maps and L are inside
    the file (docs/formats.md §5)."""
    from fastattrec import api

    run = api.load_run(run_dir)
    path = run.export(output, checkpoint, data_dir, force)
    click.echo(f"wrote {quoted(path)} (goodness of every item from user rows and windows "
               f"of {run.options['maxlen']} items; id maps inside)")
