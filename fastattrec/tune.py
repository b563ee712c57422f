"""`fastattrec tune`: search training options on a prepared dataset by validation metric
(Optuna's TPE sampler), within a trial count and a time budget, resumable (docs/spec.md
§3.9).

A tuning folder holds `tune.json` (what is searched, on which data), `study.journal`
(Optuna's journal: every trial and its state), `trials/NNNN/` (each trial's run folder),
`trials.csv` (one row per trial) and `best.toml` (the best trial's options, for `fastattrec
train --config`). Trials are chosen on the validation NDCG@K under full ranking only: the
test metrics each run computes at its last epoch are never read here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl

from fastattrec.atomic import atomic_write_json, atomic_write_text
from fastattrec.config import TrainConfig
from fastattrec.errors import UserError, first_error_line, quoted
from fastattrec.outputs import claim_output, read_json_dict
from fastattrec.version import VERSION as __version__

KIND = "fastattrec-tune"
RECORD, JOURNAL, TABLE, BEST, TRIALS = "tune.json", "study.journal", "trials.csv", \
    "best.toml", "trials"
OPTUNA_HINT = "pip install optuna (or pip install 'fastattrec[tune]')"

# The search space: option -> (kind, values). "log": a log-uniform float or int between
# the bounds, "float"/"int": uniform with a step, "choice": one of the values. Options
# not listed keep the base value (the --config file, else the notebook's defaults).
SPACE: dict[str, tuple[str, tuple]] = {
    "objective": ("choice", ("pair", "bce", "sampled-softmax")),
    "n_negatives": ("log", (1, 64)),
    "w": ("float", (0.0, 1.0, 0.1)),
    "dim": ("choice", (32, 64, 100)),
    "lr": ("log", (3e-4, 1e-2)),
    "dropout": ("float", (0.0, 0.5, 0.1)),
    "maxlen": ("choice", (5, 10, 20)),
    "embed_reg": ("log", (1e-7, 1e-4)),
}
FIXED = {"negatives": "resample"}  # fresh negatives: what lets N > 1 and wins (RESULTS)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(f"fastattrec tune searches with Optuna, which is not installed; "
                        f"{OPTUNA_HINT}.") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # fastattrec says what failed
    return optuna


def is_tune_folder(path: Path) -> bool:
    """True for a folder `fastattrec tune` made (its tune.json says so)."""
    rec = read_json_dict(Path(path) / RECORD)
    return rec is not None and rec.get("kind") == KIND


def suggest(trial: Any) -> dict[str, Any]:
    """One point of SPACE from an Optuna trial."""
    out: dict[str, Any] = {}
    for name, (kind, values) in SPACE.items():
        if kind == "choice":
            out[name] = trial.suggest_categorical(name, list(values))
        elif kind == "log" and isinstance(values[0], int):
            out[name] = trial.suggest_int(name, values[0], values[1], log=True)
        elif kind == "log":
            out[name] = trial.suggest_float(name, values[0], values[1], log=True)
        else:
            lo, hi, step = values
            out[name] = round(trial.suggest_float(name, lo, hi, step=step), 10)
    return out


def tune(data_dir: Path, out_dir: Path, base: dict[str, Any], *, trials: int,
         budget_s: float | None, resume: bool = False, force: bool = False,
         sampler_seed: int = 0, log: Callable[[str], None] = lambda s: None) -> pl.DataFrame:
    """Run trials until `trials` are done in the folder or `budget_s` seconds have passed
    (a trial in flight finishes); returns the trials table."""
    from fastattrec.data.dataset import fingerprint, load_prepared

    optuna = _optuna()
    out_dir = Path(out_dir)
    prepared = load_prepared(Path(data_dir))
    base = {**base, **FIXED}
    TrainConfig.of_preset(**base).check()  # a mistake in the fixed options, before anything
    record = {"kind": KIND, "fastattrec_version": __version__,
              "data": {"path": str(Path(data_dir).resolve()),
                       "fingerprint": fingerprint(prepared.meta)},
              "base": base, "space": {k: [v[0], list(v[1])] for k, v in SPACE.items()},
              "sampler_seed": sampler_seed}
    if resume:
        old = read_json_dict(out_dir / RECORD)
        if not is_tune_folder(out_dir) or old is None:
            raise UserError(f"{quoted(out_dir)} is not a tuning folder of fastattrec's (no "
                            f"{RECORD}); start one with fastattrec tune DATA -o "
                            f"{quoted(out_dir)}.")
        if old["data"]["fingerprint"] != record["data"]["fingerprint"]:
            raise UserError(f"{quoted(out_dir)} tunes another dataset than {quoted(data_dir)} "
                            f"(the one at {old['data']['path']} when it began; a dataset "
                            f"prepared again is another); give that one, or start a new "
                            f"tuning folder.")
        same = {k: v for k, v in old["base"].items() if k != "device"}
        if same != {k: v for k, v in base.items() if k != "device"} \
                or old["space"] != record["space"]:
            raise UserError(f"{quoted(out_dir)} searched other options (its {RECORD}); "
                            f"resume it with the fastattrec version that made it, or start "
                            f"a new folder.")
        record = old  # (a resumed search may move to another --device)
    else:
        if is_tune_folder(out_dir) and not force:
            raise UserError(f"{quoted(out_dir)} holds a search already; --resume continues "
                            f"its trials, --force starts again.")
        with claim_output(out_dir, force=force, made_by_us=is_tune_folder,
                          what="tuning folder", inputs=[Path(data_dir)], log=log) as target:
            target.mkdir(parents=True)
            atomic_write_json(target / RECORD, record)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out_dir / JOURNAL)))
    study = optuna.create_study(study_name="fastattrec", storage=storage, direction="maximize",
                                load_if_exists=True)
    # seeded by the trials already there too, so a resumed search does not draw again the
    # points it drew first
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.trials))
    _close_interrupted(study, optuna, log)
    done = _finished(study, optuna)
    left = trials - done
    if left <= 0:
        log(f"{quoted(out_dir)} already holds {done} finished trials; raise --trials to "
            f"run more.")
        return write_table(study, out_dir, optuna, base, data_dir)
    t0 = time.monotonic()

    def objective(trial: Any) -> float:
        from fastattrec.api import train
        from fastattrec.training.loop import Diverged

        params = suggest(trial)
        log(f"trial {trial.number}: " + " ".join(f"{k}={_fmt(v)}" for k, v in params.items()))
        run_dir = out_dir / TRIALS / f"{trial.number:04d}"
        trial.set_user_attr("run", str(run_dir.relative_to(out_dir)))
        t = time.monotonic()
        try:
            run = train(Path(data_dir), run_dir, force=True, **{**base, **params})
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted")
            raise
        except Diverged as e:  # not scored (and its epoch was not saved)
            trial.set_user_attr("error", first_error_line(e, 200))
            log(f"trial {trial.number}: diverged ({first_error_line(e, 120)})")
            raise optuna.TrialPruned() from None
        hist = run.history()
        best = hist.sort("val_metric", descending=True, maintain_order=True).row(0, named=True)
        trial.set_user_attr("best_epoch", int(best["epoch"]))
        trial.set_user_attr("epochs", int(hist.height))
        trial.set_user_attr("seconds", round(time.monotonic() - t, 1))
        value = float(best["val_metric"])
        prev = [x.value for x in study.trials
                if x.value is not None and x.number != trial.number]
        mark = "  (best so far)" if not prev or value > max(prev) else ""
        log(f"trial {trial.number}: val NDCG@{base.get('k', 10)}(full) {value:.4f} at epoch "
            f"{best['epoch']} of {hist.height}, {time.monotonic() - t:.0f} s{mark}")
        return value

    def save_table(study: Any, trial: Any) -> None:
        write_table(study, out_dir, optuna, base, data_dir)

    timeout = None if budget_s is None else max(0.0, budget_s - (time.monotonic() - t0))
    log(f"tuning {quoted(data_dir)} in {quoted(out_dir)}: up to {left} more "
        f"trial{'s' if left != 1 else ''}"
        + (f" ({done} finished already)" if done else "")
        + (f", none started after {budget_s / 60:.0f} min" if budget_s is not None else "")
        + f"; each trains a run in {quoted(out_dir / TRIALS)}")
    try:
        study.optimize(objective, n_trials=left, timeout=timeout, callbacks=[save_table],
                       catch=())
    finally:  # an interrupted or failed trial is in the table too
        frame = write_table(study, out_dir, optuna, base, data_dir)
    return frame


def _rounded(params: dict[str, Any]) -> dict[str, Any]:
    """Trial parameters as `suggest` used them (stepped floats without binary noise)."""
    return {k: round(v, 10) if SPACE.get(k, ("",))[0] == "float" else v
            for k, v in params.items()}


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _finished(study: Any, optuna: Any) -> int:
    """Trials that ran to the end: scored, or stopped because the run diverged."""
    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return sum(t.state in ended for t in study.trials)


def _close_interrupted(study: Any, optuna: Any, log: Callable[[str], None]) -> None:
    """A trial a killed tune left running is recorded as failed (a Ctrl-C already records
    it so); it is not scored, and the search goes on with new trials."""
    for t in study.trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            log(f"trial {t.number} was interrupted; it is recorded as failed")


def trials_frame(study: Any, optuna: Any) -> pl.DataFrame:
    """One row per trial: number, state, value, best_epoch, epochs, seconds, options, run."""
    rows = []
    for t in study.trials:
        rows.append({"trial": t.number, "state": t.state.name.lower(), "val_ndcg": t.value,
                     "best_epoch": t.user_attrs.get("best_epoch"),
                     "epochs": t.user_attrs.get("epochs"),
                     "seconds": t.user_attrs.get("seconds"),
                     **{k: _rounded(t.params).get(k) for k in SPACE},
                     "run": t.user_attrs.get("run"), "error": t.user_attrs.get("error")})
    schema = {"trial": pl.Int64, "state": pl.String, "val_ndcg": pl.Float64,
              "best_epoch": pl.Int64, "epochs": pl.Int64, "seconds": pl.Float64,
              **{k: (pl.String if SPACE[k][0] == "choice" and isinstance(SPACE[k][1][0], str)
                     else pl.Int64 if isinstance(SPACE[k][1][0], int) else pl.Float64)
                 for k in SPACE},
              "run": pl.String, "error": pl.String}
    return pl.DataFrame(rows, schema=schema)


def write_table(study: Any, out_dir: Path, optuna: Any, base: dict[str, Any],
                data_dir: Path) -> pl.DataFrame:
    """trials.csv and, once a trial is scored, best.toml: the shared options and the best
    trial's, with the dataset, for `fastattrec train -o RUN --config best.toml`."""
    frame = trials_frame(study, optuna)
    atomic_write_text(out_dir / TABLE, frame.write_csv())
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if done:
        best = max(done, key=lambda t: t.value)
        options = {**base, **_rounded(best.params), "data_dir": str(Path(data_dir).resolve())}
        lines = [f"# fastattrec tune: trial {best.number}, validation NDCG@"
                 f"{base.get('k', 10)} (full ranking) {best.value:.4f}",
                 f"# train it: fastattrec train -o RUN --config {out_dir / BEST}"]
        lines += [f"{k} = {_toml(v)}" for k, v in sorted(options.items())]
        atomic_write_text(out_dir / BEST, "\n".join(lines) + "\n")
    return frame


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float) and not isinstance(v, bool):
        return repr(float(v)) if isinstance(v, float) and math.isfinite(v) else str(v)
    return json.dumps(str(v))


def default_base() -> dict[str, Any]:
    """The options every trial shares unless a --config file says otherwise: up to 100
    epochs with early stopping after 5 without a better validation metric."""
    return {"epochs": 100, "early_stop": 5, "eval_every": 100}


def check_base(base: dict[str, Any]) -> dict[str, Any]:
    """The base options as TrainConfig checks them, less those the search sets."""
    clash = sorted(set(base) & set(SPACE))
    if clash:
        raise UserError(f"the --config file sets {', '.join(clash)}, which the search chooses; "
                        f"remove {'it' if len(clash) == 1 else 'them'} from the file.")
    fixed = sorted(k for k in set(base) & set(FIXED) if base[k] != FIXED[k])
    if fixed:
        raise UserError(f"the --config file sets {fixed[0]} = {base[fixed[0]]!r}, but every "
                        f"trial trains with {fixed[0]} = {FIXED[fixed[0]]!r} (more than one "
                        f"negative needs it); remove it from the file.")
    cfg = TrainConfig.of_preset(**base)
    cfg.check()
    return {k: v for k, v in asdict(cfg).items() if k in base}
