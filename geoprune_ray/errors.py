"""The one error type for what a user did wrong.

Every module raises :class:`GeopruneError` for bad input; the CLI catches it once, prints one
line (what is wrong, how to fix it) and exits with code 2.
"""


class GeopruneError(Exception):
    """A user-facing error: ``message`` says what is wrong, ``hint`` how to fix it."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class Interrupted(GeopruneError):
    """A run stopped before it finished (e.g. Ctrl-C): its run directory can be resumed."""


def first_line(exc: BaseException) -> str:
    """An error's first line for a one-line report (its repr when it has no message)."""
    return str(exc).splitlines()[0] if str(exc) else repr(exc)
