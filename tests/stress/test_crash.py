"""Crash consistency: ``kill -9`` of the daemon at random moments under a journaled writer.

Each iteration mounts the image (a writable open with ``repair=leaks``, so blkfs repairs the
leaks the last crash left), checks with ``qemu-img check`` that the image is now leak-free,
reads the whole disk back through the mount and compares it with the journal's durable state,
starts the writer (random writes, zero writes, whole-cluster zero writes that free clusters,
fsyncs), kills the daemon at a random moment, recovers the dead mount with ``blkfs umount``,
and has ``qemu-img check`` confirm that the crash left no corruption (leaks are allowed).
``BLKFS_STRESS_SEED`` replays a run.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.compat.peers import MiB, qemu, qemu_io, to_raw
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, blkfs, mounted, node, wait_until
from tests.stress.workload import (
    Replay,
    journaled,
    mismatches,
    replay,
    start_writer,
    wait_for_fsync,
)

pytestmark = [needs_fuse, needs_qemu]

SIZE = 24 * MiB
MIN_ITERATIONS = 4


def qemu_check(image: Path, *flags: str) -> tuple[int, dict[str, Any]]:
    """``qemu-img check --output=json``: exit status and report."""
    result = subprocess.run(
        ["qemu-img", "check", "--output=json", *flags, str(image)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        report = {"check-errors": 1, "stderr": result.stderr}
    report["stderr"] = result.stderr
    return result.returncode, report


def plain_qcow2(images: Path) -> tuple[Path, bytes]:
    image = images / "disk.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE))
    return image, bytes(SIZE)


def qcow2_over_backing(images: Path) -> tuple[Path, bytes]:
    """A qcow2 overlay (4k clusters, more metadata per byte) over a qcow2 base with data."""
    base = images / "base.qcow2"
    qemu("qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE))
    qemu_io(base, "qcow2", "write -P 0x5a 0 6M", "write -P 0xa5 10M 3M", "write -P 0x33 20M 64k")
    image = images / "disk.qcow2"
    qemu(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-b",
        base.name,
        "-F",
        "qcow2",
        image,
    )
    return image, to_raw(image)


def raw(images: Path) -> tuple[Path, bytes]:
    image = images / "disk.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    return image, bytes(SIZE)


PLAIN = "{image},detect-zeroes={zeroes}"
QCOW2 = "driver=qcow2,repair=leaks,detect-zeroes={zeroes},file.driver=file,file.filename={image}"
SLOW_FLUSH = (
    "driver=qcow2,repair=leaks,detect-zeroes={zeroes},file.driver=blkdebug,"
    "file.delay.flush=25ms,file.image.driver=file,file.image.filename={image}"
)

VARIANTS: dict[str, tuple[Callable[[Path], tuple[Path, bytes]], int, str, str, float]] = {
    "qcow2": (plain_qcow2, 65536, QCOW2, "off", 25.0),
    "qcow2-backing": (qcow2_over_backing, 4096, QCOW2, "off", 25.0),
    "qcow2-slow-flush": (plain_qcow2, 65536, SLOW_FLUSH, "off", 20.0),
    "qcow2-frees": (plain_qcow2, 65536, QCOW2, "unmap", 30.0),
    "raw": (raw, 65536, PLAIN, "unmap", 10.0),
}
"""Image maker, the cluster size the writer's discards align to, the backend's options (qcow2
with ``repair=leaks``: each mount repairs the leaks the last kill left),
``detect-zeroes`` (with ``unmap`` zero writes of whole clusters free them: the discard path;
with ``off`` they are data), CI seconds. ``qcow2-slow-flush`` puts blkdebug's flush delay
under the image, as a slow disk would, so that kills land between the write-back's barriers
(where leaks come from) far more often."""


def repaired_in_log(mount: Mount) -> int:
    try:
        text = mount.log.read_text()
    except OSError:
        return 0
    return sum(int(n) for n in re.findall(r"repaired (\d+) leaked cluster", text))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kill_9_loses_nothing_fsynced_and_corrupts_nothing(
    variant: str,
    images: Path,
    tmp_path: Path,
    mount_factory: Callable[..., Mount],
    stress_seconds: Callable[[float], float],
    figures: dict[str, Any],
) -> None:
    make, cluster, options, detect_zeroes, default_seconds = VARIANTS[variant]
    image, initial = make(images)
    is_qcow2 = image.suffix == ".qcow2"
    seed = int(os.environ.get("BLKFS_STRESS_SEED", random.randrange(1 << 32)))
    rng = random.Random(seed)
    where = f"(BLKFS_STRESS_SEED={seed})"
    state = Replay(bytearray(initial), [])
    totals = {
        "iterations": 0,
        "kills_in_fsync": 0,
        "writes": 0,
        "zero_writes": 0,
        "discards": 0,
        "fsyncs": 0,
        "leaks_found": 0,
        "leaks_repaired": 0,
        "corruptions": 0,
        "verified_mib": 0,
    }
    deadline = time.monotonic() + stress_seconds(default_seconds)
    previous_leaks = 0
    while True:
        mount = mount_factory(
            "--backend", "disk=" + options.format(image=image, zeroes=detect_zeroes)
        )
        disk = mount / "disk"
        if is_qcow2:
            status, report = qemu_check(image, "-U")
            repaired = repaired_in_log(mount)
            assert status == 0, f"not leak-free after a writable open {where}: {report}"
            assert repaired == previous_leaks, (
                f"log says {repaired} repaired, qemu-img found {previous_leaks} {where}"
            )
            totals["leaks_repaired"] += repaired
        actual = disk.read_bytes()
        bad = mismatches(actual, state)
        assert not bad, (
            f"fsynced data lost at offsets {bad} after iteration {totals['iterations']} {where}"
        )
        totals["verified_mib"] += len(actual) // MiB
        if totals["iterations"] >= MIN_ITERATIONS and time.monotonic() > deadline:
            break
        journal = tmp_path / f"journal{totals['iterations']}"
        writer = start_writer(disk, journal, rng.getrandbits(32), cluster=cluster)
        try:
            operations = rng.randint(2, 60)  # the kill lands after a random amount of work
            wait_until(
                lambda: journaled(journal) >= operations or writer.poll() is not None,
                f"the writer to journal {operations} operations",
                seconds=60,
            )
            if rng.random() < 0.5:  # half the kills land inside an fsync, where order matters
                totals["kills_in_fsync"] += wait_for_fsync(journal, 2.0)
                time.sleep(rng.uniform(0, 0.004))
            os.kill(mount.pid, signal.SIGKILL)
            writer.wait(timeout=60)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
        result = blkfs("umount", str(mount.path), check=False)
        assert result.returncode == 0, result.stderr
        assert not mounted(mount.path)
        state = replay(journal, actual)
        for key in ("writes", "zero_writes", "discards", "fsyncs"):
            totals[key] += getattr(state, key)
        totals["iterations"] += 1
        previous_leaks = 0
        if is_qcow2:
            status, report = qemu_check(image)
            totals["corruptions"] += report.get("corruptions", 0)
            assert (
                status in (0, 3)
                and not report.get("corruptions")
                and not report.get("check-errors")
            ), f"kill -9 left a corrupt image (iteration {totals['iterations']}) {where}:\n{report}"
            previous_leaks = report.get("leaks", 0)
            totals["leaks_found"] += previous_leaks
    mount.stop()
    if is_qcow2:
        status, report = qemu_check(image)
        assert status == 0, report
        assert to_raw(image) == actual, "qemu-img reads other contents than blkfs did"
    figures.update(totals, seed=seed)
    assert totals["corruptions"] == 0
    assert totals["fsyncs"] > 0 and totals["writes"] > 0


def test_kill_9_between_refcount_and_l2_write_back_of_freed_clusters(
    images: Path, mount_factory: Callable[..., Mount]
) -> None:
    """Deterministic: clusters freed by a whole-cluster zero write, then an fsync whose
    barrier between the refcount blocks and the L2 tables is held 5 s by blkdebug; the daemon
    is killed inside it. A crash-safe order leaves only leaks."""
    image, _ = plain_qcow2(images)
    qemu_io(image, "qcow2", "write -P 0x61 0 1M")
    mount = mount_factory(
        "--backend",
        f"disk=driver=qcow2,detect-zeroes=unmap,"
        f"file.driver=blkdebug,file.node-name=dbg,"
        f"file.image.driver=file,file.image.filename={image}",
    )
    mount.ctl("reopen", "dbg delay.flush=5s")
    writer = subprocess.Popen(
        [
            "dd",
            "if=/dev/zero",
            f"of={mount / 'disk'}",
            "bs=1M",
            "count=1",
            "conv=notrunc,fsync",
            "status=none",
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(
            lambda: node(mount.backends()["disk"]["tree"], "dbg")["info"]["delayed"] == 1,
            "the fsync to wait in blkdebug's delay",
        )  # the zero write is done
        os.kill(mount.pid, signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert blkfs("umount", str(mount.path), check=False).returncode == 0
    status, report = qemu_check(image)
    assert status in (0, 3) and not report.get("corruptions"), report
