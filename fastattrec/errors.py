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
    bare = value is None or (isinstance(value, int | float) and not isinstance(value, bool))
    return text if bare else repr(text)


def first_error_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, at most `limit` characters (its type's name
    when it has no message), for "... (reason); fix" sentences."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__


def one_line(message: str) -> str:
    """A message as one printed line: a newline, tab or other unprintable character that
    a file name brought into it is shown escaped (the message's own text has none)."""
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else _escape(c) for c in message)


def quoted(path: object) -> str:
    """A path as it must be typed in a shell, and as messages print it: unchanged when
    plain, in single quotes when it holds spaces or shell characters, and in bash's
    `$'...'` form with escapes when it holds a newline or another unprintable character,
    so that a message stays one line and the path can still be pasted."""
    import shlex

    text = str(path)
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(_escape(c) for c in text) + "'"


def _escape(c: str) -> str:
    """One character inside bash's `$'...'`: printable as itself, the rest as escapes (a
    byte that was not UTF-8 in a file name, which Python holds as a surrogate, as that
    byte)."""
    n = ord(c)
    if c in "\\'":
        return "\\" + c
    if c.isprintable():
        return c
    if c in _ESCAPES:
        return _ESCAPES[c]
    if 0xDC80 <= n <= 0xDCFF:
        return f"\\x{n - 0xDC00:02x}"
    return f"\\x{n:02x}" if n < 0x80 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
