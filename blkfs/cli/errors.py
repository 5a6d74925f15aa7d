"""How a verb fails: :func:`blkfs.cli.main.main` prints the message as one line and exits 1,
with no traceback (the user's mistake, or a refusal that changed nothing)."""

from __future__ import annotations


class UsageError(Exception):
    """The user asked for something that cannot be done; the message says why."""


class JobError(Exception):
    """A command or a job failed; the message says why."""
