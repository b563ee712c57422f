"""What every `fastattrec` command shares: user mistakes and failed writes as one line,
Ctrl-C and SIGTERM reported, messages on stderr, the command group and its tables."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from fastattrec.errors import UserError, one_line


def user_errors(fn):
    """Turn a UserError, or a failed write to a full, read-only or forbidden place, into
    click's one-line 'Error: ...' and exit status 1. Anything else is a bug and keeps its
    traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from fastattrec.atomic import is_write_failure
        from fastattrec.outputs import write_error

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(one_line(str(e))) from None
        except OSError as e:
            if not is_write_failure(e) and not (e.filename and e.errno in PATH_ERRNOS):
                raise
            raise click.ClickException(one_line(str(write_error(
                Path(e.filename or "the output"), e)))) from None

    return wrapper


PATH_ERRNOS = {13, 20, 21, 28, 30, 122}  # EACCES ENOTDIR EISDIR ENOSPC EROFS EDQUOT


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same clean-up runs."""


def interruptible(snapshot, report):
    """Ctrl-C or SIGTERM during the command: instead of click's bare "Aborted!", print what
    was kept and how to go on (`report(state, **kwargs)`, where `state` is what
    `snapshot(**kwargs)` saw before the command began), then exit with status 130 (SIGINT)
    or 143 (SIGTERM). Only rank 0 of a torchrun launch speaks."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            import os
            import signal

            def terminate(signum, frame):  # noqa: ANN001, ARG001
                raise Terminated

            state = snapshot(**kwargs)
            try:
                previous = signal.signal(signal.SIGTERM, terminate)
            except ValueError:  # not the main thread: SIGTERM keeps its default
                previous = None
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt as e:
                if os.environ.get("RANK", "0") == "0":
                    click.echo(report(state, **kwargs), err=True)
                sys.exit(143 if isinstance(e, Terminated) else 130)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)

        return wrapper

    return deco


def file_stamp(path: Path | None) -> tuple[int, int] | None:
    """Identity of a file (inode, mtime): a file written again, by rename, is another."""
    try:
        st = Path(path).stat()
    except (OSError, TypeError):
        return None
    return (st.st_ino, st.st_mtime_ns)


def say(msg: str) -> None:
    click.echo(msg, err=True)


def text_table(rows: list[tuple[str, str]], title: str) -> str:
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    lines = [title, "-" * (width + vwidth + 3)]
    lines += [f"{k:<{width}}   {v:>{vwidth}}" for k, v in rows]
    return "\n".join(lines)


class Commands(click.Group):
    """click's group, whose own usage errors ("Invalid value for '--dim': ...") quote the
    value given at most 60 characters long, like fastattrec's messages."""

    def make_context(self, info_name, args, parent=None, **extra):  # noqa: ANN001, ANN201
        return super().make_context(info_name, [clip_arg(a) for a in args], parent, **extra)


def clip_arg(arg: str) -> str:
    """An argument longer than any real value (a path, an id, a number) is cut, so that
    click's message about it stays one readable line; such a value is refused anyway."""
    return arg if len(arg) <= 4096 else arg[:60] + "..."


def print_metrics(frame, title: str, width: int = 100) -> None:
    """One table: a row per (model, protocol), columns HR@K, NDCG@K, [Recall@K,] MRR;
    when they do not fit in `width` columns, in blocks of whole metric families, stacked."""
    cols = [c for c in frame.columns
            if c.startswith(("HR@", "NDCG@", "Recall@")) or c == "MRR"]
    rows = [[r["model"], r["protocol"], *(f"{r[c]:.4f}" for c in cols)]
            for r in frame.iter_rows(named=True)]
    lead = [max(len(r[j]) for r in [["model", "protocol"], *rows]) for j in (0, 1)]
    widths = [max(len(c), *(len(r[2 + i]) for r in rows)) for i, c in enumerate(cols)]
    families: list[list[int]] = []
    for i, c in enumerate(cols):
        if families and c.split("@")[0] == cols[families[-1][0]].split("@")[0]:
            families[-1].append(i)
        else:
            families.append([i])
    room = width - sum(lead) - 2
    pieces: list[list[int]] = []  # a family wider than the room, in pieces that fit
    for fam in families:
        piece: list[int] = []
        for i in fam:
            if piece and sum(widths[j] + 2 for j in piece + [i]) > room:
                pieces.append(piece)
                piece = []
            piece.append(i)
        pieces.append(piece)
    blocks: list[list[int]] = []
    for fam in pieces:
        if blocks and sum(lead) + 2 + sum(widths[i] + 2 for i in blocks[-1] + fam) <= width:
            blocks[-1] += fam
        else:
            blocks.append(list(fam))
    click.echo(title)
    for n, idx in enumerate(blocks):
        if n:
            click.echo("")
        for r in [["model", "protocol", *cols], *rows]:
            click.echo("  ".join([r[0].ljust(lead[0]), r[1].ljust(lead[1]),
                                  *(r[2 + i].rjust(widths[i]) for i in idx)]))
