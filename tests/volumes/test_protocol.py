"""Docker's volume plugin protocol, spoken over the plugin's unix socket as dockerd speaks
it, on real blkfs mounts, loop devices and filesystems."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import BLKFS, run, tmpfs
from tests.volumes.plugin import Plugin, loops_of, running_plugin

pytestmark = [
    needs_fuse,
    needs_loop,
    needs_qemu,
    pytest.mark.fuse,
    pytest.mark.loop,
    pytest.mark.qemu,
]


def mounts_of(where: str) -> int:
    with open("/proc/mounts") as f:
        return sum(line.split()[1] == where for line in f)


def qemu_img_check(images: Path) -> None:
    for image in sorted(images.glob("*.qcow2")):
        run("qemu-img", "check", "-U", image)


def test_activate_and_capabilities(plugin: Plugin) -> None:
    assert plugin.ok("/Plugin.Activate")["Implements"] == ["VolumeDriver"]
    assert plugin.ok("/VolumeDriver.Capabilities")["Capabilities"] == {"Scope": "local"}
    assert plugin.post("/VolumeDriver.Nonsense", {})[0] == 404
    assert plugin.ok("/VolumeDriver.List", {})["Volumes"] == []


def test_mounts_are_reference_counted(plugin: Plugin) -> None:
    plugin.ok("/VolumeDriver.Create", {"Name": "web", "Opts": {"size": "32M"}})
    plugin.ok("/VolumeDriver.Create", {"Name": "web", "Opts": None})  # docker run -v web:/data
    status, reply = plugin.post("/VolumeDriver.Create", {"Name": "web", "Opts": {"size": "8M"}})
    assert (status, reply["Errno"]) == (500, errno.EEXIST)
    first = plugin.ok("/VolumeDriver.Mount", {"Name": "web", "ID": "c1"})["Mountpoint"]
    second = plugin.ok("/VolumeDriver.Mount", {"Name": "web", "ID": "c2"})["Mountpoint"]
    assert first == second and mounts_of(first) == 1
    Path(first, "data").write_text("kept")
    assert plugin.ok("/VolumeDriver.Path", {"Name": "web"})["Mountpoint"] == first

    plugin.ok("/VolumeDriver.Unmount", {"Name": "web", "ID": "c1"})
    assert Path(first, "data").read_text() == "kept"
    status, reply = plugin.post("/VolumeDriver.Remove", {"Name": "web"})
    assert (status, reply["Errno"]) == (500, errno.EBUSY) and "in use" in reply["Err"]
    assert [v["Name"] for v in plugin.ok("/VolumeDriver.List")["Volumes"]] == ["web"]

    plugin.ok("/VolumeDriver.Unmount", {"Name": "web", "ID": "c2"})
    assert mounts_of(first) == 0 and not loops_of(plugin.state / "blkfs" / "web")
    assert plugin.ok("/VolumeDriver.Path", {"Name": "web"})["Mountpoint"] == ""
    got = plugin.ok("/VolumeDriver.Get", {"Name": "web"})["Volume"]
    assert got["Status"]["size"] == 32 << 20 and got["Status"]["users"] == 0
    qemu_img_check(plugin.state / "images")

    again = plugin.ok("/VolumeDriver.Mount", {"Name": "web", "ID": "c3"})["Mountpoint"]
    assert Path(again, "data").read_text() == "kept"  # formatted on its first mount only
    plugin.ok("/VolumeDriver.Unmount", {"Name": "web", "ID": "c3"})
    plugin.ok("/VolumeDriver.Remove", {"Name": "web"})
    assert plugin.ok("/VolumeDriver.List")["Volumes"] == []
    assert not list((plugin.state / "images").iterdir())
    assert not (plugin.state / "blkfs" / "web").exists()


@pytest.mark.parametrize(
    ("opts", "says"),
    [
        ({}, "size=SIZE is needed"),
        ({"size": "8M", "colour": "red"}, "unknown option 'colour'"),
        ({"size": "8M", "format": "vmdk"}, "format=vmdk"),
        ({"size": "8M", "fs": "ntfs"}, "fs=ntfs"),
        ({"size": "8M", "throttle.bps-fast": "1"}, "no such throttle limit"),
        ({"size": "lots"}, "lots"),
        ({"base": "no-such-volume-or-image"}, "no-such-volume-or-image"),
    ],
)
def test_a_bad_create_changes_nothing(plugin: Plugin, opts: dict[str, str], says: str) -> None:
    status, reply = plugin.post("/VolumeDriver.Create", {"Name": "v", "Opts": opts})
    assert status == 500 and says in reply["Err"], reply
    assert plugin.ok("/VolumeDriver.List")["Volumes"] == []
    assert not list((plugin.state / "images").iterdir())
    assert not (plugin.state / "blkfs" / "v").exists()


def test_names_docker_allows_that_a_file_name_does_not(plugin: Plugin) -> None:
    names = ["with/slash and space", ".hidden", "x" * 200, "plain.name_1"]
    for name in names:
        plugin.ok("/VolumeDriver.Create", {"Name": name, "Opts": {"size": "8M"}})
        where = plugin.ok("/VolumeDriver.Mount", {"Name": name, "ID": "c"})["Mountpoint"]
        Path(where, "name").write_text(name)
    listed = plugin.ok("/VolumeDriver.List")["Volumes"]
    assert sorted(v["Name"] for v in listed) == sorted(names)
    for volume in listed:
        assert Path(volume["Mountpoint"], "name").read_text() == volume["Name"]
        plugin.ok("/VolumeDriver.Unmount", {"Name": volume["Name"], "ID": "c"})
        plugin.ok("/VolumeDriver.Remove", {"Name": volume["Name"]})
    status, reply = plugin.post("/VolumeDriver.Get", {"Name": names[0]})
    assert status == 500 and reply["Errno"] == errno.ENOENT


def test_racing_mounts_make_one_mount(plugin: Plugin) -> None:
    plugin.ok("/VolumeDriver.Create", {"Name": "db", "Opts": {"size": "16M"}})
    replies: list[dict[str, str]] = []

    def mount(n: int) -> None:
        replies.append(plugin.ok("/VolumeDriver.Mount", {"Name": "db", "ID": f"c{n}"}))

    threads = [threading.Thread(target=mount, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({r["Mountpoint"] for r in replies}) == 1 and len(replies) == 6
    assert mounts_of(replies[0]["Mountpoint"]) == 1
    assert len(loops_of(plugin.state / "blkfs" / "db")) == 1
    threads = [
        threading.Thread(
            target=plugin.ok, args=("/VolumeDriver.Unmount", {"Name": "db", "ID": f"c{n}"})
        )
        for n in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mounts_of(replies[0]["Mountpoint"]) == 0


def test_a_full_host_filesystem_on_create(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "4M") as small, running_plugin(small) as plugin:
        filler = small / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        status, reply = plugin.post("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "1G"}})
        assert status == 500 and reply["Err"], reply
        assert plugin.ok("/VolumeDriver.List")["Volumes"] == []
        assert not list((plugin.state / "images").iterdir())
        filler.unlink()
        plugin.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "1G"}})
        plugin.ok("/VolumeDriver.Remove", {"Name": "v"})


def test_the_config_file_section(tmp_path: Path) -> None:
    config = tmp_path / "blkfs.toml"
    config.write_text(f'[volume-plugin]\nlog-level = "debug"\nimage-dirs = ["{tmp_path}"]\n')
    with running_plugin(tmp_path, "--config", str(config)) as plugin:
        plugin.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "8M"}})
        assert "volume v: created" in plugin.log.read_text()
    config.write_text("[volume-plugin]\nsockets = 1\n")
    done = subprocess.run(
        [*BLKFS, "volume-plugin", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "unknown key 'sockets'" in done.stderr


def test_status_shows_chain_size_and_space(plugin: Plugin) -> None:
    plugin.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "8M", "format": "raw"}})
    status = plugin.ok("/VolumeDriver.Get", {"Name": "v"})["Volume"]["Status"]
    assert status["chain"] == [str(plugin.state / "images" / "v.raw")]
    assert status["size"] == 8 << 20 and status["last-snapshot"] is None
    assert json.loads(plugin.volume("inspect", "v").stdout)["Status"] == status
    assert os.path.exists(status["chain"][0])


def test_a_clone_of_an_image_file(tmp_path: Path) -> None:
    """base=IMAGE: an image in a directory the plugin was given with --image-dir; one
    elsewhere is refused by the blkfs mount's allowlist, leaving nothing behind."""
    images, content = tmp_path / "golden", tmp_path / "content"
    images.mkdir()
    content.mkdir()
    (content / "os").write_text("debian")
    run("qemu-img", "create", "-q", "-f", "raw", images / "base.raw", "16M")
    run("mkfs.ext4", "-q", "-d", content, images / "base.raw")
    run("cp", images / "base.raw", tmp_path / "elsewhere.raw")
    before = (images / "base.raw").read_bytes()
    with running_plugin(tmp_path, "--image-dir", str(images)) as plugin:
        base = str(images / "base.raw")
        plugin.ok("/VolumeDriver.Create", {"Name": "v", "Opts": {"base": base}})
        where = plugin.ok("/VolumeDriver.Mount", {"Name": "v", "ID": "c"})["Mountpoint"]
        assert Path(where, "os").read_text() == "debian"
        plugin.ok("/VolumeDriver.Unmount", {"Name": "v", "ID": "c"})
        status, reply = plugin.post(
            "/VolumeDriver.Create", {"Name": "w", "Opts": {"base": str(tmp_path / "elsewhere.raw")}}
        )
        assert status == 500 and "elsewhere.raw" in reply["Err"], reply
        status, reply = plugin.post("/VolumeDriver.Create", {"Name": "w", "Opts": {"base": "x"}})
        assert status == 500 and "no volume of that name" in reply["Err"]
        assert [v["Name"] for v in plugin.ok("/VolumeDriver.List")["Volumes"]] == ["v"]
        assert [p.name for p in (plugin.state / "images").iterdir()] == ["v.qcow2"]
        plugin.ok("/VolumeDriver.Remove", {"Name": "v"})
    assert (images / "base.raw").read_bytes() == before  # a base is only read
