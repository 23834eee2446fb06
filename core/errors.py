"""Errors the command line reports without a traceback: a user's to fix (exit 2) or a failed job (exit 1)."""


class UserError(Exception):
    """Bad input (file, dataset, config). The message says what is wrong and, where possible, what to do."""

    exit_code = 2


class CheckpointUnusable(UserError):
    """No complete checkpoint of a run passes its checksums: there is nothing safe to resume from."""

    exit_code = 1


class TrainingFailed(RuntimeError):
    """A rank failed and the launcher stopped the whole job (Ray Train's worker group, or torchrun's
    ranks); the message carries the failing rank's own error."""
