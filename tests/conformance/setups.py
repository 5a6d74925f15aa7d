"""The driver setups every driver's conformance run uses; other test modules add theirs.

A setup makes a fresh medium of ``SIZE`` bytes holding ``initial_data(SIZE)`` (or zeros, for
drivers that keep no data) and says what the driver can do, so one suite checks them all.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blkfs.block.registry import default_registry
from tests.ceph import POOL, Cluster

SIZE = 1 << 20


def initial_data(size: int) -> bytes:
    """Deterministic, non-repeating contents, so a misplaced read is always visible."""
    return b"".join(i.to_bytes(4, "little") for i in range(size // 4))


@dataclass(frozen=True)
class Setup:
    name: str
    make: Callable[..., str]
    """Writes whatever files the medium needs under the path (and into the services it
    ``uses``, given after it); returns its options."""
    keeps_data: bool = True
    resizable: bool = True
    shrinkable: bool = True
    can_be_read_only: bool = True
    host_file: str | None = "disk.img"
    """Where the data lands on the host, byte for byte (None if not a raw mapping)."""
    host_offset: int = 0
    uses: tuple[str, ...] = ()
    """Fixtures of the services the medium lives in (``ceph``: a throwaway cluster)."""


def _raw_file(tmp: Path, size: int = SIZE, prefix: bytes = b"") -> Path:
    path = tmp / "disk.img"
    path.write_bytes(prefix + initial_data(size))
    return path


def _rbd_image(tmp: Path, ceph: Cluster) -> str:
    """An image in the test cluster holding the initial data (``rbd import``)."""
    name = ceph.image()
    ceph.run("rbd", "import", str(_raw_file(tmp)), f"{POOL}/{name}")
    return ceph.spec(name)


def _log(tmp: Path) -> Path:
    """An empty log image for blklogwrites."""
    path = tmp / "writes.log"
    path.write_bytes(b"")
    return path


SLICE_OFFSET = 12345


def _qcow2_overlay(tmp: Path, **options: str) -> str:
    """A qcow2 overlay whose data all comes from a raw backing file, so reads, writes and
    discards go through the backing chain and copy-on-write."""
    _raw_file(tmp)
    with open(tmp / "top.qcow2", "xb") as f:
        default_registry().get("qcow2").create(f, SIZE, options, "disk.img", "raw")
    return str(tmp / "top.qcow2")


def _qcow2_chain(tmp: Path) -> str:
    """A 3-deep chain: the data in a raw base, under two empty qcow2 overlays, so every read
    goes through the backing map of the top."""
    _qcow2_overlay(tmp)
    qcow2 = default_registry().get("qcow2")
    with open(tmp / "chain-top.qcow2", "xb") as f:
        qcow2.create(f, SIZE, {}, "top.qcow2", "qcow2")
    return str(tmp / "chain-top.qcow2")


SETUPS: list[Setup] = [
    Setup("file", lambda tmp: f"driver=file,filename={_raw_file(tmp)}"),
    Setup("file-threads", lambda tmp: f"driver=file,aio=threads,filename={_raw_file(tmp)}"),
    Setup("file-io_uring", lambda tmp: f"driver=file,aio=io_uring,filename={_raw_file(tmp)}"),
    Setup("raw", lambda tmp: f"driver=raw,file.driver=file,file.filename={_raw_file(tmp)}"),
    Setup("probed", lambda tmp: str(_raw_file(tmp))),
    Setup(
        "raw-slice",
        lambda tmp: (
            f"driver=raw,offset={SLICE_OFFSET},size={SIZE},file.driver=file,"
            f"file.filename={_raw_file(tmp, SIZE + 4096, os.urandom(SLICE_OFFSET))}"
        ),
        resizable=False,
        host_offset=SLICE_OFFSET,
    ),
    Setup("file-direct", lambda tmp: f"driver=file,cache.direct=on,filename={_raw_file(tmp)}"),
    Setup(
        "raw-slice-direct",
        lambda tmp: (
            f"driver=raw,offset={SLICE_OFFSET},size={SIZE},file.driver=file,"
            f"file.cache.direct=on,file.filename="
            f"{_raw_file(tmp, SIZE + 4096, os.urandom(SLICE_OFFSET))}"
        ),
        resizable=False,
        host_offset=SLICE_OFFSET,
    ),
    Setup("null", lambda tmp: f"driver=null,size={SIZE}", keeps_data=False, host_file=None),
    Setup("rbd", _rbd_image, host_file=None, uses=("ceph",)),
    Setup("qcow2", _qcow2_overlay, host_file=None, shrinkable=False),
    Setup(
        "qcow2-small-clusters",
        lambda tmp: _qcow2_overlay(tmp, cluster_size="512", refcount_bits="1"),
        host_file=None,
        shrinkable=False,
    ),
    Setup(
        "qcow2-subclusters",
        lambda tmp: _qcow2_overlay(tmp, extended_l2="on", compat="1.1"),
        host_file=None,
        shrinkable=False,
    ),
    Setup(
        "qcow2-v2", lambda tmp: _qcow2_overlay(tmp, compat="0.10"), host_file=None, shrinkable=False
    ),
    Setup(
        "qcow2-direct",  # the raw backing file inherits cache.direct
        lambda tmp: (
            f"driver=qcow2,file.driver=file,file.cache.direct=on,"
            f"file.filename={_qcow2_overlay(tmp)}"
        ),
        host_file=None,
        shrinkable=False,
    ),
    Setup("qcow2-chain", _qcow2_chain, host_file=None, shrinkable=False),
    Setup(
        "throttle",
        lambda tmp: (
            f"driver=throttle,limits.bps-total=1G,limits.iops-total=100000,"
            f"file.driver=file,file.filename={_raw_file(tmp)}"
        ),
    ),
    Setup(
        "blkdebug", lambda tmp: f"driver=blkdebug,image.driver=file,image.filename={_raw_file(tmp)}"
    ),
    Setup(
        "blkdebug-align-4k",
        lambda tmp: f"driver=blkdebug,align=4k,image.driver=file,image.filename={_raw_file(tmp)}",
    ),
    Setup(
        "copy-on-read",
        lambda tmp: (
            f"driver=copy-on-read,file.driver=qcow2,file.file.driver=file,"
            f"file.file.filename={_qcow2_overlay(tmp)}"
        ),
        host_file=None,
        shrinkable=False,
        can_be_read_only=False,
    ),
    Setup(
        "blklogwrites",
        lambda tmp: (
            f"driver=blklogwrites,file.driver=file,file.filename={_raw_file(tmp)},"
            f"log.driver=file,log.filename={_log(tmp)}"
        ),
    ),
    Setup(
        "blklogwrites-4k",
        lambda tmp: (
            f"driver=blklogwrites,log-sector-size=4k,file.driver=file,"
            f"file.filename={_raw_file(tmp)},log.driver=file,"
            f"log.filename={_log(tmp)}"
        ),
    ),
    Setup(
        "qcow2-over-blklogwrites",
        lambda tmp: (
            f"driver=qcow2,file.driver=blklogwrites,file.file.driver=file,"
            f"file.file.filename={_qcow2_overlay(tmp)},file.log.driver=file,"
            f"file.log.filename={_log(tmp)}"
        ),
        host_file=None,
        shrinkable=False,
    ),
]
