"""Errors that reach the user as one line, never as a traceback."""


class UserError(Exception):
    """Something the user can fix: bad input, a missing model, an impossible budget.

    The CLI prints ``error: <message>`` and exits with ``exit_code``. The message says what is
    wrong and, where possible, what would work.
    """

    exit_code = 2

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class DataError(UserError):
    """A problem with a data file; the message starts with ``file:line:``."""
