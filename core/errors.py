"""Errors a user can fix: printed as one line, exit code 2, no traceback."""


class UserError(Exception):
    """Bad input (file, dataset, config). The message says what is wrong and, where possible, what to do."""

    exit_code = 2
