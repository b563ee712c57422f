"""`fastattrec evaluate` and `fastattrec recommend`: a trained run's metrics and top-K
lists, on the terminal, as JSON on stdout, or as a table file by its extension."""

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
    """Evaluate a trained run beside the popularity baseline (HR@K, NDCG@K, MRR).

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
def recommend(run_dir, raw_user, all_users, k, items, allow_missing, output, as_json, force,
              checkpoint, data_dir, device) -> None:
    """Top-K items for a user from their latest window, excluding items they have seen.

    A user who has seen all but N items gets only those N."""
    from fastattrec import api

    if bool(raw_user) == bool(all_users):
        raise UserError("give exactly one of --user RAW_ID or --all-users.")
    if output is not None and as_json:
        raise UserError("--json prints the rows and -o writes them to a file; give one of "
                        "them.")
    if all_users and output is None and not as_json:
        raise UserError("--all-users writes a table: add -o FILE (.csv, .parquet, .json or "
                        ".jsonl), or --json to print it.")
    if allow_missing and items is None:
        raise UserError("--allow-missing is for --items FILE; give the item file too.")
    if k < 1:
        raise UserError(f"-k must be at least 1, got {k}.")
    if output is not None:
        _table_output(output, run_dir)
    run = api.load_run(run_dir)
    users = None if all_users else [raw_user]
    with _claim_table(output, force, run_dir, "recommendations", "recommend") as out:
        frame = run.recommend(users, k, checkpoint, device, items, data_dir, allow_missing)
        if out is not None:
            from fastattrec.tables import write_table

            write_table(frame, out, "recommendations")
    if as_json:
        click.echo(frame.write_json())
    elif output is not None:
        n_users = frame.get_column("raw_user").n_unique()
        who = f"user {raw_user}" if raw_user else f"{n_users:,} users"
        click.echo(f"wrote {frame.height:,} recommendations for {who} to {quoted(output)}")
    else:
        click.echo(f"top {frame.height} for user {raw_user}:"
                   + (f" (only {frame.height} items are unseen)" if frame.height < k else ""))
        for row in frame.iter_rows(named=True):
            title = f"  {row['title']}" if row.get("title") else ""
            click.echo(f"{row['rank']:3d}. item {row['raw_item']}  (score {row['score']:.4f})"
                       f"{title}")
