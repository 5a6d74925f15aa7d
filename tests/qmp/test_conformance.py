"""The same QMP sequence to qemu-storage-daemon and to blkfs: the replies' shapes (keys and
value types) and error classes agree for every command both answer. Differences that are
deliberate are listed in README ("QMP monitor")."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from blkfs.frontends.qmp.translate import TABLE
from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount, wait_until
from tests.qmp.peer import drive, raw

pytestmark = [needs_fuse, needs_qemu, pytest.mark.fuse, pytest.mark.qemu]


def sequence(image: Path) -> list[bytes | dict[str, Any]]:
    n0 = {"driver": "qcow2", "node-name": "n0", "file": {"driver": "file", "filename": str(image)}}
    return [
        {"execute": "qmp_capabilities", "id": 1},
        {"execute": "qmp_capabilities"},
        b"{]",
        b"[1]",
        {"execute": "no-such-command"},
        {"execute": "query-version", "arguments": {"x": 1}},
        {"execute": "query-version", "id": "v"},
        {"execute": "blockdev-add", "arguments": n0},
        {"execute": "blockdev-add", "arguments": n0},
        {"execute": "blockdev-add", "arguments": {"driver": 123, "node-name": "x"}},
        {"execute": "query-named-block-nodes"},
        {"execute": "query-block-exports"},
        {"execute": "block-export-del", "arguments": {"id": "e9"}},
        {"execute": "block_resize", "arguments": {"node-name": "zz", "size": 1 << 20}},
        {"execute": "query-jobs"},
        {"execute": "job-pause", "arguments": {"id": "j"}},
        {"execute": "blockdev-snapshot", "arguments": {"node": "n0", "overlay": "zz"}},
        {"execute": "blockdev-snapshot", "arguments": {"node": "n0"}},
        {
            "execute": "blockdev-mirror",
            "arguments": {"device": "n0", "target": "zz", "sync": "full"},
        },
        {
            "execute": "blockdev-backup",
            "arguments": {"device": "n0", "target": "zz", "sync": "full"},
        },
        {"execute": "blockdev-backup", "arguments": {"device": "n0", "sync": "full"}},
        {"execute": "blockdev-del", "arguments": {"node-name": "n0"}},
        {"execute": "blockdev-del", "arguments": {"node-name": "n0"}},
        {"execute": "query-commands"},
    ]
    # not quit: qemu-storage-daemon 7.2 may exit before its reply is out


def shape(value: Any) -> Any:
    """Keys and value types, not values."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def conforms(ours: Any, theirs: Any) -> bool:
    """Our shape is theirs, or theirs with optional keys left out."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return set(ours) <= set(theirs) and all(conforms(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(theirs, list):
        return not ours or not theirs or conforms(ours[0], theirs[0])
    return bool(ours == theirs)


def replies(
    path: Path,
    image: Path,
    messages: list[bytes | dict[str, Any]] | None = None,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    with raw(path) as conn:
        yield "greeting", conn.greeting
        for message in sequence(image) if messages is None else messages:
            reply = conn.reply(message)
            if isinstance(message, dict) and message["execute"] == "query-named-block-nodes":
                reply = {"return": [n for n in reply["return"] if n["node-name"] == "n0"]}
            yield message, reply


@pytest.fixture
def qsd(sockdir: Path) -> Iterator[Path]:
    path = sockdir / "qsd"
    proc = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--chardev",
            f"socket,path={path},server=on,wait=off,id=m0",
            "--monitor",
            "chardev=m0",
        ],
        cwd=sockdir,
    )  # bad inputs name relative files: keep them here
    try:
        wait_until(path.exists, "qemu-storage-daemon's socket")
        yield path
    finally:
        proc.kill()
        proc.wait()


def test_replies_have_qemus_shapes(qsd: Path, monitor: tuple[Mount, Path], images: Path) -> None:
    image = images / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    theirs = list(replies(qsd, image))
    mount, path = monitor
    ours = list(replies(path, image))
    same_shapes(ours, theirs)
    nodes = next(
        r for m, r in ours if isinstance(m, dict) and m.get("execute") == "query-named-block-nodes"
    )
    assert {"node-name", "drv", "ro", "file", "image"} <= set(nodes["return"][0])
    ours_names = {c["name"] for c in ours[-1][1]["return"]}
    theirs_names = {c["name"] for c in theirs[-1][1]["return"]}
    assert {
        "blockdev-add",
        "blockdev-del",
        "block-export-add",
        "query-jobs",
        "block-stream",
        "block-commit",
        "job-dismiss",
        "blockdev-snapshot",
        "blockdev-mirror",
        "blockdev-backup",
    } <= ours_names & theirs_names
    assert mount.alive()


def same_shapes(
    ours: list[tuple[Any, dict[str, Any]]], theirs: list[tuple[Any, dict[str, Any]]]
) -> None:
    """Every reply of ours has the shape of qemu-storage-daemon's, or its error class."""
    assert len(ours) == len(theirs)
    for (message, our), (_, their) in zip(ours, theirs, strict=True):
        if "error" in their:
            assert our["error"]["class"] == their["error"]["class"], (message, our, their)
            assert set(our) == set(their)
        else:
            assert conforms(shape(our), shape(their)), (message, our, their)
            assert set(our) == set(their), message  # the id echoed, or not
            if "id" in their:
                assert our["id"] == their["id"]


def snapshot_sequence(images: Path, export: bool) -> list[bytes | dict[str, Any]]:
    """blockdev-snapshot onto an added overlay, refused, then done, then refused again."""
    base, overlay = images / f"{export}-base.qcow2", images / f"{export}-ov.qcow2"
    for image in (base, overlay):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    add = [
        {
            "execute": "blockdev-add",
            "arguments": {
                "driver": "qcow2",
                "node-name": name,
                "file": {"driver": "file", "filename": str(image)},
                **extra,
            },
        }
        for name, image, extra in (("n0", base, {}), ("ov", overlay, {"backing": None}))
    ]
    export_add: list[bytes | dict[str, Any]] = (
        [
            {
                "execute": "block-export-add",
                "arguments": {"type": "fuse", "id": "d0", "node-name": "n0"},
            }
        ]
        if export
        else []
    )
    snap = {"execute": "blockdev-snapshot", "arguments": {"node": "n0", "overlay": "ov"}}
    return [
        {"execute": "qmp_capabilities"},
        *add,
        *export_add,
        {"execute": "blockdev-snapshot", "arguments": {"node": "n0", "overlay": "n0"}},
        snap,
        snap,
    ]


def test_blockdev_snapshot_replies_as_qemus(
    qsd: Path, monitor: tuple[Mount, Path], images: Path
) -> None:
    theirs = list(replies(qsd, images, snapshot_sequence(images, False)))
    ours = list(replies(monitor[1], images, snapshot_sequence(images, True)))
    del ours[4]  # block-export-add, which qemu-storage-daemon needs not
    assert "return" in ours[5][1]  # the snapshot itself
    same_shapes(ours, theirs)


KNOWN_STATUSES = {"running", "paused", "ready", "standby", "concluded"}
"""The job statuses blkfs goes through; QEMU's others (created, waiting, pending, aborting,
null) are left out of the comparison (README: deliberate differences)."""


def without_drain_pauses(events: list[Any]) -> list[Any]:
    """The events but QEMU's pause of a job while its nodes are drained (paused, then at
    once running, at the start of a backup): blkfs jobs run on through a drain."""
    kept: list[Any] = []
    for event in events:
        if kept and event[1:] == ("running",) and kept[-1] == (event[0], "paused"):
            kept.pop()
        else:
            kept.append(event)
    return kept


def job_events(path: Path, setup: list[dict[str, Any]], target: Path) -> list[Any]:
    """Run ``setup``, then a stream and a mirror completed by job-complete; the events."""

    async def body(client: QMPClient) -> list[Any]:
        for command in setup:
            await client.execute(command["execute"], command["arguments"])
        seen: list[Any] = []

        async def until(event: str) -> None:
            while True:
                message = await client.events.get()
                data = message["data"]
                if message["event"] == "JOB_STATUS_CHANGE":
                    if data["status"] in KNOWN_STATUSES:
                        seen.append((data["id"], data["status"]))
                else:
                    seen.append((message["event"], shape(data)))
                    if message["event"] == event:
                        return

        await client.execute("block-stream", {"device": "n0", "job-id": "s"})
        await until("BLOCK_JOB_COMPLETED")
        await client.execute(
            "drive-mirror",
            {
                "device": "n1",
                "job-id": "m",
                "sync": "full",
                "format": "qcow2",
                "target": str(target),
            },
        )
        await until("BLOCK_JOB_READY")
        await client.execute("job-complete", {"id": "m"})
        await until("BLOCK_JOB_COMPLETED")
        await client.execute(
            "blockdev-backup", {"device": "n0", "job-id": "b", "sync": "full", "target": "n2"}
        )
        await until("BLOCK_JOB_COMPLETED")
        await client.execute(
            "blockdev-mirror", {"device": "n0", "job-id": "bm", "sync": "full", "target": "n3"}
        )
        await until("BLOCK_JOB_READY")
        await client.execute("job-complete", {"id": "bm"})
        await until("BLOCK_JOB_COMPLETED")
        await asyncio.sleep(0.2)  # the status change that follows
        seen.extend(
            (m["data"]["id"], m["data"]["status"])
            for m in client.events.clear()
            if m["event"] == "JOB_STATUS_CHANGE" and m["data"]["status"] in KNOWN_STATUSES
        )
        return seen

    return drive(path, body)


def chain(images: Path, name: str) -> list[dict[str, Any]]:
    """A base with data and an empty overlay on it; blockdev-add arguments for the overlay
    (n0), for a lone image (n1) and for two empty targets (n2, n3)."""
    base, top, lone, t2, t3 = (
        images / f"{name}-{n}.qcow2" for n in ("base", "top", "lone", "t2", "t3")
    )
    for image, backing in ((base, None), (top, base), (lone, None), (t2, None), (t3, None)):
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                *(["-b", str(backing), "-F", "qcow2"] if backing else []),
                str(image),
                "4M",
            ],
            check=True,
        )
    subprocess.run(["qemu-io", "-c", "write -P 7 0 1M", str(base)], check=True, capture_output=True)
    return [
        {
            "driver": "qcow2",
            "node-name": f"n{i}",
            "file": {"driver": "file", "filename": str(image)},
        }
        for i, image in enumerate((top, lone, t2, t3))
    ]


def test_job_events_come_in_qemus_order(
    qsd: Path, monitor: tuple[Mount, Path], images: Path
) -> None:
    add = [{"execute": "blockdev-add", "arguments": n} for n in chain(images, "qsd")]
    theirs = job_events(qsd, add, images / "qsd-mirror.qcow2")
    nodes = chain(images, "blkfs")
    _mount, path = monitor
    exports = [
        {
            "execute": "block-export-add",
            "arguments": {"type": "fuse", "id": f"d{i}", "node-name": f"n{i}"},
        }
        for i in (0, 1)
    ]
    ours = job_events(
        path,
        [{"execute": "blockdev-add", "arguments": n} for n in nodes] + exports,
        images / "blkfs-mirror.qcow2",
    )
    assert ours == without_drain_pauses(theirs)


FILL = {"str": "zz", "int": 1 << 20, "bool": False, "array": [], "object": {}}
"""A value of each argument type; a string names nothing that exists."""
WRONG = {"str": 7, "int": "7", "bool": "on", "array": "x", "object": "x"}
CHOICES = {
    "sync": "full",
    "type": "nbd",
    "mode": "existing",
    "copy-mode": "background",
    "read-only-mode": "retain",
    "format": "qcow2",
    "options": [{"driver": "qcow2", "node-name": "zz", "file": "zz"}],
}
"""Arguments QEMU checks first (an enumeration; blockdev-reopen's list, which must not be
empty: qemu-storage-daemon 7.2 aborts on an empty one): valid values, so that the name
lookup is what fails."""


def bad_inputs(name: str, spec: Mapping[str, tuple[str, bool]] | None) -> list[dict[str, Any]]:
    """Argument sets each failing on one thing: one missing, one of the wrong type, the
    names given naming nothing (unknown device, node or job)."""
    if spec is None:  # blockdev-add: free-form
        return [
            {},
            {"driver": 7, "node-name": "x"},
            {"driver": "qcow2", "node-name": "x", "file": "zz"},
            {
                "driver": "raw",
                "node-name": "x",
                "file": {"driver": "file", "filename": "/nonexistent"},
            },
        ]

    def value(key: str, kind: str) -> Any:
        return CHOICES.get(key, FILL[kind])

    required = {key: value(key, kind) for key, (kind, needed) in spec.items() if needed}
    names = {key: "zz" for key in ("device", "id", "node-name", "node") if key in spec}
    unknown = {**required, **dict(list(names.items())[:1])}
    inputs = [unknown]
    if required:
        inputs += [{}, *[{k: v for k, v in required.items() if k != key} for key in required]]
    inputs += [{**unknown, key: WRONG[kind]} for key, (kind, _) in spec.items()]
    return inputs


REFERENCES = ("target", "top-node", "base-node", "overlay", "node-name", "node")
"""Arguments naming a node besides the device."""


def bad_references(spec: Mapping[str, tuple[str, bool]] | None) -> list[dict[str, Any]]:
    """For a command on an existing device (``n0``): each node it names naming nothing."""
    if spec is None or "device" not in spec:
        return []
    required = {key: CHOICES.get(key, FILL[kind]) for key, (kind, needed) in spec.items() if needed}
    return [{**required, "device": "n0", key: "zz"} for key in REFERENCES if key in spec]


def test_every_commands_failures_have_qemus_classes(
    qsd: Path, monitor: tuple[Mount, Path], images: Path
) -> None:
    """Each command both answer, sent the same bad inputs (an argument missing, of the
    wrong type, a device, node or job that does not exist, a node named beside an existing
    device): the same error class."""
    with raw(qsd) as theirs, raw(monitor[1]) as ours:
        theirs.negotiate()
        ours.negotiate()
        qsd_commands = {c["name"] for c in theirs.reply({"execute": "query-commands"})["return"]}
        for peer, conn in (("qsd", theirs), ("blkfs", ours)):
            image = images / f"{peer}.qcow2"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True
            )
            assert conn.reply(
                {
                    "execute": "blockdev-add",
                    "arguments": {
                        "driver": "qcow2",
                        "node-name": "n0",
                        "file": {"driver": "file", "filename": str(image)},
                    },
                }
            ) == {"return": {}}
        assert ours.reply(
            {
                "execute": "block-export-add",
                "arguments": {  # a device, in blkfs
                    "type": "fuse",
                    "id": "d0",
                    "node-name": "n0",
                },
            }
        ) == {"return": {}}
        differences = []
        tried = 0
        for name, command in sorted(TABLE.items()):
            if name not in qsd_commands or name.startswith("query-"):
                continue
            spec = command.args and {k: (a.type, a.required) for k, a in command.args.items()}
            for arguments in [*bad_inputs(name, spec), *bad_references(spec)]:
                message = {"execute": name, "arguments": arguments}
                their, our = theirs.reply(message), ours.reply(message)
                tried += 1
                klass = [reply.get("error", {}).get("class", "(success)") for reply in (their, our)]
                if klass[0] != klass[1]:
                    differences.append(
                        f"{name} {json.dumps(arguments)}: qsd {klass[0]} "
                        f"({their.get('error', {}).get('desc')}), blkfs "
                        f"{klass[1]} ({our.get('error', {}).get('desc')})"
                    )
    assert tried > 100
    assert not differences, "\n".join(differences)
