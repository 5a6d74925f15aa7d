"""``mount -t fuse.blkfs CONFIG MOUNTPOINT`` and its ``/etc/fstab`` line.

For a FUSE type ``fuse.SUBTYPE``, mount(8) runs libfuse's mount.fuse3, which runs the
program SUBTYPE as ``SUBTYPE SOURCE MOUNTPOINT -o OPTIONS`` (the options minus those only
mount(8) reads, such as noauto, nofail, _netdev; plus dev and suid unless nodev, nosuid).
So ``blkfs`` called with a file where a command would be is a mount: the file is the
``--config`` TOML, the options are the mount's flags, spelled as FUSE options are.
"""

from __future__ import annotations

import os

OPTIONS = {
    "allow_other": "--allow-other",
    "nonempty": "--nonempty",
    "log_level": "--log-level",
    "log_file": "--log-file",
    "poll_max_ns": "--poll-max-ns",
    "image_dir": "--image-dir",
}
"""``-o`` options and the ``blkfs mount`` flag each stands for (those with ``=VALUE`` take
its value)."""
MOUNT_OPTIONS = frozenset(
    [
        "rw",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "atime",
        "noatime",
        "relatime",
        "strictatime",
        "diratime",
        "nodiratime",
        "async",
        "defaults",
    ]
)
"""Options every mount has: a FUSE mount of blkfs has them as its defaults, so they are
accepted and change nothing."""


class HelperError(Exception):
    """A ``-o`` option blkfs does not take; the message says which and what it takes."""


def is_helper_call(argv: list[str], commands: set[str]) -> bool:
    """Called by mount.fuse3: a file (a path, or one that exists) where a command would be."""
    return (
        len(argv) >= 2
        and argv[0] not in commands
        and not argv[0].startswith("-")
        and ("/" in argv[0] or os.path.isfile(argv[0]))
    )


def mount_argv(argv: list[str]) -> list[str]:
    """``SOURCE MOUNTPOINT [-o OPTIONS]`` as ``blkfs mount`` arguments."""
    source, mountpoint, *rest = argv
    args = ["mount", "--config", source, mountpoint]
    while rest:
        flag, *rest = rest
        if flag == "-v":  # mount -v passes it on: nothing more to say
            continue
        if flag != "-o" or not rest:
            raise HelperError(f"expected SOURCE MOUNTPOINT [-o OPTIONS], got '{flag}'")
        value, *rest = rest
        for option in filter(None, value.split(",")):
            args += _flag(option)
    return args


def _flag(option: str) -> list[str]:
    name, sep, value = option.partition("=")
    key = name.replace("-", "_")
    if name in MOUNT_OPTIONS or name.startswith("x-"):
        return []
    if name == "ro":
        raise HelperError(
            "option 'ro': a blkfs mount is read-write; make backends read-only in the config "
            "(read-only = true)"
        )
    if key not in OPTIONS:
        raise HelperError(f"unknown option '{name}' (blkfs takes: {', '.join(OPTIONS)})")
    takes_value = key not in ("allow_other", "nonempty")
    if takes_value != bool(sep):
        form = f"{key}=VALUE" if takes_value else key
        raise HelperError(f"option '{option}': expected {form}")
    return [OPTIONS[key], value] if takes_value else [OPTIONS[key]]
