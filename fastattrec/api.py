"""The Python API: prepare -> train -> evaluate -> recommend, returning Polars frames and
small objects to inspect. The `fastattrec` command is a thin parser over these functions,
and they raise the same one-sentence `UserError`s the command prints.

    import fastattrec as fa
    data = fa.prepare("ratings.dat", "data/ml1m")
    run = fa.train(data, "runs/ml1m", epochs=40)
    run.evaluate(ks=[10])            # polars.DataFrame: model x protocol -> HR, NDCG, MRR
    run.recommend(users=[1, 2], k=5) # polars.DataFrame: raw_user, rank, raw_item, score
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from fastattrec.errors import UserError, shown

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, str | Path) or (isinstance(value, str) and not value):
        raise UserError(f"{name} must be a path (text or pathlib.Path), got {shown(value)}.")
    return Path(value)


def _data(name: str, value: Any) -> Path:
    """A prepared dataset given as a `Dataset` or as its folder's path."""
    return value.path if isinstance(value, Dataset) else _path(name, value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):  # "no" is true to Python: refuse anything but a bool
        raise UserError(f"{name} must be True or False, got {shown(value)}.")
    return value


def _text(name: str, value: Any, optional: bool = False) -> str | None:
    if not (isinstance(value, str) or (optional and value is None)):
        raise UserError(f"{name} must be text{' or None' if optional else ''}, got "
                        f"{shown(value)}.")
    return value


def _log(name: str, value: Any) -> Log:
    if not callable(value):
        raise UserError(f"{name} must be a function taking one message (such as print), got "
                        f"{shown(value)}.")
    return value


def _int(name: str, value: Any, low: int, high: int = 2**63 - 1) -> int:
    if type(value) is not int or not low <= value <= high:  # noqa: E721 - no bool, no float
        raise UserError(f"{name} must be a whole number from {low} to {high}, got "
                        f"{shown(value)}.")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{name} must be a number, got {shown(value)}.")
    return float(value)


@dataclass
class Dataset:
    """A prepared dataset folder (docs/formats.md §1): where it is and its meta.json."""

    path: Path
    meta: dict[str, Any]

    @property
    def counts(self) -> dict[str, int]:
        """Users, items, interactions and samples, as `prep` counted them."""
        return dict(self.meta["counts"])

    @property
    def fingerprint(self) -> str:
        """The identity a run records (docs/formats.md §1.5)."""
        from fastattrec.data.dataset import fingerprint

        return fingerprint(self.meta)

    def __repr__(self) -> str:
        c = self.counts
        return (f"Dataset({str(self.path)!r}: {c['users']:,} users, {c['items']:,} items, "
                f"{c['interactions']:,} interactions)")


def load_dataset(path: str | Path) -> Dataset:
    """Open a folder written by `prepare` / `fastattrec prep`."""
    from fastattrec.data.dataset import read_meta

    path = _path("path", path)
    return Dataset(path, read_meta(path))


def prepare(source: str | Path, out: str | Path, *, format: str = "auto",
            user_col: str | None = None, item_col: str | None = None,
            time_col: str | None = None, rating_col: str | None = None,
            trans_score: float | None = None, min_user_interactions: int | None = None,
            min_item_interactions: int | None = None, split: str = "leave-one-out",
            val_fraction: float | None = None, test_fraction: float | None = None,
            val_from: float | int | str | None = None,
            test_from: float | int | str | None = None, test_negatives: int | None = None,
            compat: str = "none", seed: int = 0, streaming: bool = False,
            force: bool = False, log: Log = _quiet) -> Dataset:
    """Prepare a ratings log into `out` (docs/spec.md §1); options as `fastattrec prep`
    (`min_user_interactions`, `min_item_interactions`: the iterated k-core, §1.10;
    `split` "leave-one-out", "time" or "ratio" with `val_fraction`, `test_fraction`, or
    the time cuts `val_from`, `test_from` (numbers in the log's units, or dates), §1.11)."""
    from fastattrec.data.prepare import PrepOptions
    from fastattrec.data.prepare import prepare as run_prep
    from fastattrec.data.readers import ColumnNames
    from fastattrec.data.splits import SplitOptions

    source, out = _path("source", source), _path("out", out)
    for name, v in (("format", format), ("compat", compat), ("split", split)):
        _text(name, v)
    for name, v in (("user_col", user_col), ("item_col", item_col), ("time_col", time_col),
                    ("rating_col", rating_col)):
        _text(name, v, optional=True)
    _flag("streaming", streaming)
    _flag("force", force)
    _log("log", log)
    if test_negatives is not None:
        _int("test_negatives", test_negatives, 1)
    for name, v in (("min_user_interactions", min_user_interactions),
                    ("min_item_interactions", min_item_interactions)):
        if v is not None:  # the type here; the bounds, in the command's words, by prep
            _int(name, v, -2**63)
    if trans_score is not None:
        trans_score = _number("trans_score", trans_score)
    fractions = [None if v is None else _number(name, v) for name, v in
                 (("val_fraction", val_fraction), ("test_fraction", test_fraction))]
    for name, v in (("val_from", val_from), ("test_from", test_from)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float | str)):
            raise UserError(f"{name} must be a time (a number, or a date as text), got "
                            f"{shown(v)}.")
    _int("seed", seed, 0)
    opts = PrepOptions(fmt=format, columns=ColumnNames(user_col, item_col, time_col,
                                                       rating_col),
                       trans_score=trans_score, test_negatives=test_negatives, compat=compat,
                       seed=seed, streaming=streaming,
                       min_user_interactions=min_user_interactions,
                       min_item_interactions=min_item_interactions,
                       split=SplitOptions(split, *fractions, val_from, test_from))
    run_prep(Path(source), Path(out), opts, force=force, log=log)
    return load_dataset(out)


def synthesize(out: str | Path, *, users: int = 6040, items: int = 3706,
               interactions: int = 1_000_209, seed: int = 0, clusters: int | None = None,
               switch: float = 0.15, force: bool = False) -> Path:
    """Write a synthetic MovieLens-format log with sequential structure; returns its path."""
    from fastattrec.data.synth import synthesize as synth

    out = _path("out", out)
    _flag("force", force)
    for name, v, low in (("users", users, 1), ("items", items, 2),
                         ("interactions", interactions, 1), ("seed", seed, 0)):
        _int(name, v, low)
    if clusters is not None:
        _int("clusters", clusters, 1)
    synth(out, users, items, interactions, seed, clusters, _number("switch", switch),
          force=force)
    return Path(out)


@dataclass
class Run:
    """A training run folder (docs/formats.md §2): its options and per-epoch history."""

    path: Path
    options: dict[str, Any]
    _history: list[dict] = field(default_factory=list, repr=False)
    # What the last `evaluate` measured, as written to eval.json.
    last_evaluation: dict[str, Any] | None = field(default=None, repr=False)
    # The users of the last `recommend(histories=...)` that the dataset lacks (scored with
    # the mean trained user).
    new_users: list[Any] = field(default_factory=list, repr=False)
    # How the last histories file's rows were put in order (by its time column, or as given).
    history_order: str = field(default="", repr=False)

    @property
    def data(self) -> Dataset:
        """The prepared dataset the run trains on."""
        return load_dataset(self.options["data_dir"])

    def history(self) -> pl.DataFrame:
        """One row per completed epoch: losses, validation metric, timings (and the test
        metrics at K of the run, sampled and full, on the epochs that measured them)."""
        rows = []
        for h in self._history:
            row = {k: v for k, v in h.items() if k != "test"}
            for proto, m in h.get("test", {}).items():
                for name in (f"HR@{h['k']}", f"NDCG@{h['k']}", f"Recall@{h['k']}", "MRR"):
                    if name in m:
                        row[f"test_{proto}_{name}"] = m[name]
            rows.append(row)
        return pl.DataFrame(rows) if rows else pl.DataFrame()

    def evaluate(self, protocol: str = "both", ks: Sequence[int] = (1, 5, 10, 20),
                 ndcg_log: str | None = None, checkpoint: str = "auto", device: str = "auto",
                 baseline: bool = True, data: Dataset | str | Path | None = None,
                 save: bool = True) -> pl.DataFrame:
        """Test metrics of the model (and the popularity baseline): one row per (model,
        protocol), columns HR@K, NDCG@K per K and MRR (docs/spec.md §4). With `save`, also
        written to eval.json in the run folder (when no other command holds it)."""
        from fastattrec.data.dataset import fingerprint
        from fastattrec.evaluate import PROTOCOLS, ModelRanker, PopularityRanker, evaluate

        if protocol not in PROTOCOLS:
            raise UserError(f"protocol must be one of {', '.join(PROTOCOLS)}, got "
                            f"{shown(protocol)}.")
        if ndcg_log not in (None, "2", "e"):
            raise UserError(f"ndcg_log must be '2' or 'e', got {shown(ndcg_log)}.")
        if isinstance(ks, str | bytes) or not isinstance(ks, Iterable):
            raise UserError(f"ks must be a list of cut-offs such as [5, 10], got {shown(ks)}.")
        ks = sorted(set(_int("-k", k, 1, 10**9) for k in ks))
        if not ks:
            raise UserError("ks is empty; give at least one cut-off, such as [10].")
        _flag("baseline", baseline)
        _flag("save", save)
        loaded = _open(self.path, checkpoint, device, data)
        ndcg_log = ndcg_log or loaded.cfg.ndcg_log
        maxlen = loaded.model.cfg.maxlen  # the checkpoint's own, which config.json matches
        t = time.perf_counter()
        results = {"AttRec": evaluate(ModelRanker(loaded.model), loaded.data, maxlen,
                                      protocol, ks, ndcg_log)}
        seconds = time.perf_counter() - t
        if baseline:
            pop = PopularityRanker(loaded.data.item_popularity())
            results["popularity"] = evaluate(pop, loaded.data, maxlen, protocol, ks, ndcg_log)
        self.last_evaluation = {"checkpoint": loaded.checkpoint, "epoch": loaded.epoch,
                                "ndcg_log": ndcg_log, "seconds": seconds, "results": results,
                                "data": {"path": str(loaded.prepared.path.resolve()),
                                         "fingerprint": fingerprint(loaded.prepared.meta)}}
        if save:
            save_evaluation(loaded, self.last_evaluation)
        return evaluation_frame(self.last_evaluation, ks)

    def recommend(self, users: Iterable[Any] | None = None, k: int = 10,
                  checkpoint: str = "auto", device: str = "auto",
                  titles: str | Path | pl.DataFrame | None = None,
                  data: Dataset | str | Path | None = None,
                  allow_missing: bool = False, histories: Any = None,
                  skip_unknown: bool = False,
                  history_source: str = "histories") -> pl.DataFrame:
        """Top-k unseen items per user (raw ids, each user once in the order first given;
        None: every user) from their latest window: columns raw_user, rank, raw_item,
        score, and title with `titles` (the dataset's item file, any format `recommend
        --items` reads, or a frame of raw_item, title). The titles must cover the run's
        dataset (`allow_missing`: a missing title is null). A user with fewer than k
        unseen items gets only those.

        `histories` (instead of `users`) scores histories the model was not trained on
        (docs/spec.md §4.10): a dict {user: [item ids, oldest first]} (key None: a new user
        without an id), a frame of user, item (and optionally time) rows, or the path of a
        file of such rows (`recommend --histories`). A user of the
        dataset keeps their long-term embedding and their dataset items count as seen; any
        other user gets the mean trained user (their ids are then in `self.new_users`).
        An item the dataset lacks is refused, or left out with `skip_unknown`."""
        import torch

        from fastattrec.errors import quoted
        from fastattrec.recommend import (
            check_titles,
            dense_users,
            match_titles,
            read_titles,
            recommend_frame,
        )

        _int("-k", k, 1, 10**9)
        _flag("allow_missing", allow_missing)
        _flag("skip_unknown", skip_unknown)
        if histories is not None and users is not None:
            raise UserError("give users (their latest windows) or histories (new ones), not "
                            "both.")
        if users is not None and (isinstance(users, str | bytes | int)
                                  or not isinstance(users, Iterable)):
            raise UserError(f"users must be a list of raw user ids (or None for every user), "
                            f"got {shown(users)}.")
        if isinstance(titles, pl.DataFrame):
            check_titles(titles)
            source = "titles"
        elif titles is not None:
            source = quoted(_path("titles", titles))
            titles = read_titles(_path("titles", titles))
        loaded = _open(self.path, checkpoint, device, data)
        if titles is not None:
            titles = match_titles(loaded, titles, source, allow_missing)
        dev = loaded.data.device
        if histories is not None:
            from fastattrec import histories as hist

            if isinstance(histories, str | Path):
                h = hist.from_frame(loaded, hist.read_histories(Path(histories)),
                                    quoted(histories), skip_unknown)
                self.history_order = h.order
            elif isinstance(histories, pl.DataFrame):
                h = hist.from_frame(loaded, histories, "histories", skip_unknown)
            else:
                h = hist.from_mapping(loaded, histories, skip_unknown, history_source)
            self.new_users = [u for u, row in zip(h.raw_users.to_list(), h.users.tolist(),
                                                  strict=True) if row == 0 and u is not None]
            return hist.recommend_histories(loaded, h, k, titles)
        if users is None:
            dense = torch.arange(1, loaded.prepared.n_users + 1, device=dev)
        else:
            users = list(users)
            if not users:
                raise UserError("users is empty; give raw user ids, or None for every user.")
            dense = torch.as_tensor(dense_users(loaded, users), device=dev)
        return recommend_frame(loaded, dense, k, titles)

    @property
    def model(self):
        """The trained `fastattrec.model.AttRec` (the checkpoint `evaluate` scores: best.pt
        with early stopping, else the last), on the CPU in eval mode; each access loads a
        fresh copy from the run folder."""
        return _open(self.path, "auto", "cpu", None).model

    def item_embeddings(self, checkpoint: str = "auto") -> pl.DataFrame:
        """One row per item of the dataset: raw_item, E (its embedding in windows and in the
        short-term score) and E2 (in the long-term score), each an array of d float32
        (docs/spec.md §2.1)."""
        loaded = _open(self.path, checkpoint, "cpu", None)
        rows = loaded.prepared.item_rows.astype("int64")
        d = loaded.model.cfg.dim
        return pl.DataFrame({
            "raw_item": loaded.prepared.raw_items,
            "E": pl.Series(loaded.model.item_emb.detach()[rows].numpy(),
                           dtype=pl.Array(pl.Float32, d)),
            "E2": pl.Series(loaded.model.item2_emb.detach()[rows].numpy(),
                            dtype=pl.Array(pl.Float32, d)),
        })

    def export(self, out: str | Path, checkpoint: str = "auto",
               data: Dataset | str | Path | None = None, force: bool = False) -> Path:
        """Write the run as one file a serving stack loads: `.pt2` (torch.export) or
        `.onnx`, from the name's extension, computing goodness(users, windows) of every
        item with the id maps inside (docs/formats.md §5). `force` replaces only an export
        fastattrec wrote."""
        from fastattrec.export import export_folder

        _text("checkpoint", checkpoint)
        _flag("force", force)
        return export_folder(self.path, Path(_path("out", out)), checkpoint,
                             None if data is None else _data("data", data), force)

    def __repr__(self) -> str:
        done = self._history[-1]["epoch"] if self._history else 0
        return f"Run({str(self.path)!r}: {done}/{self.options['epochs']} epochs)"


def _open(path: Path, checkpoint: Any, device: Any, data: Any):
    """The run's model and data (runs.load_run), its arguments checked first."""
    from fastattrec.runs import load_run as open_run

    _text("checkpoint", checkpoint)
    _text("device", device)
    return open_run(path, checkpoint, device, None if data is None else _data("data", data))


def metrics_frame(results: dict[str, dict[str, dict]], ks: Sequence[int]) -> pl.DataFrame:
    """{model: {protocol: metrics}} -> one row per (model, protocol)."""
    rows = []
    for model, per_proto in results.items():
        for proto, m in per_proto.items():
            row: dict[str, Any] = {"model": model, "protocol": proto}
            row.update({f"HR@{k}": m[f"HR@{k}"] for k in ks})
            row.update({f"NDCG@{k}": m[f"NDCG@{k}"] for k in ks})
            row.update({f"Recall@{k}": m[f"Recall@{k}"] for k in ks if f"Recall@{k}" in m})
            row.update({"MRR": m["MRR"], "users": m["users"]})
            rows.append(row)
    return pl.DataFrame(rows)


def evaluation_frame(evaluation: dict[str, Any], ks: Sequence[int]) -> pl.DataFrame:
    """What `Run.evaluate` returns, from its record (`Run.last_evaluation`): one row per
    (model, protocol) with the checkpoint and epoch scored."""
    return metrics_frame(evaluation["results"], ks).with_columns(
        pl.lit(evaluation["checkpoint"]).alias("checkpoint"),
        pl.lit(evaluation["epoch"]).alias("epoch"))


def save_evaluation(loaded, payload: dict) -> None:
    """eval.json, written under the run folder's lock and only if the checkpoint scored is
    still the run's (a run being trained or replaced meanwhile keeps its own files)."""
    from fastattrec.atomic import atomic_write_json
    from fastattrec.outputs import exclusive_lock

    try:
        with exclusive_lock(loaded.run_dir):
            if not loaded.unchanged():
                raise UserError(f"the run's {loaded.checkpoint} checkpoint changed while it "
                                f"was being evaluated; evaluate again")
            atomic_write_json(Path(loaded.run_dir) / "eval.json", payload)
    except UserError as e:
        raise UserError(f"the metrics were not saved to eval.json: "
                        f"{str(e).rstrip('.')}.") from None


def load_run(path: str | Path) -> Run:
    """Open a run folder written by `train` / `fastattrec train` (finished or not)."""
    from fastattrec.training.checkpoint import read_run_config

    path = _path("path", path)
    cfg = read_run_config(path)
    return Run(path, dict(cfg["train"]), _read_history(path))


def _read_history(path: Path) -> list[dict]:
    """The committed epochs, as metrics.jsonl lists them (written from the checkpoint)."""
    try:
        lines = (path / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if x.strip()]
    except (OSError, ValueError):
        return []


def train(data: Dataset | str | Path | None, out: str | Path, *, force: bool = False,
          progress: bool = False, log: Log = _quiet, distributed: Any = None,
          config: str | Path | None = None, **options: Any) -> Run:
    """Train AttRec on a prepared dataset into the run folder `out`. Options are those of
    `fastattrec train` with underscores (epochs=40, dim=100, maxlen=5, mode="inner",
    lr=1e-3, device="auto", ...; docs/spec.md §3); `config`: a TOML file (or a run's
    config.json) of options, which those given here override; `preset="quality"` changes
    the starting values of those given nowhere (fastattrec.config.PRESETS). `data` may be
    None when the file names the dataset (data_dir). `distributed` is set by the command
    when torchrun launched it."""
    from fastattrec.config import TrainConfig, read_config_file
    from fastattrec.training import train as run_training

    out = _path("out", out)
    if config is not None:
        options = {**read_config_file(_path("config", config)), **options}
    from_file = options.pop("data_dir", None)
    if data is None and from_file is None:
        raise UserError("data must be the prepared dataset (a Dataset or its folder's "
                        "path), got None; give it, or set data_dir in the configuration "
                        "file.")
    data_dir = _data("data", data if data is not None else from_file)
    _flag("force", force)
    _flag("progress", progress)
    _log("log", log)
    try:
        cfg = TrainConfig.of_preset(**options)
    except TypeError:
        known = ", ".join(sorted(set(TrainConfig.__dataclass_fields__) - {"data_dir"}))
        unknown = sorted(set(options) - set(TrainConfig.__dataclass_fields__))
        raise UserError(f"unknown training option(s) {', '.join(unknown)}; the options are: "
                        f"{known}.") from None
    res = run_training(data_dir, out, cfg, log=log, progress=progress, force=force,
                       distributed=distributed)
    return Run(res.run_dir, asdict(cfg), res.history)


def resume(path: str | Path, *, epochs: int | None = None, device: str | None = None,
           time_budget: float | None = None, data: Dataset | str | Path | None = None,
           progress: bool = False, log: Log = _quiet, distributed: Any = None) -> Run:
    """Continue an interrupted run (same data and options but `epochs`, `device` and
    `time_budget`; `data` if the dataset moved, with the run's fingerprint)."""
    from fastattrec.config import TrainConfig
    from fastattrec.training import train as run_training
    from fastattrec.training.checkpoint import read_run_config

    path = _path("path", path)
    if epochs is not None:
        _int("epochs", epochs, 1, 10**9)
    if device is not None:
        _text("device", device)
    if time_budget is not None:
        _number("time_budget", time_budget)
    data = None if data is None else _data("data", data)
    _flag("progress", progress)
    _log("log", log)
    changes = {k: v for k, v in (("epochs", epochs), ("device", device),
                                 ("time_budget", time_budget)) if v is not None}
    base = (TrainConfig.from_dict({**read_run_config(path)["train"], **changes})
            if changes else None)
    res = run_training(data, path, base, resume=True, log=log, progress=progress,
                       distributed=distributed)
    run = load_run(res.run_dir)
    run._history = res.history
    return run
