"""A chain across a network: two network namespaces joined by a veth pair, with addresses of
the test's own (TEST-NET-1, 192.0.2.0/24) and nothing else on the link. blkfs on host A
exports a base image over TCP with TLS (client certificates checked, certificates made by
the README's openssl commands); blkfs on host B puts a local qcow2 overlay on top of it.
Writes stay in B's overlay, reads are the base's. The commands are the README's
walk-through, run as written (only the directories differ), through ``nsenter --net``."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.compat.peers import MiB, check, convert, to_raw
from tests.helpers import Mount, MountError, force_unmount, mounted, wait_until

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.qemu,
    pytest.mark.skipif(
        os.geteuid() != 0 or any(shutil.which(t) is None for t in ("ip", "nsenter", "qemu-img")),
        reason="needs root, ip (iproute2), nsenter and qemu-img to make two network namespaces",
    ),
]

HOST_A, HOST_B = "192.0.2.1", "192.0.2.2"
SIZE = 16 * MiB
CERTIFICATES = [
    "openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=blkfs-ca "
    "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign "
    "-keyout /srv/tls/ca-key.pem -out /srv/tls/ca-cert.pem",
    f"printf 'subjectAltName=IP:{HOST_A}\\nextendedKeyUsage=serverAuth\\n' > /srv/tls/server.ext",
    f"openssl req -newkey rsa:2048 -nodes -subj /CN={HOST_A} "
    "-keyout /srv/tls/server-key.pem -out /srv/tls/server.csr",
    "openssl x509 -req -days 365 -CA /srv/tls/ca-cert.pem -CAkey /srv/tls/ca-key.pem "
    "-CAcreateserial -extfile /srv/tls/server.ext -in /srv/tls/server.csr "
    "-out /srv/tls/server-cert.pem",
    "printf 'extendedKeyUsage=clientAuth\\n' > /srv/tls/client.ext",
    "openssl req -newkey rsa:2048 -nodes -subj /CN=host-b "
    "-keyout /srv/tls/client-key.pem -out /srv/tls/client.csr",
    "openssl x509 -req -days 365 -CA /srv/tls/ca-cert.pem -CAkey /srv/tls/ca-key.pem "
    "-CAcreateserial -extfile /srv/tls/client.ext -in /srv/tls/client.csr "
    "-out /srv/tls/client-cert.pem",
]
"""The README's commands that make a CA, host A's server certificate and host B's client
certificate in /srv/tls, run by the shell as written (with the test's directory)."""
WALKTHROUGH_A = [
    "blkfs mount /mnt/a --image-dir /srv/img --backend base=/srv/img/base.qcow2,read-only=on "
    f"--nbd {HOST_A}:10809 --nbd-tls-creds /srv/tls --nbd-tls-verify-peer on --export base",
    "blkfs ctl /mnt/a status",
]
WALKTHROUGH_B = [
    f"blkfs image create -f qcow2 /srv/img/top.qcow2 {SIZE >> 20}M",
    "blkfs mount /mnt/b --backend vm=driver=qcow2,file.driver=file,"
    "file.filename=/srv/img/top.qcow2,backing.driver=nbd,"
    f"backing.server.host={HOST_A},backing.export=base,backing.tls-creds=/srv/tls",
]
"""Host A's and host B's commands as the README shows them, with /srv/img, /srv/tls and
/mnt/a, /mnt/b for the test's directories (both hosts read the one /srv/tls here)."""


@contextmanager
def two_hosts() -> Iterator[tuple[str, str]]:
    """Network namespaces A and B, joined by a veth pair; deleted afterwards, even on
    failure (which deletes the veth pair with them)."""
    tag = f"blkfs{os.getpid()}"
    names = (f"{tag}a", f"{tag}b")
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                f"{tag}va",
                "netns",
                names[0],
                "type",
                "veth",
                "peer",
                "name",
                f"{tag}vb",
                "netns",
                names[1],
            ],
            check=True,
        )
        for name, end, address in ((names[0], "va", HOST_A), (names[1], "vb", HOST_B)):
            subprocess.run(
                ["ip", "-n", name, "addr", "add", f"{address}/24", "dev", f"{tag}{end}"], check=True
            )
            subprocess.run(["ip", "-n", name, "link", "set", f"{tag}{end}", "up"], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def on_host(netns: str, command: str, paths: dict[str, Path]) -> list[str]:
    """A walk-through command as the test runs it: in the host's network namespace, with
    the test's directories for the README's."""
    for readme, real in paths.items():
        command = command.replace(readme, str(real))
    words = command.split()
    assert words[0] == "blkfs"
    return ["nsenter", f"--net=/run/netns/{netns}", sys.executable, "-m", "blkfs", *words[1:]]


@contextmanager
def daemons() -> Iterator[Callable[[list[str], Path], Mount]]:
    """Run ``blkfs mount`` commands; every mount they make is stopped afterwards."""
    started: list[Mount] = []

    def mount(command: list[str], path: Path) -> Mount:
        log = path.with_name(path.name + ".log")
        result = subprocess.run(
            [*command, "--log-file", str(log), "--log-level", "debug"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode:
            raise MountError(result.stderr.strip())
        started.append(Mount(path, log))
        return started[-1]

    try:
        yield mount
    finally:
        for each in reversed(started):  # the overlay before the export it reads
            each.stop()
        leftovers = [m.path for m in started if mounted(m.path) or m.alive()]
        for path in leftovers:
            force_unmount(path)
    assert not leftovers, f"mounts left behind: {leftovers}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_overlay_on_one_host_over_an_export_of_another(tmp_path: Path) -> None:
    img_a, img_b = tmp_path / "a-img", tmp_path / "b-img"
    img_a.mkdir()
    img_b.mkdir()
    base = convert(img_a, "base", size=SIZE)
    expected = bytearray(to_raw(base))
    before = digest(base)
    tls = tmp_path / "tls"
    tls.mkdir()
    for command in CERTIFICATES:
        subprocess.run(command.replace("/srv/tls", str(tls)), shell=True, check=True, timeout=60)
    paths_a = {"/srv/img": img_a, "/srv/tls": tls, "/mnt/a": tmp_path / "a"}
    paths_b = {"/srv/img": img_b, "/srv/tls": tls, "/mnt/b": tmp_path / "b"}
    with two_hosts() as (netns_a, netns_b), daemons() as mount:
        server = mount(on_host(netns_a, WALKTHROUGH_A[0], paths_a), tmp_path / "a")
        subprocess.run(on_host(netns_b, WALKTHROUGH_B[0], paths_b), check=True, capture_output=True)
        overlay = mount(on_host(netns_b, WALKTHROUGH_B[1], paths_b), tmp_path / "b")
        vm = overlay / "vm"
        assert vm.read_bytes() == expected  # every byte came over the network
        payload = os.urandom(3 * MiB + 12345)
        with open(vm, "r+b", buffering=0) as f:
            f.seek(5 * MiB + 7)
            f.write(payload)
            os.fsync(f.fileno())
        expected[5 * MiB + 7 : 5 * MiB + 7 + len(payload)] = payload
        assert vm.read_bytes() == expected
        export = server.status()["exports"][0]
        assert [c["peer"].split(":")[0] for c in export["clients"]] == [HOST_B]
        assert export["stats"]["read_bytes"] >= SIZE - len(payload)
        status = subprocess.run(
            on_host(netns_a, WALKTHROUGH_A[1], paths_a), check=True, capture_output=True, text=True
        ).stdout
        assert f"{HOST_A}:10809" in status and f"base: client {HOST_B}" in status
        assert export["tls"] and export["clients"][0]["tls"]
        for uri, answer in [
            (f"nbds://{HOST_A}/base?tls-certificates={tls}", str(SIZE)),
            (f"nbd://{HOST_A}/base", ""),  # plaintext: refused
        ]:
            assert (
                subprocess.run(
                    ["ip", "netns", "exec", netns_b, "nbdinfo", "--size", uri],
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                == answer
            )
        overlay.stop()
        wait_until(lambda: not server.status()["exports"][0]["clients"], "B to disconnect")
    assert digest(base) == before  # the writes stayed on host B
    check(img_b / "top.qcow2")
    allocated = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(img_b / "top.qcow2")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert '"data": true' in allocated  # the overlay holds what B wrote, nothing else
    assert os.path.getsize(img_b / "top.qcow2") < 5 * MiB


def test_the_readme_shows_this_walk_through() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for command in CERTIFICATES + WALKTHROUGH_A + WALKTHROUGH_B:
        assert command in readme, command
