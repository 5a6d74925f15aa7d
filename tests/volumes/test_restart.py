"""Failure paths: a plugin killed with SIGKILL and started again over its state directory
finds its volumes and their mounts as they were, and brings back what the host lost."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import BLKFS, mounted, run
from tests.volumes.plugin import Plugin, loops_of

pytestmark = [
    needs_fuse,
    needs_loop,
    needs_qemu,
    pytest.mark.fuse,
    pytest.mark.loop,
    pytest.mark.qemu,
]


def write(where: str, name: str, data: bytes) -> None:
    with open(Path(where, name), "wb") as f:
        f.write(data)
        os.fsync(f.fileno())


def test_kill_9_mid_run_loses_nothing_fsynced(plugin: Plugin) -> None:
    plugin.ok("/VolumeDriver.Create", {"Name": "a", "Opts": {"size": "32M"}})
    plugin.ok("/VolumeDriver.Create", {"Name": "b", "Opts": {"base": "a"}})
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "a", "ID": "c1"})["Mountpoint"]
    plugin.ok("/VolumeDriver.Mount", {"Name": "a", "ID": "c2"})
    data = os.urandom(4 << 20)
    write(where, "data", data)
    writer = subprocess.Popen(
        ["dd", "if=/dev/urandom", f"of={where}/busy", "bs=64k", "count=128", "conv=fsync"],
        stderr=subprocess.DEVNULL,
    )
    plugin.kill()
    plugin.start()
    assert writer.wait(timeout=120) == 0
    assert plugin.ok("/VolumeDriver.Path", {"Name": "a"})["Mountpoint"] == where
    assert Path(where, "data").read_bytes() == data
    assert plugin.ok("/VolumeDriver.Get", {"Name": "a"})["Volume"]["Status"]["users"] == 2
    assert sorted(v["Name"] for v in plugin.ok("/VolumeDriver.List")["Volumes"]) == ["a", "b"]
    plugin.ok("/VolumeDriver.Unmount", {"Name": "a", "ID": "c1"})
    plugin.ok("/VolumeDriver.Unmount", {"Name": "a", "ID": "c2"})
    assert not mounted(Path(where))
    for image in sorted((plugin.state / "images").glob("*.qcow2")):
        run("qemu-img", "check", "-U", image)


def test_a_filesystem_frozen_by_a_killed_plugin_is_thawed(plugin: Plugin) -> None:
    """As a plugin killed in the middle of a snapshot leaves it."""
    plugin.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "16M"}})
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "c"})["Mountpoint"]
    run("fsfreeze", "--freeze", where)
    plugin.kill()
    plugin.start()
    subprocess.run(
        ["sh", "-c", f"echo thawed > {where}/f && sync -f {where}/f"], check=True, timeout=30
    )
    plugin.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "c"})


def test_what_the_host_lost_comes_back(plugin: Plugin) -> None:
    """A host restarted under the plugin: its blkfs mount, loop devices and filesystems are
    gone; the state says which volumes exist and which are in use."""
    plugin.ok("/VolumeDriver.Create", {"Name": "used", "Opts": {"size": "16M"}})
    plugin.ok("/VolumeDriver.Create", {"Name": "idle", "Opts": {"size": "16M"}})
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "used", "ID": "c"})["Mountpoint"]
    write(where, "f", b"before")
    plugin.kill()
    run("umount", where)
    for device in loops_of(plugin.state / "blkfs" / "used"):
        run("losetup", "-d", device)
    run(*BLKFS, "umount", str(plugin.state / "blkfs"))

    plugin.start()
    assert Path(where, "f").read_bytes() == b"before"
    assert plugin.ok("/VolumeDriver.Path", {"Name": "idle"})["Mountpoint"] == ""
    idle = plugin.ok("/VolumeDriver.Mount", {"Name": "idle", "ID": "d"})["Mountpoint"]
    assert Path(idle, "lost+found").is_dir()
    plugin.ok("/VolumeDriver.Unmount", {"Name": "idle", "ID": "d"})
    plugin.ok("/VolumeDriver.Unmount", {"Name": "used", "ID": "c"})


def test_a_mount_docker_never_heard_of_is_undone(plugin: Plugin) -> None:
    """A plugin killed after mounting but before saving the mount's ID: dockerd got no
    answer and started no container, so nobody uses the filesystem."""
    plugin.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "16M"}})
    where = plugin.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "c"})["Mountpoint"]
    plugin.kill()
    state = plugin.state / "volumes" / "v.json"
    state.write_text(state.read_text().replace('"c"', ""))
    plugin.start()
    assert not mounted(Path(where))
    assert not loops_of(plugin.state / "blkfs" / "v")


def test_a_creation_cut_short_is_undone(plugin: Plugin) -> None:
    """A plugin killed in the middle of a Create (its image and backend made, its state
    still pending) leaves nothing of it once started again, so the name can be used."""
    plugin.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "16M"}})
    plugin.kill()
    state = plugin.state / "volumes" / "v.json"
    state.write_text(state.read_text().replace('"pending": false', '"pending": true'))
    plugin.start()
    assert plugin.ok("/VolumeDriver.List")["Volumes"] == []
    assert not (plugin.state / "blkfs" / "v").exists()
    assert not list((plugin.state / "images").iterdir())
    plugin.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "16M"}})
