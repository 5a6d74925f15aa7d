"""The mount-helper form (``blkfs SOURCE MOUNTPOINT -o OPTIONS``, as mount.fuse3 runs a
``fuse.blkfs`` mount) read into ``blkfs mount`` arguments."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blkfs.cli.main import VERBS, parser
from blkfs.cli.mount_helper import (
    MOUNT_OPTIONS,
    OPTIONS,
    HelperError,
    is_helper_call,
    mount_argv,
)

COMMANDS = set(VERBS)


def test_a_file_where_a_command_would_be_is_a_mount() -> None:
    assert is_helper_call(["/etc/blkfs/vm.toml", "/mnt/vm", "-o", "rw"], COMMANDS)
    assert not is_helper_call(["mount", "/mnt/vm"], COMMANDS)
    assert not is_helper_call(["mout", "/mnt/vm"], COMMANDS)  # a typo: argparse says so
    assert not is_helper_call(["--version"], COMMANDS)


def test_options_become_the_mount_flags_in_order() -> None:
    argv = mount_argv(
        ["/c.toml", "/mnt", "-o", "rw,dev,suid,allow_other,log_level=debug,image_dir=/img"]
    )
    assert argv == [
        "mount", "--config", "/c.toml", "/mnt",
        "--allow-other", "--log-level", "debug", "--image-dir", "/img",
    ]  # fmt: skip
    args = parser().parse_args(argv)
    assert args.allow_other and args.log_level == "debug" and args.image_dir == ["/img"]


@given(
    st.lists(
        st.sampled_from(sorted(MOUNT_OPTIONS))
        | st.from_regex(r"x-[a-z.]+(=[a-z0-9]+)?", fullmatch=True)
    )
)
def test_options_every_mount_has_change_nothing(options: list[str]) -> None:
    argv = ["/c.toml", "/mnt", "-v", "-o", ",".join(options)]
    assert mount_argv(argv) == ["mount", "--config", "/c.toml", "/mnt"]


@given(st.from_regex(r"[a-z_]{1,12}(=[a-z0-9/]{0,8})?", fullmatch=True))
def test_any_other_option_is_refused_or_is_one_blkfs_takes(option: str) -> None:
    name = option.partition("=")[0]
    try:
        flags = mount_argv(["/c.toml", "/mnt", "-o", option])[4:]
    except HelperError as exc:
        assert name in str(exc)
    else:
        assert name in MOUNT_OPTIONS or flags[0] == OPTIONS[name]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["/c.toml", "/mnt", "-o", "ro"], "read-write"),
        (["/c.toml", "/mnt", "-o", "allow_other=1"], "expected allow_other"),
        (["/c.toml", "/mnt", "-o", "log_level"], "expected log_level=VALUE"),
        (["/c.toml", "/mnt", "-o"], "expected SOURCE MOUNTPOINT [-o OPTIONS]"),
        (["/c.toml", "/mnt", "extra"], "got 'extra'"),
    ],
)
def test_bad_helper_calls_say_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(HelperError, match=message.replace("[", r"\[").replace("]", r"\]")):
        mount_argv(argv)
