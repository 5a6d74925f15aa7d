"""A ``blkfs volume-plugin`` for a test, spoken to over its socket as dockerd speaks to it;
everything it mounted is gone after the test, even when the test fails."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from blkfs.frontends.volumes.command import UnixConnection
from tests.helpers import BLKFS, force_unmount, mounted, wait_until


class Plugin:
    """The plugin process over ``state``, serving on ``socket``."""

    def __init__(self, state: Path, socket: Path, *args: str) -> None:
        self.state, self.socket, self.args = state, socket, args
        self.log = state.with_name(state.name + ".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [
                    *BLKFS,
                    "volume-plugin",
                    "--state-dir",
                    str(self.state),
                    "--socket",
                    str(self.socket),
                    "--log-level",
                    "debug",
                    *self.args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: self.serving() or self.process.poll() is not None, "the plugin to serve", 60
        )
        assert self.process.poll() is None, self.log.read_text()

    def serving(self) -> bool:
        """Whether the socket answers (a killed plugin's socket is left behind, refusing)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.socket))
            except OSError:
                return False
        return True

    def kill(self, signum: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        self.process.wait(timeout=60)

    def post(self, endpoint: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        """One request as dockerd makes it: the status and the JSON reply."""
        connection = UnixConnection(self.socket)
        try:
            connection.request(
                "POST",
                endpoint,
                json.dumps(body),
                {"Accept": "application/vnd.docker.plugins.v1.2+json"},
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def ok(self, endpoint: str, body: Any = None) -> dict[str, Any]:
        status, reply = self.post(endpoint, body)
        assert (status, reply["Err"]) == (200, ""), reply
        return reply

    def volume(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``blkfs volume VERB ...`` against this plugin."""
        return subprocess.run(
            [*BLKFS, "volume", args[0], "--socket", str(self.socket), *args[1:]],
            check=check,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def cleanup(self) -> None:
        """Stop the plugin; unmount its volumes, detach their loop devices, unmount blkfs."""
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)
        mnt = self.state / "mnt"
        for where in sorted(mnt.iterdir()) if mnt.is_dir() else []:
            while mounted(where):
                if subprocess.run(["umount", str(where)], check=False).returncode:
                    subprocess.run(["umount", "-l", str(where)], check=False)
        blkfs = self.state / "blkfs"
        for name in os.listdir(blkfs) if mounted(blkfs) else []:
            for device in loops_of(blkfs / name):
                subprocess.run(["losetup", "-d", device], check=False)
        if mounted(blkfs):
            wait_until(
                lambda: not any(loops_of(blkfs / n) for n in os.listdir(blkfs)),
                "loop devices to let go",
                30,
            )
            if subprocess.run([*BLKFS, "umount", str(blkfs)], check=False).returncode:
                force_unmount(blkfs)


def loops_of(path: Path) -> list[str]:
    out = subprocess.run(
        ["losetup", "--noheadings", "--output", "NAME", "--associated", str(path)],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return out.split()


@contextmanager
def running_plugin(directory: Path, *args: str, socket: Path | None = None) -> Iterator[Plugin]:
    plugin = Plugin(directory / "state", socket or directory / "plugin.sock", *args)
    try:
        plugin.start()
        yield plugin
    finally:
        plugin.cleanup()
