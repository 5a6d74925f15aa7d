"""FUA and fast zero through the driver API, against real peers. The nbd driver's requests as
nbdkit's log filter records them: FUA as the server's flag where it advertises one, else the
write then a flush; fast zero as NBD_CMD_FLAG_FAST_ZERO, refused at once where the server
cannot. And blkfs's NBD export driven by qemu-io: a FUA write reaches the driver as FUA (the
log blklogwrites keeps marks it), a fast zero is done by a file and refused by a qcow2."""

from __future__ import annotations

import errno
import re
import subprocess
from pathlib import Path

import pytest

from blkfs.backend import BlockBackend
from blkfs.errors import BlockError
from blkfs.layer import BlockLayer
from tests.compat.peers import KiB, MiB, convert
from tests.conftest import needs_fuse
from tests.logreplay import FLUSH, FUA, parse
from tests.nbdpeers import nbdkit, needs_nbd_tools

pytestmark = [needs_nbd_tools, pytest.mark.qemu]

REQUEST = re.compile(r"connection=\d+ (Write|Zero|Flush) id=\d+ (.*)")


def requests(log: Path) -> list[tuple[str, dict[str, str]]]:
    """The requests nbdkit's log filter saw, in order: (kind, fields such as fua, fast)."""
    seen = []
    for line in log.read_text().splitlines():
        if match := REQUEST.search(line):
            fields = dict(f.split("=", 1) for f in match[2].split() if "=" in f)
            seen.append((match[1], fields))
    return seen


async def opened(layer: BlockLayer, uri: str) -> BlockBackend:
    return await layer.create("d", uri)


@pytest.mark.parametrize("server_fua", [True, False])
async def test_fua_is_the_servers_flag_where_it_has_one_else_a_flush(
    tmp_path: Path, server_fua: bool
) -> None:
    log = tmp_path / "requests.log"
    without_fua = [] if server_fua else ["--filter=fua"]  # its default: FUA not advertised
    with nbdkit(
        tmp_path / "s", "--filter=log", *without_fua, "memory", "1M", f"logfile={log}"
    ) as server:
        layer = BlockLayer()
        try:
            backend = await opened(layer, server.uri)
            await backend.write(0, b"\x11" * 4096, fua=True)
            await backend.write(4096, b"\x22" * 4096)
            await backend.write_zeroes(8192, 4096, fua=True)
            seen = requests(log)
        finally:
            await layer.close()
    kinds = [(kind, fields.get("fua")) for kind, fields in seen]
    if server_fua:
        assert kinds == [("Write", "1"), ("Write", "0"), ("Zero", "1")]
    else:
        assert kinds == [
            ("Write", "0"),
            ("Flush", None),
            ("Write", "0"),
            ("Zero", "0"),
            ("Flush", None),
        ]


async def test_a_fast_zero_is_the_servers_and_a_refusal_changes_nothing(tmp_path: Path) -> None:
    """memory zeroes fast; nozero's fastzeromode=slow refuses every fast zero (ENOTSUP from
    the server); fastzeromode=none advertises none, so the layer refuses at once without a
    request, unless the range reads as zeros already (then there is nothing to do)."""
    data = b"\x33" * (64 * KiB)
    for name, extra, done in [
        ("memory", [], {"data": True, "zeros": True}),
        ("slow", ["--filter=nozero", "zeromode=plugin", "fastzeromode=slow"], {}),
        ("none", ["--filter=nozero", "zeromode=plugin", "fastzeromode=none"], {"zeros": True}),
    ]:
        log = tmp_path / f"{name}.log"
        filters = [a for a in extra if a.startswith("--")]
        params = [a for a in extra if not a.startswith("--")]
        with nbdkit(
            tmp_path / name,
            "--filter=log",
            *filters,
            "memory",
            "1M",
            f"logfile={log}",
            *params,
        ) as server:
            layer = BlockLayer()
            try:
                backend = await opened(layer, server.uri)
                await backend.write(0, data)
                for what, offset in (("data", 0), ("zeros", 512 * KiB)):
                    before = await backend.read(offset, len(data))
                    if done.get(what):
                        await backend.write_zeroes(offset, len(data), fast=True)
                        assert await backend.read(offset, len(data)) == bytes(len(data))
                        continue
                    with pytest.raises(BlockError) as refused:
                        await backend.write_zeroes(offset, len(data), fast=True)
                    assert refused.value.errno == errno.ENOTSUP, (name, what)
                    assert await backend.read(offset, len(data)) == before, (name, what)
                seen = requests(log)
            finally:
                await layer.close()
        zeros = [fields.get("fast") for kind, fields in seen if kind == "Zero"]
        assert zeros == {"memory": ["1", "1"], "slow": ["1", "1"], "none": []}[name], name


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """qemu-io over NBD with the writeback cache (writethrough would add its own flushes)."""
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for command in commands:
        args += ["-c", command]
    result = subprocess.run([*args, uri], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0 and "failed" not in result.stdout, (
            result.stdout + result.stderr
        )
    return result


def uri(sock: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={sock}"


@pytest.mark.fuse
@needs_fuse
def test_fua_from_qemu_io_reaches_the_driver_as_fua(tmp_path: Path, mount_factory) -> None:
    """The export passes NBD_CMD_FLAG_FUA down to the driver as a flag: the log of
    blklogwrites marks the FUA writes, and no flush is logged for them."""
    image, log = tmp_path / "d.raw", tmp_path / "d.log"
    image.write_bytes(bytes(MiB))
    log.write_bytes(b"")
    sock = tmp_path / "nbd.sock"
    mount_factory(
        "--backend",
        f"d=driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log}",
        "--nbd",
        f"unix:{sock}",
        "--export",
        "d writable=on",
    )
    qemu_io(
        uri(sock, "d"),
        "write -f -P 0x11 0 64k",
        "write -P 0x22 64k 64k",
        "write -z -f 128k 64k",
        "flush",
    )
    entries = [(e.sector, e.nr_sectors, e.flags) for e in parse(log.read_bytes()).entries]
    assert entries == [(0, 128, FUA), (128, 128, 0), (256, 128, FUA), (0, 0, FLUSH)]


@pytest.mark.fuse
@needs_fuse
def test_fast_zero_from_qemu_io_done_by_a_file_refused_by_a_qcow2(
    tmp_path: Path, mount_factory
) -> None:
    """A raw file zeroes with fallocate, so a fast zero succeeds; blkfs's qcow2 takes no
    NO_FALLBACK, so over its data qemu-io gets ENOTSUP and the data stays."""
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\x44" * MiB)
    qcow2 = convert(tmp_path, "q", size=8 * MiB)
    sock = tmp_path / "nbd.sock"
    mount = mount_factory(
        "--backend",
        f"r={raw}",
        "--backend",
        f"q={qcow2}",
        "--nbd",
        f"unix:{sock}",
        "--export",
        "r writable=on",
        "--export",
        "q writable=on",
    )
    qemu_io(uri(sock, "r"), "write -z -u -n 0 256k")
    assert (mount / "r").read_bytes() == bytes(256 * KiB) + b"\x44" * (MiB - 256 * KiB)
    before = (mount / "q").read_bytes()
    refused = qemu_io(uri(sock, "q"), "write -z -u -n 0 1M", check=False)
    assert "Operation not supported" in refused.stdout + refused.stderr
    assert (mount / "q").read_bytes() == before
