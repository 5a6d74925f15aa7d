"""blkfs's per-volume verbs (``blkfs volume snapshot|rollback|commit|clone|inspect``) while
the volume is mounted, sent to a running plugin over its socket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import run, wait_until
from tests.volumes.plugin import Plugin, loops_of

pytestmark = [
    needs_fuse,
    needs_loop,
    needs_qemu,
    pytest.mark.fuse,
    pytest.mark.loop,
    pytest.mark.qemu,
]


def write(where: str, name: str, text: str) -> None:
    with open(Path(where, name), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def inspect(plugin: Plugin, name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(plugin.volume("inspect", name).stdout)
    return result


def check_images(plugin: Plugin) -> None:
    for image in sorted((plugin.state / "images").glob("*.qcow2")):
        run("qemu-img", "check", "-U", image)


def test_snapshot_rollback_and_commit_of_a_mounted_volume(plugin: Plugin) -> None:
    plugin.ok("/VolumeDriver.Create", {"Name": "web", "Opts": {"size": "32M"}})
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "web", "ID": "c1"})["Mountpoint"]
    write(where, "index.html", "v1")
    snapshot = json.loads(plugin.volume("snapshot", "web").stdout)
    assert snapshot["image"] == str(plugin.state / "images" / "web.qcow2")
    assert inspect(plugin, "web")["Status"]["last-snapshot"] == snapshot
    write(where, "index.html", "broken")

    refused = plugin.volume("rollback", "web", check=False)
    assert refused.returncode == 1 and "--remount" in refused.stderr
    assert Path(where, "index.html").read_text() == "broken"  # nothing changed

    plugin.volume("rollback", "--remount", "web")
    assert Path(where, "index.html").read_text() == "v1"
    assert inspect(plugin, "web")["Status"]["users"] == 1

    write(where, "index.html", "v2")
    plugin.volume("commit", "web")
    assert inspect(plugin, "web")["Status"]["chain"] == [snapshot["image"]]
    assert not Path(snapshot["overlay"]).exists()
    assert Path(where, "index.html").read_text() == "v2"
    plugin.ok("/VolumeDriver.Unmount", {"Name": "web", "ID": "c1"})
    check_images(plugin)
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "web", "ID": "c2"})["Mountpoint"]
    assert Path(where, "index.html").read_text() == "v2"
    plugin.ok("/VolumeDriver.Unmount", {"Name": "web", "ID": "c2"})


def test_rollback_remount_is_refused_while_a_container_holds_the_filesystem(
    plugin: Plugin,
) -> None:
    """A container's mount namespace keeps the filesystem (and so its loop device) open
    after the host's umount: blkfs refuses the rollback and the plugin mounts the same loop
    device again, so one filesystem never sits on two devices."""
    plugin.ok("/VolumeDriver.Create", {"Name": "db", "Opts": {"size": "32M"}})
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "db", "ID": "c1"})["Mountpoint"]
    write(where, "table", "one")
    plugin.volume("snapshot", "db")
    write(where, "table", "two")
    container = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sleep", "300"],
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: where in Path(f"/proc/{container.pid}/mounts").read_text(),
            "the namespace to hold the mount",
        )
        devices = loops_of(plugin.state / "blkfs" / "db")
        refused = plugin.volume("rollback", "--remount", "db", check=False)
        assert refused.returncode == 1 and "still holds" in refused.stderr
        assert Path(where, "table").read_text() == "two"
        assert loops_of(plugin.state / "blkfs" / "db") == devices
    finally:
        os.killpg(container.pid, signal.SIGKILL)
        container.wait()
    plugin.volume("rollback", "--remount", "db")
    assert Path(where, "table").read_text() == "one"
    plugin.ok("/VolumeDriver.Unmount", {"Name": "db", "ID": "c1"})


def test_thin_clones_share_a_read_only_base(plugin: Plugin) -> None:
    plugin.ok("/VolumeDriver.Create", {"Name": "base", "Opts": {"size": "32M"}})
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "base", "ID": "b"})["Mountpoint"]
    write(where, "os", "debian")
    plugin.volume("clone", "base", "one")
    plugin.ok("/VolumeDriver.Create", {"Name": "two", "Opts": {"base": "base"}})
    one = plugin.ok("/VolumeDriver.Mount", {"Name": "one", "ID": "c1"})["Mountpoint"]
    two = plugin.ok("/VolumeDriver.Mount", {"Name": "two", "ID": "c2"})["Mountpoint"]
    write(one, "os", "one's")
    write(two, "mine", "two's")
    assert Path(where, "os").read_text() == "debian" and not Path(where, "mine").exists()
    assert Path(two, "os").read_text() == "debian"
    chain = inspect(plugin, "one")["Status"]["chain"]
    assert chain[1] == str(plugin.state / "images" / "base.qcow2") and len(chain) == 2

    refused = plugin.volume("commit", "one", check=False)  # into the shared base: no
    assert refused.returncode == 1 and "'two'" in refused.stderr, refused.stderr
    for name, mount_id in (("base", "b"), ("one", "c1"), ("two", "c2")):
        plugin.ok("/VolumeDriver.Unmount", {"Name": name, "ID": mount_id})
    plugin.ok("/VolumeDriver.Remove", {"Name": "base"})  # its clones keep what they need
    assert Path(chain[1]).exists()
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "one", "ID": "c3"})["Mountpoint"]
    assert Path(where, "os").read_text() == "one's"
    plugin.ok("/VolumeDriver.Unmount", {"Name": "one", "ID": "c3"})
    check_images(plugin)
    plugin.ok("/VolumeDriver.Remove", {"Name": "one"})
    assert Path(chain[1]).exists()  # two's base still
    plugin.ok("/VolumeDriver.Remove", {"Name": "two"})
    assert not list((plugin.state / "images").iterdir())


def test_a_throttled_volume_stays_throttled_through_its_verbs(plugin: Plugin) -> None:
    opts = {"size": "16M", "throttle.bps-total": "64M"}
    plugin.ok("/VolumeDriver.Create", {"Name": "slow", "Opts": opts})
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "slow", "ID": "c"})["Mountpoint"]
    write(where, "f", "x")
    plugin.volume("snapshot", "slow")
    write(where, "f", "y")
    plugin.volume("rollback", "--remount", "slow")
    assert Path(where, "f").read_text() == "x"
    write(where, "f", "z")
    plugin.volume("commit", "slow")
    assert Path(where, "f").read_text() == "z"
    status = json.loads((plugin.state / "blkfs" / ".ctl" / "status.json").read_text())
    (backend,) = status["backends"]
    assert backend["tree"]["driver"] == "throttle"
    assert backend["tree"]["options"]["limits.bps-total"] == 64 << 20
    assert inspect(plugin, "slow")["Status"]["chain"] == [str(plugin.state / "images/slow.qcow2")]
    plugin.ok("/VolumeDriver.Unmount", {"Name": "slow", "ID": "c"})
    check_images(plugin)
