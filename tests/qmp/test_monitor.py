"""The QMP monitor of a real mount, driven with qemu.qmp: every command, success and failure,
with the state checked after each failure."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, blkfs, wait_until
from tests.qmp.peer import drive, raw

pytestmark = [needs_fuse, needs_qemu, pytest.mark.fuse]
MiB = 1 << 20
Monitor = tuple[Mount, Path]


def qcow2(path: Path, size: str = "4M", backing: Path | None = None) -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    subprocess.run([*args, str(path), size], check=True)
    return path


def node(name: str, image: Path) -> dict[str, Any]:
    return {
        "driver": "qcow2",
        "node-name": name,
        "file": {"driver": "file", "filename": str(image)},
    }


async def fails(
    client: QMPClient, command: str, args: dict[str, Any] | None = None, klass: str = "GenericError"
) -> str:
    """The description of the error ``command`` must give, with the class checked."""
    with pytest.raises(ExecuteError) as info:
        await client.execute(command, args)
    assert info.value.error_class == klass, str(info.value)
    return str(info.value)


def test_greeting_socket_mode_and_the_basic_queries(monitor: Monitor) -> None:
    _mount, path = monitor
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with raw(path) as conn:
        assert conn.greeting["QMP"]["capabilities"] == []
        assert conn.greeting["QMP"]["version"]["package"].startswith("blkfs ")

    async def body(client: QMPClient) -> None:
        version = await client.execute("query-version")
        assert set(version) == {"qemu", "package"}
        assert set(version["qemu"]) == {"major", "minor", "micro"}
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"blockdev-add", "block-export-add", "query-jobs", "quit"} <= names
        assert await client.execute("query-block") == []
        assert await client.execute("query-jobs") == []
        await fails(client, "no-such-command", klass="CommandNotFound")
        await fails(client, "query-version", {"x": 1})

    drive(path, body)


def test_nodes_and_fuse_exports(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    image = qcow2(images / "a.qcow2")

    async def body(client: QMPClient) -> None:
        assert await client.execute("blockdev-add", node("n0", image)) == {}
        assert "exists" in await fails(client, "blockdev-add", node("n0", image))
        await fails(client, "blockdev-add", {"driver": 123, "node-name": "x"})
        await fails(client, "blockdev-add", {"driver": "qcow2"})
        await fails(client, "blockdev-add", node("n1", images / "missing.qcow2"))
        nodes = await client.execute("query-named-block-nodes")
        assert [n["node-name"] for n in nodes][:1] == ["n0"]
        assert nodes[0]["drv"] == "qcow2" and nodes[0]["image"]["virtual-size"] == 4 * MiB
        assert nodes[0]["file"] == str(image)

        await client.execute(
            "block-export-add", {"type": "fuse", "id": "disk0", "node-name": "n0", "writable": True}
        )
        assert (mount / "disk0").stat().st_size == 4 * MiB
        (mount / "disk0").write_bytes(b"q" * 4096)
        exports = await client.execute("query-block-exports")
        assert exports == [
            {"type": "fuse", "id": "disk0", "node-name": "n0", "shutting-down": False}
        ]
        await fails(client, "blockdev-del", {"node-name": "n0"})  # in use by the export
        block = await client.execute("query-block")
        assert block[0]["device"] == "disk0" and block[0]["inserted"]["node-name"] == "n0"
        stats = await client.execute("query-blockstats")
        assert stats[0]["device"] == "disk0" and stats[0]["stats"]["wr_bytes"] >= 4096
        await fails(
            client,
            "block-export-add",
            {"type": "fuse", "id": "d1", "node-name": "n0", "mountpoint": "/elsewhere/d1"},
        )
        await fails(
            client, "block-export-add", {"type": "vhost-user-blk", "id": "d1", "node-name": "n0"}
        )

        await client.execute("block-export-del", {"id": "disk0"})
        event = await client.events.get()
        assert event["event"] == "BLOCK_EXPORT_DELETED" and event["data"] == {"id": "disk0"}
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        await fails(client, "block-export-del", {"id": "disk0"})
        assert await client.execute("blockdev-del", {"node-name": "n0"}) == {}
        await fails(client, "blockdev-del", {"node-name": "n0"})
        assert await client.execute("query-named-block-nodes") == []

    drive(path, body)
    assert not (mount / "disk0").exists()
    assert mount.alive()


def test_nbd_export(monitor: Monitor, images: Path) -> None:
    _mount, path = monitor
    image = qcow2(images / "a.qcow2")
    nbd = path.with_name("nbd")

    async def body(client: QMPClient) -> None:
        await client.execute("blockdev-add", node("n0", image))
        await client.execute(
            "block-export-add", {"type": "nbd", "id": "e0", "node-name": "n0", "name": "disk"}
        )
        exports = await client.execute("query-block-exports")
        assert exports == [{"type": "nbd", "id": "e0", "node-name": "n0", "shutting-down": False}]
        size = subprocess.run(
            ["qemu-img", "info", "--output=json", f"nbd+unix:///disk?socket={nbd}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert f'"virtual-size": {4 * MiB}' in size
        await fails(
            client,
            "block-export-add",
            {"type": "nbd", "id": "e1", "node-name": "n0", "mountpoint": "/x"},
        )
        await client.execute("block-export-del", {"id": "e0"})
        assert await client.execute("query-block-exports") == []

    drive(path, body)


def test_media_commands_and_tray_events(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    a, b = qcow2(images / "a.qcow2"), qcow2(images / "b.qcow2", "8M")
    mount.ctl("create", "cd")

    async def body(client: QMPClient) -> None:
        await fails(client, "eject", {"device": "nosuch"}, "DeviceNotFound")
        await client.execute("blockdev-change-medium", {"id": "cd", "filename": str(a)})
        assert (mount / "cd").stat().st_size == 4 * MiB
        await client.execute(
            "blockdev-change-medium",
            {"device": "cd", "filename": str(b), "format": "qcow2", "read-only-mode": "read-only"},
        )
        assert (mount / "cd").stat().st_size == 8 * MiB
        assert mount.backends()["cd"]["read-only"]
        await fails(client, "blockdev-change-medium", {"id": "cd", "filename": "/nonexist"})
        assert (mount / "cd").stat().st_size == 8 * MiB
        await client.execute("eject", {"id": "cd"})
        assert not mount.backends()["cd"]["medium"]
        await client.execute("blockdev-add", node("n0", a))
        await client.execute("blockdev-insert-medium", {"id": "cd", "node-name": "n0"})
        assert (mount / "cd").stat().st_size == 4 * MiB
        await fails(client, "blockdev-insert-medium", {"id": "cd", "node-name": "n0"})
        await client.execute("block_resize", {"node-name": "n0", "size": 6 * MiB})
        assert (mount / "cd").stat().st_size == 6 * MiB
        await fails(client, "block_resize", {"device": "cd", "size": "big"})
        await fails(client, "block_resize", {"device": "zz", "size": 1})
        await client.execute("blockdev-open-tray", {"id": "cd"})  # the event, nothing more
        assert (mount / "cd").stat().st_size == 6 * MiB
        await client.execute("blockdev-remove-medium", {"id": "cd"})
        assert not mount.backends()["cd"]["medium"]
        await client.execute("blockdev-close-tray", {"device": "cd"})
        await fails(client, "blockdev-open-tray", {"id": "zz"}, "DeviceNotFound")
        await fails(client, "blockdev-close-tray", {})
        moved = [
            e["data"]["tray-open"]
            for e in client.events.clear()
            if e["event"] == "DEVICE_TRAY_MOVED"
        ]
        assert moved == [True, False, True, False, True, False, True, True, False]

    drive(path, body)


def test_snapshot_jobs_and_their_events(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    base = qcow2(images / "base.qcow2")
    mount.ctl("create", f"d {base}")
    (mount / "d").write_bytes(b"b" * MiB)

    async def body(client: QMPClient) -> None:
        await client.execute(
            "blockdev-snapshot-sync", {"device": "d", "snapshot-file": str(images / "top.qcow2")}
        )
        await fails(
            client,
            "blockdev-snapshot-sync",
            {"device": "d", "snapshot-file": str(images / "x.raw"), "format": "raw"},
        )
        block = await client.execute("query-block")
        assert block[0]["inserted"]["backing_file_depth"] == 1

        await client.execute("block-stream", {"device": "d", "job-id": "s"})
        events = [await client.events.get()]
        while events[-1]["data"].get("status") != "concluded":
            events.append(await client.events.get())
        statuses = [e["data"]["status"] for e in events if e["event"] == "JOB_STATUS_CHANGE"]
        assert statuses == ["running", "concluded"]
        assert events[-2]["event"] == "BLOCK_JOB_COMPLETED"  # as QEMU, before concluded
        done = events[-2]["data"]
        assert done["type"] == "stream" and done["device"] == "s" and "error" not in done
        jobs = await client.execute("query-jobs")
        assert jobs == [
            {
                "id": "s",
                "type": "stream",
                "status": "concluded",
                "current-progress": jobs[0]["current-progress"],
                "total-progress": jobs[0]["total-progress"],
            }
        ]
        await fails(client, "job-finalize", {"id": "s"})
        await fails(client, "job-pause", {"id": "s"})
        await client.execute("job-dismiss", {"id": "s"})
        await fails(client, "job-dismiss", {"id": "s"})
        assert await client.execute("query-jobs") == []

        target = images / "mirror.qcow2"
        await client.execute(
            "drive-mirror",
            {
                "device": "d",
                "job-id": "m",
                "sync": "full",
                "target": str(target),
                "format": "qcow2",
                "speed": 1 << 30,
            },
        )
        await client.execute("block-job-set-speed", {"device": "m", "speed": 0})
        await fails(client, "block-job-set-speed", {"device": "m", "speed": "fast"})
        await client.execute("job-pause", {"id": "m"})
        await client.execute("job-resume", {"id": "m"})
        while (await client.events.get())["event"] != "BLOCK_JOB_READY":
            pass
        await client.execute("job-complete", {"id": "m"})
        while (await client.events.get())["event"] != "BLOCK_JOB_COMPLETED":
            pass
        await client.execute("job-dismiss", {"id": "m"})

        await client.execute(
            "drive-backup",
            {
                "device": "d",
                "job-id": "b",
                "sync": "full",
                "target": str(images / "backup.qcow2"),
                "speed": 1,
            },
        )
        await client.execute("job-cancel", {"id": "b"})
        while (await client.events.get())["event"] != "BLOCK_JOB_CANCELLED":
            pass
        await fails(
            client,
            "drive-mirror",
            {"device": "d", "sync": "sideways", "target": str(images / "x.qcow2")},
        )
        await fails(client, "block-commit", {"device": "nosuch"}, "DeviceNotFound")

    drive(path, body)
    assert mount.backends()["d"]["tree"]["children"]["file"]["options"]["filename"] == str(
        images / "mirror.qcow2"
    )
    assert (mount / "d").read_bytes()[:MiB] == b"b" * MiB


def test_commit_after_a_snapshot(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    base = qcow2(images / "base.qcow2")
    mount.ctl("create", f"d {base}")

    async def body(client: QMPClient) -> None:
        await client.execute(
            "blockdev-snapshot-sync", {"device": "d", "snapshot-file": str(images / "top.qcow2")}
        )
        (mount / "d").write_bytes(b"t" * 4096)
        await client.execute("block-commit", {"device": "d", "job-id": "c"})
        while (await client.events.get())["event"] != "BLOCK_JOB_READY":
            pass
        await client.execute("job-complete", {"id": "c"})
        while (await client.events.get())["event"] != "BLOCK_JOB_COMPLETED":
            pass

    drive(path, body)
    assert mount.backends()["d"]["tree"]["children"]["file"]["options"]["filename"] == str(base)


def test_several_clients_and_events_reach_each(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    mount.ctl("create", f"cd {qcow2(images / 'a.qcow2')}")

    async def body(first: QMPClient) -> None:
        second = QMPClient("second")
        await second.connect(str(path))
        try:
            await second.execute("eject", {"id": "cd"})
            for client in (first, second):
                event = await client.events.get()
                assert event["event"] == "DEVICE_TRAY_MOVED"
                assert event["data"] == {"device": "cd", "id": "cd", "tray-open": True}
        finally:
            await second.disconnect()

    drive(path, body)


def test_reopen(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    image = qcow2(images / "a.qcow2")

    async def body(client: QMPClient) -> None:
        await client.execute("blockdev-add", node("n0", image))
        await client.execute("block-export-add", {"type": "fuse", "id": "d", "node-name": "n0"})
        await client.execute(
            "blockdev-reopen",
            {"options": [{"driver": "qcow2", "node-name": "n0", "read-only": True}]},
        )
        assert mount.backends()["d"]["read-only"]
        await fails(client, "blockdev-reopen", {"options": [{"node-name": "zz"}]})
        await fails(client, "blockdev-reopen", {"options": "n0"})

    drive(path, body)


def test_quit_stops_the_daemon(mount_factory: Any, sockdir: Path) -> None:
    path = sockdir / "m"
    mount = mount_factory("--qmp", f"socket,path={path},server=on,wait=off")

    async def body(client: QMPClient) -> None:
        assert await client.execute("quit") == {}

    drive(path, body, hangs_up=True)
    wait_until(lambda: not mount.alive(), "the daemon to exit")
    assert not path.exists()


def test_bad_addresses_are_refused() -> None:
    for where in ("tcp:1", "socket,path=/x,server=off", "unix:", "socket,host=h"):
        result = blkfs("mount", "/nonexistent", "--qmp", where, check=False)
        assert result.returncode and "--qmp" in result.stderr, result.stderr


def test_qmp_shell(monitor: Monitor, images: Path) -> None:
    mount, path = monitor
    image = qcow2(images / "a.qcow2")
    script = (
        f"blockdev-add driver=qcow2 node-name=n0 "
        f'file={{"driver":"file","filename":"{image}"}}\n'
        "block-export-add type=fuse id=d0 node-name=n0\n"
        "query-block-exports\n"
        "eject id=nosuch\n"
    )
    shell = Path(sys.executable).with_name("qmp-shell")  # installed with qemu.qmp
    result = subprocess.run(
        [str(shell), str(path)],
        input=script,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    replies = [
        json.loads(line.removeprefix("(QEMU) "))
        for line in result.stdout.splitlines()
        if line.startswith("(QEMU) {")
    ]
    assert replies == [
        {"return": {}},
        {"return": {}},
        {"return": [{"type": "fuse", "id": "d0", "node-name": "n0", "shutting-down": False}]},
        {"error": {"class": "DeviceNotFound", "desc": "Device 'nosuch' not found"}},
    ]
    assert (mount / "d0").stat().st_size == 4 * MiB


def test_nodes_through_ctl_and_the_config_file(
    mount_factory: Any, sockdir: Path, images: Path
) -> None:
    """node-add is a command like any other: .ctl/node-add, then a backend on the node; the
    monitor's socket comes from the TOML config too."""
    image = qcow2(images / "a.qcow2")
    config = sockdir / "blkfs.toml"
    config.write_text(f'qmp = "unix:{sockdir / "c"}"\n')
    mount = mount_factory("--config", str(config))
    mount.ctl("node-add", f"n0 driver=qcow2,file.driver=file,file.filename={image}")
    assert mount.ctl_errno("node-add", f"n0 {image}") == errno.EEXIST
    assert mount.ctl_errno("node-add", "n1 driver=nosuch") == errno.EINVAL
    mount.ctl("create", "d0 node=n0")
    assert mount.ctl_errno("node-del", "n0") == errno.EBUSY
    assert [n["node-name"] for n in mount.status()["nodes"]] == ["n0"]

    async def body(client: QMPClient) -> None:
        nodes = await client.execute("query-named-block-nodes")
        assert nodes[0]["node-name"] == "n0"

    drive(sockdir / "c", body)
    mount.ctl("delete", "d0")
    mount.ctl("node-del", "n0")
    assert mount.status()["nodes"] == []
    assert mount.ctl_errno("node-del", "n0") == errno.ENOENT
