"""The block-dirty-bitmap-* commands: QEMU's names and arguments onto the command layer."""

from __future__ import annotations

import asyncio
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


async def listed(client: QMPClient, name: str = "n0") -> dict[str, Any]:
    nodes = await client.execute("query-named-block-nodes")
    assert isinstance(nodes, list)
    found = next(n for n in nodes if n["node-name"] == name)
    return {b["name"]: b for b in found["dirty-bitmaps"]}


def test_bitmaps_through_qmp(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    image = qcow2(images / "a.qcow2")

    async def body(client: QMPClient) -> None:
        await client.execute("blockdev-add", node("n0", image))
        await client.execute(
            "block-export-add", {"type": "fuse", "id": "d", "node-name": "n0", "writable": True}
        )
        await client.execute(
            "block-dirty-bitmap-add", {"node": "n0", "name": "a", "granularity": 65536}
        )
        await client.execute("block-dirty-bitmap-add", {"node": "d", "name": "b"})
        with open(mount / "d", "r+b") as file:
            file.write(b"x" * MiB)
        found = await listed(client)
        assert (found["a"]["count"], found["b"]["count"]) == (MiB, MiB)
        await client.execute("block-dirty-bitmap-clear", {"node": "n0", "name": "b"})
        await client.execute("block-dirty-bitmap-disable", {"node": "n0", "name": "b"})
        await client.execute(
            "block-dirty-bitmap-merge",
            {"node": "n0", "target": "b", "bitmaps": [{"node": "n0", "name": "a"}]},
        )
        found = await listed(client)
        assert (found["b"]["count"], found["b"]["recording"]) == (MiB, False)
        await client.execute("block-dirty-bitmap-enable", {"node": "n0", "name": "b"})
        await client.execute("block-dirty-bitmap-remove", {"node": "n0", "name": "a"})
        assert list(await listed(client)) == ["b"]
        assert "already" in await fails(
            client, "block-dirty-bitmap-add", {"node": "n0", "name": "b"}
        )
        assert "missing" in await fails(client, "block-dirty-bitmap-remove", {"node": "n0"})

    drive(path, body)


def test_an_nbd_export_of_a_bitmap_and_an_incremental_backup(
    monitor: Monitor, images: Path
) -> None:
    mount, path = monitor
    nbd = path.with_name("nbd")
    image, full, inc = (
        qcow2(images / "a.qcow2"),
        qcow2(images / "f.qcow2"),
        qcow2(images / "i.qcow2"),
    )

    async def body(client: QMPClient) -> None:
        for name, file in (("n0", image), ("full", full), ("inc", inc)):
            await client.execute("blockdev-add", node(name, file))
        await client.execute(
            "block-export-add", {"type": "fuse", "id": "d", "node-name": "n0", "writable": True}
        )
        await client.execute("block-dirty-bitmap-add", {"node": "n0", "name": "b"})
        await client.execute(
            "blockdev-backup",
            {
                "device": "d",
                "target": "full",
                "sync": "full",
                "job-id": "j0",
                "bitmap": "b",
                "bitmap-mode": "on-success",
            },
        )
        await until_concluded(client, "j0")
        with open(mount / "d", "r+b") as file:
            file.seek(MiB)
            file.write(b"y" * 4096)
        await client.execute("block-export-del", {"id": "d"})  # one writer per node
        await client.execute(
            "block-export-add",
            {"type": "nbd", "id": "e0", "node-name": "n0", "name": "disk", "bitmaps": ["b"]},
        )
        out = subprocess.run(
            ["nbdinfo", "--json", "--map=qemu:dirty-bitmap:b", f"nbd+unix:///disk?socket={nbd}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        dirty = [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]
        assert dirty == [(MiB, 65536)]
        assert "in use" in await fails(
            client, "block-dirty-bitmap-clear", {"node": "n0", "name": "b"}
        )
        await client.execute("block-export-del", {"id": "e0"})
        await client.execute("block-export-add", {"type": "fuse", "id": "d", "node-name": "n0"})
        await client.execute(
            "blockdev-backup",
            {"device": "d", "target": "inc", "sync": "incremental", "job-id": "j1", "bitmap": "b"},
        )
        await until_concluded(client, "j1")
        assert (await listed(client))["b"]["count"] == 0

    drive(path, body)


async def until_concluded(client: QMPClient, job: str) -> None:
    while True:
        jobs = await client.execute("query-jobs")
        assert isinstance(jobs, list)
        found = next(j for j in jobs if j["id"] == job)
        assert "error" not in found, found
        if found["status"] == "concluded":
            await client.execute("job-dismiss", {"id": job})
            return
        await asyncio.sleep(0.05)
