"""The command layer and the .ctl text grammar without FUSE: parsing, execution, and failures
that change nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.commands import COMMANDS, Commands
from blkfs.errors import BlockError
from blkfs.frontends.ctl import VERBS, ControlFiles, format_status, parse
from blkfs.layer import BlockLayer
from tests.helpers import without_stats


@pytest.mark.parametrize(
    "payload, args",
    [
        (
            b"disk0 /img/a.qcow2\n",
            {"name": "disk0", "medium": {"file": {"driver": "file", "filename": "/img/a.qcow2"}}},
        ),
        (
            b"  cd0   driver=null,size=1M  \r\n",
            {"name": "cd0", "medium": {"driver": "null", "size": "1M"}},
        ),
        (b"cd0", {"name": "cd0"}),
        (b"cd0 on-change=error", {"name": "cd0", "on-change": "error"}),
        (
            b"cd0 /i.iso,read-only=on,on-change=error",
            {
                "name": "cd0",
                "on-change": "error",
                "medium": {"read-only": "on", "file": {"driver": "file", "filename": "/i.iso"}},
            },
        ),
    ],
)
def test_parse_create(payload: bytes, args: dict) -> None:
    assert parse("create", payload) == args


@pytest.mark.parametrize(
    "verb, payload, args",
    [
        ("eject", b"cd0 force=on", {"name": "cd0", "force": "on"}),
        ("resize", b"d 10M shrink=on", {"name": "d", "size": "10M", "shrink": "on"}),
        ("resize", b"d", {"name": "d"}),
        (
            "change",
            b"d x.img,force=on",
            {
                "name": "d",
                "force": "on",
                "medium": {"file": {"driver": "file", "filename": "x.img"}},
            },
        ),
        ("reopen", b"n0 detect-zeroes=on", {"node": "n0", "options": {"detect-zeroes": "on"}}),
        ("snapshot", b"vol /img/s1.qcow2\n", {"name": "vol", "path": "/img/s1.qcow2"}),
        (
            "snapshot",
            b"vol /img/s2.qcow2 cluster-size=16k extended-l2=on",
            {"name": "vol", "path": "/img/s2.qcow2", "cluster-size": "16k", "extended-l2": "on"},
        ),
        (
            "mirror",
            b"vol /img/m.qcow2 sync=top speed=10M",
            {"name": "vol", "target": "/img/m.qcow2", "sync": "top", "speed": "10M"},
        ),
        (
            "mirror",
            b"vol driver=qcow2,file.filename=/m format=raw",  # node options as the target
            {"name": "vol", "target": "driver=qcow2,file.filename=/m", "format": "raw"},
        ),
        (
            "commit",
            b"vol base=/img/base.qcow2 job-id=c1",
            {"name": "vol", "base": "/img/base.qcow2", "job-id": "c1"},
        ),
        ("job-set-speed", b"c1 speed=0", {"job": "c1", "speed": "0"}),
    ],
)
def test_parse_the_other_commands(verb: str, payload: bytes, args: dict) -> None:
    assert parse(verb, payload) == args


def test_every_command_is_declared_once_with_its_usage() -> None:
    assert VERBS[:7] == ("create", "delete", "change", "eject", "insert", "reopen", "resize")
    assert {"export", "export-del"} <= set(VERBS)
    assert COMMANDS["resize"].usage() == "NAME [SIZE] [shrink=on]"
    assert COMMANDS["create"].usage() == (
        "NAME [OPTIONS] [on-change=follow|error] "
        "[werror=report|ignore|enospc|stop] "
        "[rerror=report|ignore|enospc|stop] [passthrough=on]"
    )
    assert COMMANDS["cont"].usage() == "[NAME]"
    assert COMMANDS["job-set-speed"].usage() == "JOB-ID speed=RATE"
    assert COMMANDS["backup"].usage() == (
        "NAME PATH [sync=full|top|incremental|bitmap] [format=qcow2|raw] [existing=on] "
        "[speed=RATE] [job-id=JOB-ID] [bitmap=BITMAP] [bitmap-mode=on-success|always|never]"
    )
    assert COMMANDS["bitmap-add"].usage() == (
        "NODE-NAME name=NAME [granularity=BYTES] [persistent=on] [disabled=on]"
    )
    assert all(command.help for command in COMMANDS.values())


@pytest.mark.parametrize(
    "verb, payload, fragment",
    [
        ("change", b"disk0\n", "options missing"),
        ("delete", b"disk0 extra", "takes only NAME [force=on]"),
        ("resize", b"disk0 1M 2M", "takes only NAME [SIZE] [shrink=on]"),
        ("create", b"\n", "no name"),
        ("create", b"a\nb\n", "one command per write"),
        ("create", b"\xff", "not valid UTF-8"),
        ("create", b"a\0b", "NUL"),
        ("create", b"x" * (64 * 1024 + 1), "longer than"),
        ("snapshot", b"vol /a /b", "takes only NAME PATH"),
        ("mirror", b"vol /m sped=1M", "takes only NAME PATH"),
    ],
)
def test_parse_errors_say_what_is_right(verb: str, payload: bytes, fragment: str) -> None:
    with pytest.raises(BlockError) as err:
        parse(verb, payload)
    assert err.value.errno == errno.EINVAL and fragment in str(err.value)


@settings(max_examples=300, deadline=None)
@given(verb=st.sampled_from(VERBS), payload=st.binary(max_size=300))
def test_any_bytes_parse_or_fail_with_einval(verb: str, payload: bytes) -> None:
    try:
        parse(verb, payload)
    except BlockError as exc:
        assert exc.errno == errno.EINVAL


async def test_failed_commands_are_recorded_and_change_nothing(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(1 << 20))
    layer = BlockLayer()
    control = ControlFiles(Commands(layer))
    try:
        await control.write("create", f"disk0 {image}".encode())
        before = without_stats(await layer.status())
        for verb, payload, code in [
            ("create", f"disk0 {image}", errno.EEXIST),
            (
                "change",
                "disk0 driver=raw,file.driver=file,file.filename=/nonexistent",
                errno.ENOENT,
            ),
            ("change", "disk0 driver=raw,size=x,file.driver=null", errno.EINVAL),
            ("insert", "disk0 driver=null", errno.EBUSY),
            ("eject", "nosuch", errno.ENOENT),
        ]:
            with pytest.raises(BlockError) as err:
                await control.write(verb, payload.encode())
            assert err.value.errno == code
            assert control.commands.errors[-1].startswith(f"{verb}: ")
            assert without_stats(await layer.status()) == before
        assert len(control.commands.errors) == 5
        assert "EEXIST" in (await control.read("error")).splitlines()[0]
    finally:
        await layer.close()


async def test_status_table_lists_backends_and_trees(tmp_path: Path) -> None:
    layer = BlockLayer()
    try:
        await layer.create("empty")
        await layer.create("n", "driver=raw,node-name=fmt,file.driver=null,file.size=2M")
        text = format_status(await layer.status())
        lines = text.splitlines()
        assert lines[0].split() == ["BACKEND", "MEDIUM", "RO", "SIZE", "OPEN", "ROOT"]
        assert lines[1].split()[:3] == ["empty", "no", "no"]
        assert lines[2].split() == ["n", "yes", "no", "2.0", "MiB", "0", "raw", "fmt"]
        assert "    file: null [" in text
    finally:
        await layer.close()


async def test_arguments_are_checked_before_anything_runs() -> None:
    layer = BlockLayer()
    commands = Commands(layer)
    try:
        await commands.run("create", {"name": "d", "medium": {"driver": "null"}})
        for name, args, fragment in [
            ("eject", {"name": "d", "force": "maybe"}, "force must be on or off"),
            ("eject", {"name": "d", "forse": "on"}, "takes no argument 'forse'"),
            ("resize", {"name": "d", "size": "10MB"}, "size must be a size"),
            ("create", {"name": "e", "on-change": "later"}, "on-change must be follow or error"),
            ("eject", {}, "NAME missing"),
            ("nosuch", {}, "unknown command"),
        ]:
            with pytest.raises(BlockError) as err:
                await commands.run(name, args)
            assert err.value.errno == errno.EINVAL and fragment in str(err.value), name
        assert [b.name for b in layer] == ["d"] and layer.find("d").has_medium
    finally:
        await layer.close()
