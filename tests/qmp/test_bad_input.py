"""Hostile and clumsy monitor clients: clean QMP errors, the daemon lives, nothing changes."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, wait_until, without_stats
from tests.qmp.peer import Raw, raw

pytestmark = [needs_fuse, needs_qemu, pytest.mark.fuse]
Monitor = tuple[Mount, Path]
CLASSES = {"GenericError", "CommandNotFound", "DeviceNotFound"}


@pytest.fixture
def victim(monitor: Monitor, images: Path) -> Monitor:
    """A monitor whose mount serves one backend, ``victim0``, on a qcow2 image."""
    mount, _ = monitor
    image = images / "v.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    mount.ctl("create", f"victim0 {image}")
    return monitor


def state(mount: Mount) -> Any:
    status = mount.status()
    return without_stats({"backends": status["backends"], "nodes": status["nodes"]})


def error_class(reply: dict[str, Any]) -> str:
    assert set(reply) <= {"error", "id"} and set(reply["error"]) == {"class", "desc"}, reply
    assert isinstance(reply["error"]["desc"], str) and reply["error"]["desc"]
    return str(reply["error"]["class"])


def test_protocol_errors(victim: Monitor) -> None:
    mount, path = victim
    before = state(mount)
    with raw(path) as conn:
        assert error_class(conn.reply({"execute": "query-block"})) == "CommandNotFound"
        assert (
            error_class(
                conn.reply({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}})
            )
            == "GenericError"
        )
        assert conn.reply({"execute": "qmp_capabilities", "id": [1, {"a": None}]}) == {
            "return": {},
            "id": [1, {"a": None}],
        }
        assert error_class(conn.reply({"execute": "qmp_capabilities"})) == "CommandNotFound"
        bad = [
            b"{]",
            b'{"execute": }',
            b"nonsense\n",
            b"[1, 2]",
            b'"text"\n',
            b'{"arguments": {}}',
            b'{"execute": 7}',
            b'{"execute": "eject", "x": 1}',
            b'{"execute": "eject", "arguments": [1]}',
            b"\xff\xfe{}"[:2] + b"{}",
        ]
        for data in bad:
            reply = conn.reply(data)
            assert error_class(reply) == "GenericError", (data, reply)
        assert "JSON parse error" in conn.reply(b"{]")["error"]["desc"]
        assert error_class(conn.reply({"execute": "no-such"})) == "CommandNotFound"
        wrong_types = [
            ("eject", {"id": 5}),
            ("block_resize", {"device": "victim0", "size": "1G"}),
            ("block_resize", {"device": "victim0", "size": True}),
            ("blockdev-del", {}),
            ("job-pause", {"id": None}),
            ("blockdev-add", {"driver": "qcow2", "node-name": 3}),
            ("block-export-add", {"type": "fuse", "id": "victim0", "node-name": "n"}),
            ("blockdev-change-medium", {"id": "victim0", "filename": ["a"]}),
            ("quit", {"now": True}),
        ]
        for command, args in wrong_types:
            assert (
                error_class(conn.reply({"execute": command, "arguments": args})) == "GenericError"
            ), command
        huge = json.dumps({"execute": "eject", "arguments": {"id": "x" * (2 << 20)}})
        assert "larger" in conn.reply(huge.encode())["error"]["desc"]
        deep = b"[" * 100 + b"]" * 100
        assert "deeper" in conn.reply(deep)["error"]["desc"]
        assert conn.reply({"execute": "query-version", "id": "after"})["id"] == "after"
    assert mount.alive() and state(mount) == before


def test_a_client_leaving_mid_command(victim: Monitor, images: Path) -> None:
    """The command finishes (a half-done command would change something) and the monitor
    serves the next client."""
    mount, path = victim
    other = images / "o.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other), "8M"], check=True)
    conn = Raw(path)
    conn.negotiate()
    conn.send(
        {
            "execute": "blockdev-change-medium",
            "arguments": {"id": "victim0", "filename": str(other)},
        }
    )
    conn.close()
    wait_until(lambda: mount.backends()["victim0"]["size"] == 8 << 20, "the change")
    for _ in range(5):  # and a client that leaves half-way through a message
        half = Raw(path)
        half.send(b'{"execute": "qmp_capabilities"}{"execute": "query-bl')
        half.close()
    with raw(path) as conn:
        conn.negotiate()
        assert conn.reply({"execute": "query-block"})["return"][0]["device"] == "victim0"
    assert mount.alive()


def fuzz_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return rng.randrange(-(2**40), 2**40)
    if choice == 1:
        return rng.choice([True, False, None, 0.5, -1, ""])
    if choice in (2, 3, 4):
        return "".join(rng.choice('abz019-_./,=\\"\n ') for _ in range(rng.randrange(9)))
    if choice in (5, 6):
        return {fuzz_key(rng): fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))]


KEYS = [
    "id",
    "device",
    "node-name",
    "driver",
    "file",
    "filename",
    "size",
    "type",
    "speed",
    "job-id",
    "target",
    "sync",
    "format",
    "mode",
    "force",
    "options",
    "writable",
]


def fuzz_key(rng: random.Random) -> str:
    return rng.choice(KEYS) if rng.randrange(3) else str(fuzz_value(rng, 3))


def test_bounded_fuzz(victim: Monitor) -> None:
    """Random arguments to every command (quit aside), and random bytes: each gets a reply,
    every error is clean, and the state is as before."""
    mount, path = victim
    before = state(mount)
    rng = random.Random(1717)
    with raw(path) as conn:
        conn.negotiate()
        names = [
            c["name"]
            for c in conn.reply({"execute": "query-commands"})["return"]
            if c["name"] not in ("quit", "qmp_capabilities")
        ]
        for _ in range(400):
            if rng.randrange(10) == 0:  # bytes outside any bracket or string
                noise = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
                conn.send(bytes(b for b in noise if b not in b'{["\\') + b"\n")
                conn.send({"execute": "query-version", "id": "sync"})
                while "id" not in (reply := conn.read()):
                    assert error_class(reply) == "GenericError"
                assert reply["id"] == "sync"
                continue
            args = {fuzz_key(rng): fuzz_value(rng) for _ in range(rng.randrange(4))}
            reply = conn.reply({"execute": rng.choice(names), "arguments": args, "id": 1})
            if "error" in reply:
                assert error_class(reply) in CLASSES
            else:
                assert reply["id"] == 1
    assert mount.alive() and state(mount) == before
