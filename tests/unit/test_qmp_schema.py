"""QMP's arguments derive from the command layer's declarations: a value the monitor lets
through is one the command takes, and a value it refuses is refused in QEMU's words."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.commands import COMMANDS, Kind
from blkfs.errors import BlockError
from blkfs.frontends.qmp.translate import TABLE, QmpError, check_args

ARGS = sorted(
    (name, key, arg)
    for name, command in TABLE.items()
    for key, arg in (command.args or {}).items()
    if arg.param is not None
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@settings(max_examples=3000, deadline=None)
@given(st.sampled_from(ARGS), json_values | st.sampled_from(["full", "safe", "retain", "on"]))
def test_a_value_qmp_lets_through_is_one_the_command_takes(case: Any, value: Any) -> None:
    name, key, arg = case
    try:
        arg.check(key, value)
    except QmpError as exc:
        assert exc.klass == "GenericError" and f"'{key}'" in exc.desc
        return
    try:
        arg.param.convert(name, value)
    except BlockError as exc:
        pytest.fail(f"{name} {key}={value!r} passed QMP's check but not the command's: {exc}")


def test_types_and_checks_come_from_the_command_layer() -> None:
    resize = TABLE["block_resize"].args or {}
    assert resize["size"].param is COMMANDS["resize"].param("size")
    assert resize["size"].type == "int" and resize["device"].type == "str"
    throttle = TABLE["block_set_io_throttle"].args or {}
    assert throttle["bps_rd"].param is COMMANDS["throttle"].param("bps-read")
    assert throttle["bps_rd"].required and not throttle["bps_rd_max"].required
    assert throttle["iops_max_length"].param.kind is Kind.COUNT
    mirror = TABLE["drive-mirror"].args or {}
    assert mirror["sync"].param.choices == COMMANDS["mirror"].param("sync").choices


@pytest.mark.parametrize(
    "command, args, desc",
    [
        ("block_resize", {"size": -1}, "Parameter 'size' expects a non-negative value"),
        ("block_resize", {"size": "1G"}, "Invalid parameter type for 'size', expected: integer"),
        ("block_resize", {"size": 1, "x": 1}, "Parameter 'x' is unexpected"),
        ("block_resize", {}, "Parameter 'size' is missing"),
        ("drive-mirror", {"device": "d", "target": "t", "sync": "x"}, "does not accept value 'x'"),
        ("block-job-set-speed", {"device": "j", "speed": -5}, "expects a non-negative value"),
        ("eject", {"force": "on"}, "Invalid parameter type for 'force', expected: boolean"),
    ],
)
def test_refusals_are_in_qemus_words(command: str, args: dict[str, Any], desc: str) -> None:
    spec = TABLE[command].args
    assert spec is not None
    with pytest.raises(QmpError) as refused:
        check_args(spec, args)
    assert refused.value.klass == "GenericError" and desc in refused.value.desc
