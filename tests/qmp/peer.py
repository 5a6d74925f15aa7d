"""Helpers for the QMP tests: a blkfs mount with a monitor, and a qemu.qmp client to it."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient

from tests.helpers import Mount

T = TypeVar("T")
TIMEOUT = 60.0
"""No test's conversation with a monitor takes longer (an awaited event that never comes
fails the test instead of hanging it)."""


def monitor_path(mount: Mount) -> Path:
    return mount.path.with_name(mount.path.name + ".qmp")


def drive(path: Path, body: Callable[[QMPClient], Awaitable[T]], hangs_up: bool = False) -> T:
    """Connect a qemu.qmp client to ``path``, run ``body`` with it, disconnect;
    ``hangs_up``: the server closes the connection first (after quit), which qemu.qmp
    reports as EOFError on disconnect."""

    async def main() -> T:
        client = QMPClient("test")
        await client.connect(str(path))
        try:
            return await asyncio.wait_for(body(client), TIMEOUT)
        finally:
            try:
                await client.disconnect()
            except EOFError:
                if not hangs_up:
                    raise

    return asyncio.run(main())


class Raw:
    """A bare socket to a monitor, for what qemu.qmp would never send."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.read()

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the monitor closed the connection"
        message: dict[str, Any] = json.loads(line)
        return message

    def send(self, data: bytes | dict[str, Any]) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode())

    def reply(self, data: bytes | dict[str, Any]) -> dict[str, Any]:
        """Send, then the next reply (events skipped)."""
        self.send(data)
        while True:
            message = self.read()
            if "event" not in message:
                return message

    def negotiate(self) -> None:
        assert self.reply({"execute": "qmp_capabilities"}) == {"return": {}}

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@contextmanager
def raw(path: Path) -> Iterator[Raw]:
    conn = Raw(path)
    try:
        yield conn
    finally:
        conn.close()
