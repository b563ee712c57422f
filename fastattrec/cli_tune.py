"""`fastattrec tune`: the command over fastattrec/tune.py (the search itself)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from fastattrec.cli_support import interruptible, say, user_errors
from fastattrec.errors import UserError, quoted

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'90s', '30m', '1.5h' or a number of minutes -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text or "")
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--time-budget {text!r} is not a positive duration; give minutes, "
                        f"or a number with s, m or h, such as 30m or 2h.")
    return float(m.group(1)) * _UNITS[m.group(2) or "m"]


def _interrupted(_before, out_dir: Path, data_dir: Path, **_) -> str:
    return (f"interrupted: the finished trials are kept in {quoted(out_dir)} "
            f"(trials.csv);\nfastattrec tune {quoted(data_dir)} -o {quoted(out_dir)} "
            f"--resume goes on.")


@click.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True,
              help="The tuning folder: a run folder per trial, trials.csv, best.toml.")
@click.option("--trials", default=20, show_default=True, type=click.IntRange(1, 100_000),
              help="Trials to finish in the folder (with --resume: in all, counting those "
                   "already there).")
@click.option("--time-budget", "budget",
              help="Start no trial after this long (30m, 2h, 900s; a bare number is "
                   "minutes); the trial in flight finishes.")
@click.option("--config", "config_file", type=click.Path(path_type=Path),
              help="Options every trial shares (TOML, as train --config; not the searched "
                   "ones) [default: up to 100 epochs, early stop after 5].")
@click.option("--device", default=None, help="cpu, cuda or auto [default: the file's, else "
                                             "auto].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**31 - 1),
              help="Seed of the search (Optuna's TPE sampler).")
@click.option("--resume", is_flag=True, help="Continue the trials in OUTPUT (same data and "
                                             "options).")
@click.option("--force", is_flag=True, help="Replace a tuning folder fastattrec made.")
@interruptible(lambda **_: None, _interrupted)
@user_errors
def tune(data_dir, out_dir, trials, budget, config_file, device, seed, resume,
         force) -> None:
    """Search training options on DATA_DIR by validation NDCG@K (full ranking).

    Each trial trains a run with early stopping, with options drawn by Optuna's TPE
    sampler from the space of docs/spec.md §3.9 (objective, negatives per positive,
    long-term weight w, d, learning rate, dropout, window L, L2), and is scored by its
    best validation NDCG; test metrics are never used. The folder keeps every trial, so
    --resume continues after an interruption. Train the best with
    fastattrec train -o RUN --config OUTPUT/best.toml."""
    from fastattrec import tune as search
    from fastattrec.config import read_config_file

    if resume and force:
        raise UserError("--force starts the search again and --resume continues it; give "
                        "one of them.")
    budget_s = None if budget is None else parse_duration(budget)
    base = search.default_base()
    if config_file is not None:
        if resume:
            raise UserError("--config sets the options of a new search; a resumed one keeps "
                            "its own (drop --config).")
        given = read_config_file(config_file)
        given.pop("data_dir", None)
        base = {**base, **given}
    if device is not None:
        base["device"] = device
    if resume:
        from fastattrec.outputs import read_json_dict

        rec = read_json_dict(Path(out_dir) / search.RECORD) or {}
        base = {k: v for k, v in rec.get("base", base).items() if k not in search.FIXED}
        if device is not None:
            base["device"] = device
    base = search.check_base(base)
    frame = search.tune(data_dir, out_dir, base, trials=trials, budget_s=budget_s,
                        resume=resume, force=force, sampler_seed=seed, log=say)
    done = frame.filter(frame["state"] == "complete")
    if done.height:
        best = done.sort("val_ndcg", descending=True).row(0, named=True)
        click.echo(f"best: trial {best['trial']}, validation NDCG {best['val_ndcg']:.4f} "
                   f"({done.height} scored of {frame.height}); options in "
                   f"{quoted(Path(out_dir) / search.BEST)}\nnext: fastattrec train -o RUN "
                   f"--config {quoted(Path(out_dir) / search.BEST)}")
    else:
        click.echo(f"no trial was scored; see {quoted(Path(out_dir) / search.TABLE)}")
