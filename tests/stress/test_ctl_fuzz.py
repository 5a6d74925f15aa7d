"""Hostile input to the ``.ctl`` language: every write succeeds or fails with a clean errno.

Commands come from hypothesis (names, option trees spelled dotted, as JSON or as a path
shorthand, and plain random bytes) plus a fixed list of the worst cases (writes of several
MiB, NULs, invalid UTF-8, JSON nested a hundred thousand deep, overlong names and keys). A
failed command must change nothing: through a mount, status.json reads the same; without a
mount (the control plane over a BlockLayer, for volume), the status, the graph's nodes and
the process's descriptors are the same.
"""

from __future__ import annotations

import errno
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.frontends.ctl import VERBS, ControlFiles, parse
from blkfs.layer import BlockLayer
from tests.conftest import needs_fuse
from tests.helpers import Mount, blkfs, pattern_image, without_stats
from tests.jobs import jobs

pytestmark = [pytest.mark.stress]
MiB = 1 << 20

DRIVERS = ["raw", "qcow2", "null", "file", "throttle", "blkdebug", "copy-on-read", "nosuch"]
KEYS = [
    "driver",
    "node-name",
    "read-only",
    "detect-zeroes",
    "discard",
    "file",
    "filename",
    "locking",
    "offset",
    "size",
    "backing",
    "image",
    "inject-error",
    "event",
    "errno",
    "limits",
    "iops-total",
    "bps-read-max",
    "throttle-group",
    "l2-cache-size",
    "align",
    "drop-writes",
    "delay",
    "read",
    "0",
    "x",
    "",
]
WORDS = [
    "on",
    "off",
    "auto",
    "64k",
    "1M",
    "2G",
    "-1",
    "0x10",
    "1e3",
    "1.5k",
    "null",
    "EIO",
    "read",
    "write",
    "unmap",
    "ignore",
    "10ms",
    "n0",
    "d0",
    "#node0",
    "..",
    "/",
    ",",
]
NAMES = ["d0", "d1", "cd", "n0", "q0", "ro"]


def vocabulary(images: Path) -> list[str]:
    return (
        DRIVERS
        + WORDS
        + [str(images / n) for n in ("a.img", "b.qcow2", "missing.img")]
        + [str(images.parent / "outside.img"), str(images / ".." / "outside.img")]
    )


def option_trees(words: list[str]) -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.sampled_from(words),
        st.integers(-(2**70), 2**70),
        st.booleans(),
        st.none(),
        st.floats(),
        st.text(max_size=12),
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.dictionaries(st.sampled_from(KEYS), inner, max_size=5) | st.lists(inner, max_size=3)
        ),
        max_leaves=16,
    )


def dotted(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in dotted(v, f"{prefix}{k}.")]
    if isinstance(tree, list):
        return [item for i, v in enumerate(tree) for item in dotted(v, f"{prefix}{i}.")]
    return [f"{prefix[:-1]}={str(tree).replace(',', ',,')}"]


@st.composite
def commands(draw: Any, words: list[str]) -> tuple[str, bytes]:
    """One (verb, payload): structured most of the time, raw bytes otherwise."""
    verb = draw(st.sampled_from(VERBS))
    kind = draw(st.sampled_from(["dotted", "json", "path", "name", "bytes", "text"]))
    name = draw(st.sampled_from(NAMES) | st.text(min_size=1, max_size=40))
    if kind == "bytes":
        return verb, draw(st.binary(max_size=400))
    if kind == "text":
        return verb, draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if kind == "name":
        return verb, f"{name}\n".encode("utf-8", "surrogatepass")
    tree = draw(option_trees(words))
    if kind == "json":
        options = json.dumps(tree if isinstance(tree, dict) else {"driver": tree})
    elif kind == "path":
        options = ",".join([draw(st.sampled_from(words)), *dotted(tree)[:4]])
    else:
        options = ",".join(dotted(tree)) or "driver=null"
    return verb, f"{name} {options}".encode("utf-8", "surrogatepass")


def hostile_cases(images: Path) -> list[tuple[str, bytes]]:
    """The worst inputs, tried on every verb they make sense for."""
    a = str(images / "a.img").encode()
    deep = 100_000
    cases = [
        b"d0 " + b"a" * (4 * MiB),
        b"x" * (8 * MiB),
        b"huge driver=null,size=" + b"9" * (3 * MiB),
        b"d9 driver=null\0",
        b"\0" * 4096,
        b"d9\0 driver=null",
        b"\xff\xfe\xfd driver=null",
        b"d9 driver=null,node-name=\xc3\x28",
        b"d9 " + b"\xed\xa0\x80",  # an encoded surrogate: not UTF-8
        b"d9 " + b"{" * deep,
        b"d9 " + b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b'd9 {"driver":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        b"d9 " + b"a." * 30_000 + b"=1",
        b"d9 " + b"file." * 12_000 + b"driver=null",
        b"d9 driver=null," + b",," * 30_000,
        b"d9 " + b",".join(b"k%d=1" % i for i in range(8000)),
        b"n" * 129 + b" driver=null",
        b"n" * 60_000,
        b"d9 driver=null,node-name=" + b"n" * 65,
        b"big driver=null" + b" " * (64 * 1024 - 15),  # exactly the limit: accepted
        b"big2 driver=null" + b" " * (64 * 1024 - 15),  # one byte over
        b"d9 driver=null,size=" + b"9" * 5000,
        b'd9 {"driver": "null", "size": ' + b"9" * 5000 + b"}",
        b'd9 {"driver": "null", "size": 1e400}',
        b'd9 {"driver": "null", "size": NaN}',
        b'd9 {"driver": "null", "size": -Infinity}',
        b'd9 {"driver": "raw", "file": "d9"}',
        b'd9 {"driver": "raw", "file": {"driver": "raw", "file": {"driver": "raw"}}}',
        b"d9 driver=raw,file=" + b"n0",
        b"d9 driver=qcow2,file.driver=file,file.filename=" + a + b",backing=d9",
        b"d9 " + a + b",driver=raw",
        b"d9 " + a + b"," * 5000,
        b"d\r9 driver=null",  # line breaks in messages
        "d9\u2028x\x85y driver=null".encode(),
        b"d9 driver=null,node-name=a\rb\x0bc",
        b"\n" * 1000,
        b"\r\n",
        b"",
        b" ",
        b"d9 \t driver=null",
        b"../d9 driver=null",
        b".ctl driver=null",
        b"-d9 driver=null",
        "d\u00e9 driver=null".encode(),
        b"d9 /dev/zero",
        b"d9 /proc/self/mem",
        b"d9 /",
        b"d9 " + str(images).encode(),
    ]
    return [(verb, payload) for payload in cases for verb in VERBS]


@pytest.fixture
def fuzz_images(images: Path) -> Path:
    pattern_image(images / "a.img", MiB, image_id=1)
    blkfs("image", "create", "-f", "qcow2", str(images / "b.qcow2"), "2M")
    pattern_image(images.parent / "outside.img", MiB, image_id=2)
    return images


# -- without a mount: the parsers and the control plane, for volume ------------------------


@settings(max_examples=3000, deadline=None)
@given(
    verb=st.sampled_from(VERBS),
    payload=st.binary(max_size=600) | st.text().map(lambda t: t.encode("utf-8", "surrogatepass")),
)
def test_parse_command_and_options_fail_only_with_einval(verb: str, payload: bytes) -> None:
    try:
        args = parse(verb, payload)
    except BlockError as exc:
        assert exc.errno == errno.EINVAL
        return
    assert all(isinstance(key, str) for key in args)


class Direct:
    """A control plane over a BlockLayer (no FUSE) in a known state, for one example."""

    def __init__(self, images: Path) -> None:
        self.images = images
        self.layer = BlockLayer([str(images)])
        self.control = ControlFiles(Commands(self.layer))

    async def setup(self) -> None:
        for command in (
            f"d0 {self.images / 'a.img'}",
            "n0 driver=null,node-name=n0",
            "cd",
            f"q0 {self.images / 'b.qcow2'}",
        ):
            await self.control.write("create", command.encode())

    async def state(self) -> tuple[str, list[str], int]:
        return (
            json.dumps(without_stats(await self.layer.status()), sort_keys=True),
            sorted(self.layer.graph.nodes),
            len(os.listdir("/proc/self/fd")),
        )


def run_direct(images: Path, cases: list[tuple[str, bytes]], tally: Counter[str]) -> None:
    async def main() -> None:
        direct = Direct(images)
        await direct.setup()
        try:
            for verb, payload in cases:
                before = await direct.state()
                try:
                    await direct.control.write(verb, payload)
                except BlockError as exc:
                    tally[errno.errorcode.get(exc.errno, str(exc.errno))] += 1
                    assert await direct.state() == before, (verb, payload[:200])
                    assert direct.control.commands.errors[-1].startswith(verb)
                else:
                    tally["ok"] += 1
        finally:
            await direct.layer.close()
        assert direct.layer.graph.nodes == {}

    trio.run(main)


def test_control_plane_without_a_mount(
    fuzz_images: Path, figures: dict[str, Any], stress_seconds: Callable[[float], float]
) -> None:
    tally: Counter[str] = Counter()
    run_direct(fuzz_images, hostile_cases(fuzz_images), tally)
    words = vocabulary(fuzz_images)
    examples = int(700 * stress_seconds(20) / 20)

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(commands(words), min_size=1, max_size=5))
    def fuzz(cases: list[tuple[str, bytes]]) -> None:
        run_direct(fuzz_images, cases, tally)

    fuzz()
    figures.update(cases=sum(tally.values()), by_result=dict(sorted(tally.items())))
    assert tally["ok"] > 0 and tally["EINVAL"] > 0


# -- through a mount ----------------------------------------------------------------------


@needs_fuse
def test_ctl_files_through_a_mount(
    mount_factory: Callable[..., Mount],
    fuzz_images: Path,
    figures: dict[str, Any],
    stress_seconds: Callable[[float], float],
) -> None:
    images = fuzz_images
    mount = mount_factory(
        "--image-dir",
        str(images),
        "--backend",
        f"d0={images / 'a.img'}",
        "--backend",
        "n0=driver=null,node-name=n0",
        "--backend",
        "cd=",
        "--backend",
        f"q0={images / 'b.qcow2'}",
    )
    tally: Counter[str] = Counter()

    def busy() -> set[str]:
        """Backends with a job that may still end by itself, switching their tree."""
        return {
            job["device"] for job in jobs(mount).values() if job["status"] in ("created", "running")
        }

    def steady(status: dict[str, Any], moving: set[str]) -> dict[str, Any]:
        return {**status, "backends": [b for b in status["backends"] if b["name"] not in moving]}

    def attempt(verb: str, payload: bytes) -> None:
        moving = busy()
        before = without_stats(mount.status())
        try:
            mount.ctl(verb, payload)
        except OSError as exc:
            assert exc.errno, (verb, payload[:200])
            tally[errno.errorcode.get(exc.errno, str(exc.errno))] += 1
            after = without_stats(mount.status())
            moving |= busy()
            assert steady(after, moving) == steady(before, moving), (verb, payload[:200])
            assert mount.last_error().startswith(f"{verb}: "), (verb, payload[:200])
        else:
            tally["ok"] += 1
        assert mount.alive()

    for verb, payload in hostile_cases(images):
        attempt(verb, payload)
    words = vocabulary(images)
    examples = int(1000 * stress_seconds(20) / 20)

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(commands(words))
    def fuzz(case: tuple[str, bytes]) -> None:
        attempt(*case)

    fuzz()
    # random bytes at odd offsets and in several writes on one descriptor
    for verb in VERBS:
        fd = os.open(mount.path / ".ctl" / verb, os.O_WRONLY)
        try:
            for offset, payload in [
                (0, b"zz driver=null"),
                (12345, b"\xff\x00"),
                (1 << 40, b"zz driver=null"),
            ]:
                try:
                    os.pwrite(fd, payload, offset)
                    tally["ok"] += 1
                except OSError as exc:
                    tally[errno.errorcode.get(exc.errno or 0, "?")] += 1
        finally:
            os.close(fd)
        assert mount.alive()
    for report in ("status", "status.json", "error"):
        assert errno_of_open(mount.path / ".ctl" / report, os.O_WRONLY) == errno.EACCES
    errors = (mount.path / ".ctl" / "error").read_text().splitlines()
    assert errors and all(line.split(":")[0] in VERBS for line in errors), errors
    figures.update(cases=sum(tally.values()), by_result=dict(sorted(tally.items())))
    log = mount.log.read_text()
    assert "internal error" not in log and "Traceback" not in log
    assert tally["ok"] > 0 and tally["EINVAL"] > 0


def errno_of_open(path: Path, flags: int) -> int:
    try:
        os.close(os.open(path, flags))
    except OSError as exc:
        return exc.errno or -1
    return 0
