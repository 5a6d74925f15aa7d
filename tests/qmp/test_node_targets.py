"""blockdev-mirror, blockdev-backup and blockdev-snapshot: jobs and snapshots onto nodes
added with blockdev-add; a refused call starts nothing and changes nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.conftest import needs_fuse, needs_qemu
from tests.qmp.peer import drive
from tests.qmp.test_monitor import MiB, Monitor, fails, node, qcow2

pytestmark = [needs_fuse, needs_qemu, pytest.mark.fuse]


async def until(client: QMPClient, event: str) -> dict[str, Any]:
    while True:
        message = await client.events.get()
        if message["event"] == event:
            result: dict[str, Any] = message["data"]
            return result


def header(image: Path) -> dict[str, Any]:
    """qemu-img info of an image blkfs may hold open."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-U", "-q", str(a), str(b)]).returncode == 0


def test_backup_and_mirror_to_added_nodes(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    a = qcow2(images / "a.qcow2")
    b, m, small = (
        qcow2(images / f"{n}.qcow2", s) for n, s in (("b", "4M"), ("m", "4M"), ("small", "2M"))
    )

    async def body(client: QMPClient) -> None:
        for name, image in (("n0", a), ("tb", b), ("tm", m), ("ts", small)):
            await client.execute("blockdev-add", node(name, image))
        await client.execute(
            "block-export-add", {"type": "fuse", "id": "d", "node-name": "n0", "writable": True}
        )
        (mount / "d").write_bytes(b"a" * MiB)

        for target in ("nosuch", "n0", "ts", "tb,driver=file"):  # the last: not options
            await fails(
                client, "blockdev-backup", {"device": "d", "target": target, "sync": "full"}
            )
        await fails(client, "blockdev-backup", {"device": "d", "target": "tb", "sync": "sideways"})
        await fails(client, "blockdev-mirror", {"device": "nosuch", "target": "tm", "sync": "full"})
        assert await client.execute("query-jobs") == []
        assert mount.backends()["d"]["tree"]["node-name"] == "n0"

        await client.execute(
            "blockdev-backup", {"device": "d", "target": "tb", "sync": "full", "job-id": "b"}
        )
        assert "error" not in await until(client, "BLOCK_JOB_COMPLETED")
        await client.execute("job-dismiss", {"id": "b"})
        await client.execute("blockdev-del", {"node-name": "tb"})  # the job let it go
        assert same(a, b)

        await client.execute(
            "blockdev-mirror",
            {
                "device": "n0",
                "target": "tm",
                "sync": "full",
                "job-id": "m",
                "copy-mode": "write-blocking",
            },
        )
        await until(client, "BLOCK_JOB_READY")
        (mount / "d").write_bytes(b"w" * 4096)
        await client.execute("job-complete", {"id": "m"})
        assert "error" not in await until(client, "BLOCK_JOB_COMPLETED")
        assert mount.backends()["d"]["tree"]["node-name"] == "tm"
        await fails(client, "blockdev-del", {"node-name": "tm"})  # the export's medium now
        await fails(client, "blockdev-mirror", {"device": "d", "target": "tm", "sync": "full"})

    drive(path, body)
    data = (mount / "d").read_bytes()
    assert data[:4096] == b"w" * 4096 and data[4096:MiB] == b"a" * (MiB - 4096)


def test_snapshot_onto_an_added_overlay(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    base = qcow2(images / "base.qcow2")
    overlay = qcow2(images / "ov.qcow2")
    other = qcow2(images / "other.qcow2", backing=qcow2(images / "b2.qcow2"))
    wrong = qcow2(images / "big.qcow2", "8M")
    raw = images / "r.raw"
    raw.write_bytes(bytes(4 * MiB))

    async def body(client: QMPClient) -> None:
        await client.execute("blockdev-add", node("n0", base))
        await client.execute(
            "block-export-add", {"type": "fuse", "id": "d", "node-name": "n0", "writable": True}
        )
        (mount / "d").write_bytes(b"b" * MiB)
        await client.execute("blockdev-add", {**node("ov", overlay), "backing": None})
        await client.execute("blockdev-add", node("hasbacking", other))
        await client.execute("blockdev-add", {**node("big", wrong), "backing": None})
        await client.execute(
            "blockdev-add",
            {**node("ro", qcow2(images / "ro.qcow2")), "backing": None, "read-only": True},
        )
        await client.execute(
            "blockdev-add",
            {"driver": "raw", "node-name": "raw", "file": {"driver": "file", "filename": str(raw)}},
        )
        for bad in ("nosuch", "hasbacking", "big", "ro", "raw", "n0"):
            await fails(client, "blockdev-snapshot", {"node": "d", "overlay": bad})
        await fails(client, "blockdev-snapshot", {"node": "zz", "overlay": "ov"})
        assert mount.backends()["d"]["tree"]["node-name"] == "n0"
        assert "backing-filename" not in header(overlay)

        assert await client.execute("blockdev-snapshot", {"node": "n0", "overlay": "ov"}) == {}
        inserted = (await client.execute("query-block"))[0]["inserted"]
        assert inserted["node-name"] == "ov" and inserted["backing_file_depth"] == 1
        assert header(overlay)["backing-filename"] == "base.qcow2"
        (mount / "d").write_bytes(b"t" * 4096)
        await fails(client, "blockdev-snapshot", {"node": "d", "overlay": "ov"})
        nodes = {n["node-name"]: n for n in await client.execute("query-named-block-nodes")}
        assert nodes["n0"]["ro"] and not nodes["ov"]["ro"]

        # sync=top copies only the overlay: the target needs the base below it
        await client.execute(
            "blockdev-add", {**node("lone", qcow2(images / "lone.qcow2")), "backing": None}
        )
        await fails(client, "blockdev-mirror", {"device": "d", "target": "lone", "sync": "top"})
        await client.execute(
            "blockdev-add", {**node("top2", qcow2(images / "top2.qcow2")), "backing": "n0"}
        )
        await client.execute(
            "blockdev-mirror", {"device": "d", "target": "top2", "sync": "top", "job-id": "m"}
        )
        await until(client, "BLOCK_JOB_READY")
        await client.execute("job-complete", {"id": "m"})
        assert "error" not in await until(client, "BLOCK_JOB_COMPLETED")
        inserted = (await client.execute("query-block"))[0]["inserted"]
        assert inserted["node-name"] == "top2" and inserted["backing_file_depth"] == 1

    drive(path, body)
    data = (mount / "d").read_bytes()
    assert data[:4096] == b"t" * 4096 and data[4096:MiB] == b"b" * (MiB - 4096)
    base_data = subprocess.run(
        ["qemu-io", "-U", "-r", "-c", "read -P 0x62 0 4k", str(base)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Pattern verification failed" not in base_data
