"""The one exception type for mistakes in what the user gave us.

A `UserError` carries one sentence that names the file, line or column and the fix; the CLI
prints it without a traceback and exits non-zero. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with the user's input or options, explained in one sentence."""


def shown(value: object, limit: int = 60) -> str:
    """A value quoted for a message: printable ASCII, at most `limit` characters (a
    million-digit field or a line of binary must not become the message)."""
    text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
    text = text.encode("ascii", "backslashreplace").decode()
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    text = text if len(text) <= limit else text[:limit] + "..."
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return text if numeric else repr(text)


def quoted(path: object) -> str:
    """A path as it must be typed in a shell command of a hint."""
    import shlex

    return shlex.quote(str(path))
