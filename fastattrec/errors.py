"""The one exception type for mistakes in what the user gave us.

A `UserError` carries one sentence that names the file, line or column and the fix; the CLI
prints it without a traceback and exits non-zero. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """A problem with the user's input or options, explained in one sentence."""
