"""Every training option in one place: its default, help text, choices and bounds, and the
one check of a value against them.

Torch-free, so `fastattrec --help` stays fast. The `train` command's options are generated
from `TrainConfig` (cli.py), the API's keyword arguments are its fields, and a saved run's
config.json is one of them (`TrainConfig.from_dict`). `AttRecConfig` is the model's share
of it (docs/spec.md §2).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from fastattrec.errors import UserError, shown

MODES = ("inner", "dist")
NEGATIVE_MODES = ("fixed", "resample", "shared")
# training objectives (docs/spec.md §2.5): the notebook's pair losses, then the ones that
# take N negatives per positive, and the full softmax over every item
OBJECTIVES = ("pair", "bce", "gbce", "sampled-softmax", "softmax")
# The short-term attention backends (`fastattrec.kernels.BACKENDS`; a test keeps the two in
# step). `structured` is what `auto` runs on the CPU; the command offers the other three.
KERNELS = ("auto", "triton", "torch", "structured")
CLI_KERNELS = ("auto", "triton", "torch")
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16x3")  # `fastattrec.kernels.PRECISIONS`
DEVICES = ("auto", "cpu", "cuda")
# Starting values for the options a run does not set (`TrainConfig.of_preset`): the
# notebook's (the field defaults), and the settings chosen on real MovieLens-100K on
# validation metrics only (full-ranking NDCG@10 and sampled HR@10), with early stopping
# (docs/RESULTS.md, "Choosing the quality preset").
PRESETS: dict[str, dict] = {
    "notebook": {},
    "quality": dict(objective="bce", n_negatives=16, negatives="resample", dropout=0.2,
                    lr=3e-3, epochs=200, early_stop=5, eval_every=200),
}
# The options `train --resume` may change; every other one is the run's own.
RESUME_CHANGES = ("epochs", "device", "time_budget")
# The objectives the CPU's hand-written step computes (fastattrec/training/cpu_step.py).
HAND_WRITTEN_OBJECTIVES = ("pair", "bce", "gbce", "sampled-softmax")
SEED_MAX = 2**63 - 3  # the largest seed whose shuffle and negatives seeds (+1, +2) fit int64


def option(default: Any, help: str = "", *, choices: tuple | None = None,
           low: float | None = None, high: float | None = None, low_open: bool = False,
           flag: str | None = None, cli: bool = True, experimental: bool = False) -> Any:
    """A dataclass field with what the command line and the check need to know.

    `low`/`high`: inclusive bounds (`low_open`: the value must exceed `low`); `flag`: the
    option's name when it is not --name-with-dashes; `cli`: offered by `fastattrec train`
    (else API only); `experimental`: not measured to win yet, named at run start when set."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "low_open": low_open,
            "flag": flag, "cli": cli, "experimental": experimental}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every option of a training run (the notebook's defaults); saved in config.json."""

    maxlen: int = option(5, "L: items in the short-term window.", low=1)
    dim: int = option(100, "d: embedding size.", low=1)
    mode: str = option("inner", "inner: dot-product scores, log-sigmoid pair loss; dist: "
                       "squared distances of norm-clipped embeddings, hinge loss with --gamma.",
                       choices=MODES)
    w: float = option(0.5, "Weight of the long-term part (1-w for the short-term part).",
                      low=0.0, high=1.0)
    gamma: float = option(0.5, "Margin of mode dist.")
    embed_reg: float = option(1e-6, "lambda of the L2 term over the whole embedding tables.",
                              low=0.0)
    lr: float = option(1e-3, "Adam learning rate.", low=0.0, low_open=True)
    batch_size: int = option(1024, "Training samples per step.", low=1)
    epochs: int = option(40, "Epochs to train.", low=1)
    eval_every: int = option(5, "Test metrics every N epochs (and after the last).", low=1)
    k: int = option(10, "K of HR@K / NDCG@K in the log and for early stopping.", low=1,
                    flag="-k")
    seed: int = option(0, "Seed for initialisation, shuffling and resampled negatives.",
                       low=0, high=SEED_MAX)
    device: str = option("auto", "cpu, cuda (or cuda:N) or auto (cuda when available).")
    negatives: str = option("fixed", "fixed: the negatives drawn by prep, every epoch (the "
                            "notebook); resample: fresh negatives every epoch, uniform over "
                            "each user's unseen items; shared: every epoch, N items per "
                            "batch shared by all its samples (uniform over all items; a "
                            "negative equal to a sample's target is masked), which makes "
                            "hundreds of negatives cheap.", choices=NEGATIVE_MODES)
    objective: str = option("pair", "Training loss (docs/spec.md §2.5). pair: the "
                            "notebook's (inner: -log sigmoid(s+ - s-); dist: hinge with "
                            "--gamma); bce: binary cross-entropy over the target and N "
                            "negatives; gbce: bce with the target's probability raised to "
                            "beta (gSASRec; --gbce-t); sampled-softmax: softmax over the "
                            "target and N negatives; softmax: over every item (one score "
                            "per item and sample each step: fine up to tens of thousands "
                            "of items).", choices=OBJECTIVES)
    n_negatives: int = option(1, "N: negatives per positive (more than 1 needs --negatives "
                              "resample or shared; the softmax objective uses none).",
                              low=1, high=100_000)
    gbce_t: float = option(0.75, "gbce's calibration t in [0, 1]: 0 is plain bce, 1 "
                           "calibrates the scores to the full-softmax probabilities.",
                           low=0.0, high=1.0)
    dropout: float = option(0.0, "Dropout rate on the user and window-item embeddings "
                            "during training (0: off, the notebook).", low=0.0, high=0.9)
    time_budget: float = option(0.0, "Seconds of training (fit and validation of every epoch, "
                                "resumed epochs included) to stay within: no epoch starts "
                                "that would, at the last one's pace, end later; best.pt keeps "
                                "the best. 0: no limit. May change on --resume.", low=0.0)
    early_stop: int = option(0, "Stop after N epochs without a better validation NDCG@K "
                             "(full ranking of the validation targets); 0: never. best.pt "
                             "keeps the best epoch.", low=0)
    kernel: str = option("auto", "Short-term attention: triton (the fused kernel, CUDA), "
                         "torch (the plain reference), auto (on CPU the hand-written step; "
                         "on CUDA whichever of triton and torch runs the training step "
                         "faster, timed on this GPU at the start and recorded in "
                         "config.json).", choices=KERNELS)
    precision: str = option("ieee", "Triton kernel's d x d products: ieee float32; tf32x3 / "
                            "bf16x3 three tensor-core products each; tf32 one. Not yet timed "
                            "on a GPU.", choices=PRECISIONS, cli=False, experimental=True)
    compile: bool = option(True, "Fuse the training step with torch.compile. On CUDA the "
                           "step is also captured as a CUDA graph and replayed. On CPU the "
                           "step's arithmetic becomes generated C++: the first step "
                           "compiles for 10-25 s on 2 cores, a resume or a later run 5-12 s "
                           "(Inductor's cache), then 1.5-1.8x faster per epoch on ML-100K; "
                           "without a working compiler it runs uncompiled, with a warning.")
    ndcg_log: str = option("2", "NDCG's log base: 2 (standard) or e (the notebook's, 1.44x "
                           "higher).", choices=("2", "e"))
    threads: int = option(0, "CPU threads for torch. 0: one per core that is not busy with "
                          "other work when the run starts (beside a busy process, fewer "
                          "threads are faster than waiting for a shared core). The number "
                          "used is saved with the run and reused by --resume: results "
                          "depend on it in the last bits.", low=0, high=1024)
    graph_steps: int = option(1, "CUDA with compile: training steps recorded in one CUDA "
                              "graph. Not yet timed on a GPU.", low=1, high=4096, cli=False,
                              experimental=True)
    one_scatter: bool = option(False, "Every table row by one gather and every table "
                               "gradient by one deterministic scatter, planned per epoch; on "
                               "CUDA with the Triton tile layout, the step as eight Triton "
                               "launches. Not yet timed on a GPU.", cli=False,
                               experimental=True)
    preset: str = option("notebook", "Starting values of every option not given: notebook "
                         "(the defaults shown here) or quality (binary cross-entropy over 16 "
                         "fresh negatives per positive, dropout 0.2, learning rate 0.003, up "
                         "to 200 epochs with early stopping after 5 without a better "
                         "validation NDCG; chosen on MovieLens-100K validation metrics, "
                         "docs/RESULTS.md).", choices=tuple(PRESETS))
    data_dir: str = option("", "The prepared dataset (set by `train`).", cli=False)

    def check(self) -> None:
        """Explain the first bad option in one sentence (a UserError)."""
        for f in fields(self):
            check_value(f, getattr(self, f.name))
        if self.objective == "softmax" and (self.n_negatives > 1
                                            or self.negatives == "shared"):
            raise UserError("--objective softmax scores every item and takes no negatives; "
                            "drop --n-negatives and --negatives shared.")
        if self.n_negatives > 1 and self.negatives == "fixed":
            raise UserError(f"--n-negatives {self.n_negatives} needs fresh negatives: add "
                            f"--negatives resample (or shared); prep stored one per sample.")
        if self.objective != "gbce" and self.gbce_t != TrainConfig.gbce_t:
            raise UserError(f"--gbce-t applies to --objective gbce only (this run's "
                            f"objective is {self.objective}); drop it or add --objective gbce.")

    def default_step(self) -> bool:
        """Whether this run trains the notebook's objective with one negative and no
        dropout (what the experimental one_scatter step computes)."""
        return (self.objective == "pair" and self.n_negatives == 1
                and self.negatives != "shared" and self.dropout == 0.0)

    def hand_written_step(self) -> bool:
        """Whether the CPU's hand-written step computes this run's loss: objective pair,
        bce, gbce or sampled-softmax with per-sample negatives, with or without dropout
        (else the step is autograd's)."""
        return self.objective in HAND_WRITTEN_OBJECTIVES and self.negatives != "shared"

    def experimental(self) -> list[str]:
        """The experimental options this run sets away from their defaults."""
        return [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                if f.metadata.get("experimental") and getattr(self, f.name) != f.default]

    @classmethod
    def of_preset(cls, **given: Any) -> TrainConfig:
        """The options `given`, the rest from preset `given["preset"]` (default notebook),
        then from the field defaults. Unknown names raise TypeError (as the constructor)."""
        name = given.get("preset", "notebook")
        if name not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {shown(name)}.")
        return cls(**{**PRESETS[name], **given})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From a saved config.json's "train" part (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flag_of(f: Any) -> str:
    """The command-line spelling of field `f`."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def check_value(f: Any, v: Any) -> None:
    """Check value `v` of dataclass field `f` against its type, choices and bounds."""
    meta, name = f.metadata, flag_of(f)
    kind = type(f.default) if f.default is not MISSING else None
    if kind is bool:
        if not isinstance(v, bool):
            raise UserError(f"{name} must be true or false, got {shown(v)}.")
        return
    if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
        raise UserError(f"{name} must be an integer, got {shown(v)}.")
    if kind is float:
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise UserError(f"{name} must be a number, got {shown(v)}.")
        if not math.isfinite(v):
            raise UserError(f"{name} must be a finite number, got {v}.")
    if kind is str and not isinstance(v, str):
        raise UserError(f"{name} must be a string, got {shown(v)}.")
    if meta.get("choices") and v not in meta["choices"]:
        raise UserError(f"{name} must be one of {', '.join(meta['choices'])}, got {shown(v)}.")
    low, high = meta.get("low"), meta.get("high")
    if low is not None and high is not None and not low <= v <= high:
        raise UserError(f"{name} must be between {_num(low)} and {_num(high)}, got {v}.")
    if low is not None and meta.get("low_open") and not v > low:
        raise UserError(f"{name} must be positive, got {v}." if low == 0 else
                        f"{name} must be more than {_num(low)}, got {v}.")
    if low is not None and not v >= low:
        raise UserError(f"{name} must not be negative, got {v}." if low == 0 else
                        f"{name} must be at least {_num(low)}, got {v}.")


def _num(x: float) -> str:
    if x == SEED_MAX:
        return "2^63 - 3"
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass
class AttRecConfig:
    """Every hyper-parameter of the model (docs/spec.md §2); defaults as TrainConfig's."""

    n_users: int  # table rows, padding row 0 included
    n_items: int  # table rows, padding row 0 included
    dim: int = TrainConfig.dim
    maxlen: int = TrainConfig.maxlen
    mode: str = TrainConfig.mode
    w: float = TrainConfig.w  # weight of the long-term part
    gamma: float = TrainConfig.gamma  # margin in mode "dist"
    embed_reg: float = TrainConfig.embed_reg  # lambda of the whole-table L2 term
    kernel: str = TrainConfig.kernel  # short-term attention backend (KERNELS)
    precision: str = TrainConfig.precision  # Triton dot precision (PRECISIONS)
    objective: str = TrainConfig.objective  # training loss (OBJECTIVES)
    n_negatives: int = TrainConfig.n_negatives  # negatives per positive (gbce's beta)
    gbce_t: float = TrainConfig.gbce_t
    dropout: float = TrainConfig.dropout  # on user and window embeddings, training only
    shared_negatives: bool = False  # negatives shared by a batch: one equal to a target is masked

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @classmethod
    def of_run(cls, cfg: TrainConfig, n_users: int, n_items: int, kernel: str) -> AttRecConfig:
        """The model of a run with options `cfg`, its kernel resolved to `kernel`."""
        return cls(n_users=n_users, n_items=n_items, dim=cfg.dim, maxlen=cfg.maxlen,
                   mode=cfg.mode, w=cfg.w, gamma=cfg.gamma, embed_reg=cfg.embed_reg,
                   kernel=kernel, precision=cfg.precision, objective=cfg.objective,
                   n_negatives=cfg.n_negatives, gbce_t=cfg.gbce_t, dropout=cfg.dropout,
                   shared_negatives=cfg.negatives == "shared")

    def to_dict(self) -> dict:
        return asdict(self)


# ---- a configuration file: `fastattrec train --config FILE` ----

CONFIG_HINT = ("a TOML file of option = value lines (the names of a run's config.json "
               "under \"train\", such as dim = 64), optionally under a [train] table, or a "
               "run's own config.json")


def read_config_file(path: Any) -> dict[str, Any]:
    """The training options a configuration file sets, each checked against its bounds:
    TOML (top-level keys and/or a [train] table) or JSON (a run's config.json, whose
    "train" part is used, or a flat object). Names are config.json's (dashes may stand for
    underscores); `data_dir` is the prepared dataset, relative to the working folder."""
    import json
    import sys
    from pathlib import Path

    from fastattrec.errors import quoted

    path = Path(path)
    where = quoted(path)
    if not path.is_file():
        why = "does not exist" if not path.exists() else "is not a file"
        raise UserError(f"configuration file {where} {why}; give {CONFIG_HINT}.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise UserError(f"cannot read configuration file {where} ({reason}); give "
                        f"{CONFIG_HINT}.") from None
    is_json = path.suffix.lower() == ".json" or text.lstrip().startswith("{")
    if is_json:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise UserError(f"{where} is not valid JSON ({str(e).splitlines()[0]}); give "
                            f"{CONFIG_HINT}.") from None
        if not isinstance(doc, dict):
            raise UserError(f"{where} holds a JSON {type(doc).__name__}, not an object of "
                            f"options; give {CONFIG_HINT}.")
        table = doc["train"] if isinstance(doc.get("train"), dict) else doc
        if table is doc and doc.get("kind") == "fastattrec-run":
            raise UserError(f"{where} is a run's config.json without its \"train\" part; "
                            f"it is damaged.")
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{where} is not valid TOML ({str(e).splitlines()[0]}); give "
                            f"{CONFIG_HINT}.") from None
        table = {k: v for k, v in doc.items() if k != "train"}
        inner = doc.get("train", {})
        if not isinstance(inner, dict):
            raise UserError(f"{where}{_line_of(text, 'train')}: train must be a [train] "
                            f"table of options; give {CONFIG_HINT}.")
        twice = sorted(set(table) & set(inner))
        if twice:
            raise UserError(f"{where}: {twice[0]} is set both at the top and under [train]; "
                            f"keep one.")
        table = {**table, **inner}
    return _checked_options(table, where, None if is_json else text)


def _checked_options(table: dict[str, Any], where: str, toml_text: str | None
                     ) -> dict[str, Any]:
    """`table`'s options under their field names, each value checked, or one sentence
    naming the file, the key (and in TOML its line) and the fix."""
    import difflib

    names = {f.name: f for f in fields(TrainConfig)}
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        line = _line_of(toml_text, str(key)) if toml_text is not None else ""
        if name not in names:
            close = difflib.get_close_matches(name, list(names), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{where}{line}: {shown(key)} is not a training option{hint}; the "
                            f"options are {', '.join(sorted(names))}.")
        if isinstance(value, dict | list):
            raise UserError(f"{where}{line}: {name} must be a single value, not a "
                            f"{'table' if isinstance(value, dict) else 'list'}.")
        f = names[name]
        if name == "data_dir":
            if not isinstance(value, str) or not value:
                raise UserError(f"{where}{line}: data_dir must be the prepared dataset's "
                                f"folder as text, got {shown(value)}.")
        else:
            try:
                check_value(f, value)
            except UserError as e:
                msg = str(e)
                flag = flag_of(f)
                if msg.startswith(flag + " "):
                    msg = name + msg[len(flag):]
                raise UserError(f"{where}{line}: {msg}") from None
        out[name] = value
    return out


def _line_of(text: str | None, key: str) -> str:
    """', line N' of the first TOML line that sets `key` (or opens table [key])."""
    import re

    if not text:
        return ""
    pattern = re.compile(rf"^\s*(\[\s*{re.escape(key)}\s*\]|[\"']?{re.escape(key)}[\"']?\s*=)")
    for n, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return f", line {n}"
    return ""
