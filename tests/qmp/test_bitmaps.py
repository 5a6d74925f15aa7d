"""The block-dirty-bitmap-* commands: QEMU's names and arguments onto the command layer."""

from __future__ import annotations

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
