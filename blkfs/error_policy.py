"""What a backend does with a request its medium failed: QEMU's ``werror``/``rerror``.

Ground rules: the policy applies only to errors of the medium (a host disk that is full or
failing), never to a request the backend refused as the caller's fault (past the end,
read-only, no medium). ``report`` fails the request; ``ignore`` completes it as if it had
succeeded; ``stop`` pauses the backend: the failed request and every request that arrives
after it wait until :meth:`~blkfs.backend.BlockBackend.cont` retries them, so nothing above
the disk ever sees the error; ``enospc`` stops on ENOSPC and reports the rest. The defaults
are QEMU's ``-drive``: ``werror=enospc`` (a full host pauses a thin volume instead of
failing its filesystem's writes), ``rerror=report``.

A host flush that failed is always reported: it stays failed until the medium is reopened
(fsyncgate), so retrying it would only fail again (drivers raise
:class:`~blkfs.errors.LastingError` for it). Other failed flushes (metadata written back on a
full host) follow ``werror``.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from typing import Literal

import trio

from blkfs.info import PauseInfo

Policy = Literal["report", "ignore", "enospc", "stop"]
Action = Literal["report", "ignore", "stop"]
POLICIES: tuple[Policy, ...] = ("report", "ignore", "enospc", "stop")
Operation = Literal["read", "write"]


def action(policy: Policy, error: int) -> Action:
    """What ``policy`` does with a request that failed with ``error`` (QEMU's
    blk_get_error_action)."""
    if policy == "enospc":
        return "stop" if error == errno.ENOSPC else "report"
    return policy


@dataclass
class Pause:
    """Why a backend stopped, and the moment its held requests go on."""

    operation: Operation
    node: str
    offset: int | None
    """None for a flush."""
    errno: int
    message: str
    since: float = field(default_factory=time.time)
    abandoned: bool = False
    """Ended by force=on: the held requests fail with EIO instead of being retried."""
    over: trio.Event = field(default_factory=trio.Event)

    @property
    def io_status(self) -> str:
        """QMP's BlockDeviceIoStatus while paused."""
        return "nospace" if self.errno == errno.ENOSPC else "failed"

    def describe(self) -> str:
        """One line for messages: what failed, where, and since when."""
        where = "a flush" if self.offset is None else f"a {self.operation}"
        at = "" if self.offset is None else f" at offset {self.offset}"
        return (
            f"paused since {time.strftime('%H:%M:%S', time.localtime(self.since))}: "
            f"{where} of node {self.node}{at} failed "
            f"({errno.errorcode.get(self.errno, self.errno)}: {self.message})"
        )

    def as_dict(self) -> PauseInfo:
        return {
            "operation": self.operation,
            "node": self.node,
            "offset": self.offset,
            "errno": errno.errorcode.get(self.errno, str(self.errno)),
            "message": self.message,
            "since": self.since,
            "reason": self.describe(),
        }
