"""End to end with a real dockerd: ``docker volume create -d blkfs``, ``docker run -v``,
thin clones written by two containers at once, a snapshot and rollback of one while the
other runs, and the plugin killed and started again under a running container."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_fuse, needs_loop, needs_qemu
from tests.helpers import run, wait_until
from tests.volumes.dockerd import IMAGE, Dockerd, running_dockerd
from tests.volumes.plugin import Plugin, running_plugin

pytestmark = [
    needs_fuse,
    needs_loop,
    needs_qemu,
    pytest.mark.fuse,
    pytest.mark.loop,
    pytest.mark.qemu,
]
README = Path(__file__).resolve().parents[2] / "README.md"
PLUGINS = Path("/run/docker/plugins")
"""Where dockerd finds a plugin's socket; the file's name is the driver's."""


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[tuple[Dockerd, Plugin, str]]:
    """dockerd, and a plugin it finds under a name of this test's own."""
    name = f"blkfs-test-{secrets.token_hex(4)}"
    PLUGINS.mkdir(parents=True, exist_ok=True)
    socket = PLUGINS / f"{name}.sock"
    try:
        with (
            running_plugin(tmp_path, socket=socket) as plugin,
            running_dockerd(tmp_path / "docker") as dockerd,
        ):
            yield dockerd, plugin, name
    finally:
        socket.unlink(missing_ok=True)


def docker_json(dockerd: Dockerd, *args: str) -> Any:
    return json.loads(dockerd.docker(*args).stdout)


def in_volume(dockerd: Dockerd, volume: str, script: str) -> str:
    """A container's output: ``script`` run with the volume on /data."""
    return dockerd.docker(
        "run", "--rm", "--network", "none", "-v", f"{volume}:/data", IMAGE, "sh", "-c", script
    ).stdout


def start(dockerd: Dockerd, name: str, volume: str, script: str) -> None:
    """A container that runs ``script`` on /data, then stays until stopped."""
    dockerd.docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "none",
        "-v",
        f"{volume}:/data",
        IMAGE,
        "sh",
        "-c",
        f"{script} && touch /data/{name}.done && exec sleep 1000",
    )


def wait_done(dockerd: Dockerd, name: str) -> None:
    deadline = time.monotonic() + 120
    while dockerd.docker("exec", name, "cat", f"/data/{name}.done", check=False).returncode:
        assert time.monotonic() < deadline, dockerd.docker("logs", name).stderr
        time.sleep(0.2)


def test_two_containers_on_thin_clones(driver: tuple[Dockerd, Plugin, str]) -> None:
    dockerd, plugin, name = driver
    dockerd.docker("volume", "create", "-d", name, "-o", "size=64M", "base")
    in_volume(dockerd, "base", "echo debian > /data/os && sync")
    for clone in ("one", "two"):
        dockerd.docker("volume", "create", "-d", name, "-o", "base=base", clone)
    listed = dockerd.docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.split("\n")
    assert {f"{name} base", f"{name} one", f"{name} two"} <= set(listed)

    # both clones written at once; the writes reach the disk (fsync) before .done
    blob = "dd if=/dev/urandom of=/data/blob bs=64k count=256 conv=fsync 2>/dev/null"
    start(dockerd, "w1", "one", f"{blob} && echo v1 > /data/state && sync")
    start(dockerd, "w2", "two", f"{blob} && echo two > /data/state && sync")
    wait_done(dockerd, "w1")
    wait_done(dockerd, "w2")
    (status,) = docker_json(dockerd, "volume", "inspect", "one")
    assert status["Driver"] == name and status["Mountpoint"]
    assert status["Status"]["chain"][1].endswith("/base.qcow2")
    assert status["Status"]["users"] == 1

    # a snapshot of one while both run, a change thrown away, the other untouched
    plugin.volume("snapshot", "one")
    dockerd.docker("exec", "w1", "sh", "-c", "echo broken > /data/state && rm /data/blob && sync")
    refused = plugin.volume("rollback", "one", check=False)
    assert refused.returncode == 1 and "--remount" in refused.stderr
    refused = plugin.volume("rollback", "--remount", "one", check=False)
    assert refused.returncode == 1 and "still holds" in refused.stderr
    dockerd.docker("stop", "-t", "1", "w1")
    assert plugin.volume("inspect", "one").stdout.count('"users": 0') == 1
    plugin.volume("rollback", "one")
    assert in_volume(dockerd, "one", "cat /data/state /data/os") == "v1\ndebian\n"
    assert dockerd.docker("exec", "w2", "cat", "/data/state").stdout == "two\n"

    # the plugin killed under a running container, and started again
    plugin.kill()
    dockerd.docker("exec", "w2", "sh", "-c", "echo after > /data/late && sync")
    plugin.start()
    dockerd.docker("stop", "-t", "1", "w2")
    assert in_volume(dockerd, "two", "cat /data/state /data/late /data/os") == (
        "two\nafter\ndebian\n"
    )
    assert in_volume(dockerd, "base", "cat /data/os; ls /data") == "debian\nlost+found\nos\n"

    dockerd.docker("rm", "w1", "w2")
    for image in sorted((plugin.state / "images").glob("*.qcow2")):
        run("qemu-img", "check", "-U", image)  # blkfs holds them, idle
    refused = dockerd.docker("volume", "rm", "base", "one", "two", check=False)
    assert refused.returncode == 0, refused.stderr
    assert dockerd.docker("volume", "ls", "-q").stdout == ""
    assert not list((plugin.state / "images").iterdir())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_dockerd_restarted_with_a_container_running(
    driver: tuple[Dockerd, Plugin, str], signum: int
) -> None:
    """Stopped, dockerd stops its containers (Unmount) and starts them again when it comes
    back (Mount); killed, it leaves them running and cleans up when it comes back. Either
    way the volume ends with one user and its data."""
    dockerd, plugin, name = driver
    dockerd.docker("volume", "create", "-d", name, "-o", "size=32M", "kept")
    dockerd.docker(
        "run",
        "-d",
        "--name",
        "keeper",
        "--restart",
        "always",
        "--network",
        "none",
        "-v",
        "kept:/data",
        IMAGE,
        "sh",
        "-c",
        "echo boot >> /data/boots && sync && exec sleep 1000",
    )
    wait_until(
        lambda: (
            dockerd.docker("exec", "keeper", "cat", "/data/boots", check=False).stdout == "boot\n"
        ),
        "the container to start",
    )
    dockerd.stop(signum)
    dockerd.start()
    wait_until(
        lambda: (
            dockerd.docker("exec", "keeper", "cat", "/data/boots", check=False).stdout
            == "boot\nboot\n"
        ),
        "the container to start again",
        60,
    )
    status = json.loads(plugin.volume("inspect", "kept").stdout)
    assert status["Status"]["users"] == 1, status
    dockerd.docker("rm", "--force", "keeper")
    assert json.loads(plugin.volume("inspect", "kept").stdout)["Status"]["users"] == 0
    dockerd.docker("volume", "rm", "kept")


def test_the_readme_walk_through_runs(tmp_path: Path, driver: tuple[Dockerd, Plugin, str]) -> None:
    """README's Docker walk-through, run as written but for the names of this test's
    dockerd, plugin socket and scratch directory."""
    dockerd, plugin, name = driver
    found = re.search(
        r"<!-- walk-through: Docker volumes .*?-->\n```sh\n(.*?)```", README.read_text(), re.DOTALL
    )
    assert found, "README.md lost its Docker walk-through"
    lines = found.group(1).splitlines()
    assert lines[0].startswith("scripts/setup") and "blkfs volume-plugin" in lines[1]
    script = "\n".join(lines[2:])  # the test's plugin serves already
    script = script.replace("-d blkfs ", f"-d {name} ").replace("/tmp/bb", str(tmp_path / "bb"))
    script = re.sub(r"blkfs volume (\w+) ", rf"blkfs volume \1 --socket {plugin.socket} ", script)
    done = subprocess.run(
        ["bash", "-exc", script],
        env={**dockerd.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "v1\n" in done.stdout
    assert dockerd.docker("volume", "ls", "-q").stdout == ""
    assert not list((plugin.state / "images").iterdir())
