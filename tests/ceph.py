"""A throwaway single-node Ceph cluster for the rbd tests: one monitor and one OSD (memstore:
objects live in the OSD's memory), no manager, no authentication, one replica, bound to
127.0.0.1 on free ports, with pool ``rbd``. Everything lives in one directory; the daemons
run in the foreground as children of the test process and are killed on the way out, even
when the start fails.

Run it by hand with ``python -m tests.ceph DIR``: it prints the conf path and keeps the
cluster up until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import itertools
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

DAEMONS = ("ceph-mon", "ceph-osd", "ceph", "rbd")
needs_ceph = pytest.mark.skipif(
    any(shutil.which(t) is None for t in DAEMONS),
    reason="ceph-mon, ceph-osd or the ceph/rbd tools are missing (run scripts/setup)",
)
"""Tests that use it carry the ``qemu`` marker too, so that CI=true fails instead of skipping."""

POOL = "rbd"
START_SECONDS = 120.0
"""Longest the cluster may take to come up (13 s is usual on 2 cores)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


STORES = {
    "memstore": "osd objectstore = memstore\nmemstore device bytes = 2147483648",
    "bluestore": "osd objectstore = bluestore\nbluestore block create = true\n"
    "bluestore block size = 2147483648\nbluestore fsck on mkfs = false\n"
    "bluestore cache size = 67108864\nbdev enable discard = false",
}
"""The OSD's object store: memstore (objects in memory, the fastest start; a killed OSD
loses them) or bluestore over a sparse file (survives an OSD restart)."""


def conf_text(top: Path, port: int, store: str) -> str:
    return f"""[global]
fsid = {uuid.uuid4()}
mon host = v2:127.0.0.1:{port}
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
{STORES[store]}
osd op num shards = 1
osd op num threads per shard = 2
run dir = {top}/run
log file = {top}/log/$name.log
admin socket = {top}/run/$name.asok
mon data = {top}/$name
osd data = {top}/$name
keyring = /dev/null
rbd default features = 61
rados mon op timeout = 30
rados osd op timeout = 0

[client]
log file = {top}/log/client.$pid.log
admin socket =
"""


class Cluster:
    """The running cluster: ``conf`` is its ceph.conf; :meth:`kill_osd` and
    :meth:`start_osd` stage an OSD restart."""

    def __init__(self, top: Path, store: str = "memstore") -> None:
        self.top = top
        self.store = store
        self.conf = top / "ceph.conf"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._names = itertools.count()

    def run(self, *args: str, timeout: float = 60) -> str:
        """A ``ceph``/``rbd``/... tool run against the cluster; its standard output."""
        done = subprocess.run(
            [args[0], "--conf", str(self.conf), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode:
            raise AssertionError(f"{' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def run_bytes(self, *args: str) -> bytes:
        """Like :meth:`run`, the output as bytes (``rbd export IMAGE -``)."""
        done = subprocess.run(
            [args[0], "--conf", str(self.conf), *args[1:]], capture_output=True, timeout=120
        )
        if done.returncode:
            raise AssertionError(f"{' '.join(args)}: {done.stderr.decode(errors='replace')}")
        return done.stdout

    def image(self, size: int | None = None) -> str:
        """A new image's name in pool ``rbd``; made empty with ``size`` bytes if given."""
        name = f"img{next(self._names)}"
        if size is not None:
            self.run("rbd", "create", "--size", f"{size}B", f"{POOL}/{name}")
        return name

    def spec(self, name: str, suffix: str = "") -> str:
        """The image's rbd: filename for blkfs and qemu-img (``suffix``: ``@SNAP``)."""
        return f"rbd:{POOL}/{name}{suffix}:conf={self.conf}"

    def _daemon(self, name: str, *args: str) -> None:
        with open(self.top / "log" / f"{name}.out", "ab") as out:
            self.processes[name] = subprocess.Popen(
                # SIGKILL when the test process ends, however it ends (setpriv's pdeathsig)
                ["setpriv", "--pdeathsig", "KILL", *args, "-f", "--conf", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self) -> None:
        port = free_port()
        for sub in ("run", "log", "mon.a", "osd.0"):
            (self.top / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(conf_text(self.top, port, self.store))
        fsid = next(
            line.split("=")[1].strip()
            for line in self.conf.read_text().splitlines()
            if line.startswith("fsid")
        )
        monmap = self.top / "monmap"
        subprocess.run(
            [
                "monmaptool",
                "--create",
                "--fsid",
                fsid,
                "--addv",
                "a",
                f"[v2:127.0.0.1:{port}]",
                str(monmap),
            ],
            check=True,
            capture_output=True,
        )
        self._tool(["ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap)])
        self._daemon("mon.a", "ceph-mon", "-i", "a")
        osd = self.run("ceph", "osd", "create").strip()
        assert osd == "0", osd
        self._tool(["ceph-osd", "-i", "0", "--mkfs"])
        self.start_osd()
        self.run("ceph", "osd", "pool", "create", POOL, "8")
        self.run("ceph", "osd", "pool", "application", "enable", POOL, "rbd")
        self.wait_osd_up()

    def _tool(self, args: list[str]) -> None:
        done = subprocess.run(
            [*args, "--conf", str(self.conf)], capture_output=True, text=True, timeout=60
        )
        if done.returncode:
            raise AssertionError(f"{' '.join(args)}: {done.stdout}{done.stderr}")

    def start_osd(self) -> None:
        self._daemon("osd.0", "ceph-osd", "-i", "0")

    def wait_osd_up(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while "1 up" not in self.run("ceph", "osd", "stat"):
            osd = self.processes["osd.0"]
            if osd.poll() is not None:
                raise AssertionError(f"ceph-osd exited with {osd.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the OSD did not come up in {START_SECONDS:.0f}s")
            time.sleep(0.2)

    def kill_osd(self) -> None:
        """SIGKILL the OSD (with memstore, its objects go with it: restart it only over
        bluestore)."""
        self._stop("osd.0", signal.SIGKILL)

    def _stop(self, name: str, sig: int) -> None:
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop(self) -> None:
        """SIGKILL: the cluster is thrown away, nothing in it needs a clean shutdown."""
        for name in reversed(list(self.processes)):
            self._stop(name, signal.SIGKILL)


@contextmanager
def cluster(top: Path, store: str = "memstore") -> Iterator[Cluster]:
    """A started cluster in ``top``; its daemons are stopped on the way out."""
    running = Cluster(top, store)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted)  # also when started in the background
    signal.signal(signal.SIGTERM, _interrupted)
    with cluster(Path(sys.argv[1]).resolve()) as up:
        print(up.conf, flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
