"""block_set_io_throttle: a throttle filter put in front of the medium with ``change``,
retuned with ``reopen``, taken out when every limit is 0; the data and the device's name
stay, and a refused call changes nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.conftest import needs_fuse, needs_qemu
from tests.qmp.peer import drive
from tests.qmp.test_monitor import MiB, Monitor, fails, node, qcow2

pytestmark = [needs_fuse, needs_qemu, pytest.mark.fuse]
OFF = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}


def tree(monitor: Monitor) -> dict[str, Any]:
    result: dict[str, Any] = monitor[0].backends()["d"]["tree"]
    return result


def test_throttle_in_retuned_and_out(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    image = qcow2(images / "a.qcow2")

    async def body(client: QMPClient) -> None:
        await client.execute("blockdev-add", node("n0", image))
        await client.execute(
            "block-export-add", {"type": "fuse", "id": "d", "node-name": "n0", "writable": True}
        )
        (mount / "d").write_bytes(b"x" * MiB)
        await fails(client, "block_set_io_throttle", OFF)  # neither device nor id

        await client.execute("block_set_io_throttle", {**OFF, "id": "d", "bps_wr": 8 * MiB})
        root = tree(monitor)
        assert root["driver"] == "throttle" and root["children"]["file"]["node-name"] == "n0"
        assert root["info"]["limits"] == {"bps-write": 8 * MiB}
        inserted = (await client.execute("query-block"))[0]["inserted"]
        assert inserted["node-name"] == "n0" and inserted["bps_wr"] == 8 * MiB
        assert inserted["bps"] == 0

        await client.execute(
            "block_set_io_throttle",  # by its node's name, retuned in place
            {
                **OFF,
                "device": "n0",
                "iops": 100,
                "iops_max": 200,
                "iops_max_length": 2,
                "group": "g",
            },
        )
        again = tree(monitor)
        assert again["node-name"] == root["node-name"]
        assert again["info"]["limits"] == {"iops-total": 100}
        assert again["info"]["throttle-group"] == "g"
        assert (mount / "d").read_bytes()[:MiB] == b"x" * MiB

        await client.execute("block_set_io_throttle", {**OFF, "id": "d"})
        assert tree(monitor)["node-name"] == "n0"
        assert (await client.execute("query-block"))[0]["inserted"]["iops"] == 0
        await client.execute("block_set_io_throttle", {**OFF, "id": "d"})  # nothing to do
        assert tree(monitor)["node-name"] == "n0"
        assert (mount / "d").read_bytes()[:MiB] == b"x" * MiB

    drive(path, body)


def test_refused_throttles_change_nothing(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    mount.ctl("create", f"d {qcow2(images / 'a.qcow2')}")
    mount.ctl("create", "empty")

    async def body(client: QMPClient) -> None:
        await client.execute("block_set_io_throttle", {**OFF, "id": "d", "bps": MiB})
        before = tree(monitor)
        await fails(
            client, "block_set_io_throttle", {**OFF, "id": "nosuch", "bps": 1}, "DeviceNotFound"
        )
        await fails(client, "block_set_io_throttle", {"id": "d", "bps": 1})  # bps_rd missing
        await fails(client, "block_set_io_throttle", {**OFF, "id": "d", "bps": "1M"})
        await fails(client, "block_set_io_throttle", {**OFF, "id": "d", "bps": -1})
        await fails(
            client, "block_set_io_throttle", {**OFF, "id": "d", "bps": 1, "iops_size": 4096}
        )
        await fails(
            client, "block_set_io_throttle", {**OFF, "id": "d", "bps": 1, "bps_rd": 1}
        )  # total with read
        await fails(client, "block_set_io_throttle", {**OFF, "id": "d", "bps": 2, "bps_max": 1})
        await fails(client, "block_set_io_throttle", {**OFF, "id": "d", "bps": 1, "device": "d"})
        await fails(client, "block_set_io_throttle", {**OFF, "id": "empty", "bps": 1})
        assert tree(monitor) == before
        assert not mount.backends()["empty"]["medium"]

    drive(path, body)


def chain_of(monitor: Monitor) -> list[Any]:
    """The backend's tree from the root down: a throttle filter's limits and group, a job
    filter's driver, an image's name."""
    seen: list[Any] = []
    at = tree(monitor)
    while at is not None:
        if at["driver"] == "throttle":
            seen.append((at["info"]["limits"], at["info"]["throttle-group"]))
            at = at["children"]["file"]
        elif at["driver"] != "qcow2":  # a job's filter
            seen.append(at["driver"])
            at = at["children"]["file"]
        else:
            seen.append(Path(at["children"]["file"]["options"]["filename"]).name)
            at = at["children"].get("backing")
    return seen


def test_a_snapshot_goes_under_the_throttle_and_a_commit_keeps_it(
    monitor: Monitor, images: Path
) -> None:
    """The limits belong to the device, as in QEMU's BlockBackend: blockdev-snapshot-sync
    puts the overlay under them, and an active commit's switch keeps them."""
    mount, path = monitor
    mount.ctl("create", f"d {qcow2(images / 'base.qcow2')}")

    async def body(client: QMPClient) -> None:
        limits = ({"bps-write": 64 * MiB}, "g")
        (mount / "d").write_bytes(b"b" * MiB)
        await client.execute(
            "block_set_io_throttle", {**OFF, "id": "d", "bps_wr": 64 * MiB, "group": "g"}
        )
        await client.execute(
            "blockdev-snapshot-sync", {"device": "d", "snapshot-file": str(images / "top.qcow2")}
        )
        assert chain_of(monitor) == [limits, "top.qcow2", "base.qcow2"]
        retuned = {**OFF, "id": "d", "bps_wr": 32 * MiB, "group": "g"}
        await client.execute("block_set_io_throttle", retuned)  # in place: kept as retuned
        limits = ({"bps-write": 32 * MiB}, "g")
        with (mount / "d").open("r+b") as disk:
            disk.seek(MiB)
            disk.write(b"t" * MiB)
        await client.execute("block-commit", {"device": "d", "job-id": "c"})
        while (await client.events.get())["event"] != "BLOCK_JOB_READY":
            pass
        assert chain_of(monitor)[:2] == [limits, "mirror-top"]  # an active commit's filter
        await client.execute("job-complete", {"id": "c"})
        while (await client.events.get())["event"] != "BLOCK_JOB_COMPLETED":
            pass
        assert chain_of(monitor) == [limits, "base.qcow2"]

    drive(path, body)
    assert (mount / "d").read_bytes()[: 2 * MiB] == b"b" * MiB + b"t" * MiB
