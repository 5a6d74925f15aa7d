"""The .ctl command language without FUSE: parsing, execution, and failures that change nothing."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.backend import BlockLayer
from blkfs.control import COMMANDS, ControlPlane, format_status, parse_command
from blkfs.errors import BlockError
from tests.helpers import without_stats


@pytest.mark.parametrize("payload, name, options", [
    (b"disk0 /img/a.qcow2\n", "disk0", "/img/a.qcow2"),
    (b"  cd0   driver=null,size=1M  \r\n", "cd0", "driver=null,size=1M"),
    (b"cd0", "cd0", None),
])
def test_parse_create(payload: bytes, name: str, options: str | None) -> None:
    command = parse_command("create", payload)
    assert (command.name, command.options) == (name, options)


@pytest.mark.parametrize("verb, payload, fragment", [
    ("change", b"disk0\n", "options missing"),
    ("delete", b"disk0 extra", "takes only a name"),
    ("create", b"\n", "no name"),
    ("create", b"a\nb\n", "one command per write"),
    ("create", b"\xff", "not valid UTF-8"),
    ("create", b"a\0b", "NUL"),
    ("create", b"x" * (64 * 1024 + 1), "longer than"),
])
def test_parse_errors_say_what_is_right(verb: str, payload: bytes, fragment: str) -> None:
    with pytest.raises(BlockError) as err:
        parse_command(verb, payload)
    assert err.value.errno == errno.EINVAL and fragment in str(err.value)


@settings(max_examples=300, deadline=None)
@given(verb=st.sampled_from(COMMANDS), payload=st.binary(max_size=300))
def test_any_bytes_parse_or_fail_with_einval(verb: str, payload: bytes) -> None:
    try:
        parse_command(verb, payload)
    except BlockError as exc:
        assert exc.errno == errno.EINVAL


async def test_failed_commands_are_recorded_and_change_nothing(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(bytes(1 << 20))
    layer = BlockLayer()
    control = ControlPlane(layer)
    try:
        await control.run("create", f"disk0 {image}".encode())
        before = without_stats(await layer.status())
        for verb, payload, code in [
            ("create", f"disk0 {image}", errno.EEXIST),
            ("change", "disk0 driver=raw,file.driver=file,file.filename=/nonexistent",
             errno.ENOENT),
            ("change", "disk0 driver=raw,size=x,file.driver=null", errno.EINVAL),
            ("insert", "disk0 driver=null", errno.EBUSY),
            ("eject", "nosuch", errno.ENOENT),
        ]:
            with pytest.raises(BlockError) as err:
                await control.run(verb, payload.encode())
            assert err.value.errno == code
            assert control.errors[-1].startswith(f"{verb}: ")
            assert without_stats(await layer.status()) == before
        assert len(control.errors) == 5
        assert "EEXIST" in control.error_text().splitlines()[0]
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
