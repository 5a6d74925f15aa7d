"""The options of ``docker volume create -d blkfs -o KEY=VALUE``: checked before anything
is made, each error naming the option."""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass, field

from blkfs.errors import BlockError

from .host import MKFS

FORMATS = ("qcow2", "raw")
THROTTLE_PREFIX = "throttle."
THROTTLE_LIMITS = {
    f"{kind}{suffix}"
    for kind in ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
    for suffix in ("", "-max", "-max-length")
}
"""QEMU's throttle limits (the throttle driver's ``limits.*``)."""
SWITCHES = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}


@dataclass(frozen=True)
class Creation:
    """What a new volume is made of."""

    size: str | None = None
    base: str | None = None
    """An image file, or the name of a volume to clone."""
    format: str = "qcow2"
    fs: str = "ext4"
    keep: bool = False
    throttle: dict[str, str] = field(default_factory=dict)


def creation(opts: Mapping[str, str]) -> Creation:
    """The creation that ``opts`` ask for; EINVAL naming the first bad option."""
    values: dict[str, str] = {}
    throttle: dict[str, str] = {}
    for key, value in opts.items():
        if not isinstance(value, str) or not isinstance(key, str):
            raise BlockError(errno.EINVAL, f"option {key!r}: a string value is needed")
        if key.startswith(THROTTLE_PREFIX):
            limit = key.removeprefix(THROTTLE_PREFIX)
            if limit not in THROTTLE_LIMITS:
                raise BlockError(errno.EINVAL, f"option {key!r}: no such throttle limit")
            throttle[limit] = value
        elif key in ("size", "base", "format", "fs", "keep"):
            values[key] = value
        else:
            raise BlockError(
                errno.EINVAL,
                f"unknown option {key!r} (size, base, format, fs, keep, throttle.LIMIT)",
            )
    fmt = values.get("format", "qcow2")
    if fmt not in FORMATS:
        raise BlockError(errno.EINVAL, f"format={fmt}: qcow2 or raw")
    fs = values.get("fs", "ext4")
    if fs not in MKFS:
        raise BlockError(errno.EINVAL, f"fs={fs}: one of {', '.join(MKFS)}")
    keep = values.get("keep", "off")
    if keep.lower() not in SWITCHES:
        raise BlockError(errno.EINVAL, f"keep={keep}: on or off")
    base, size = values.get("base"), values.get("size")
    if base is None and size is None:
        raise BlockError(errno.EINVAL, "size=SIZE is needed (or base=IMAGE|VOLUME)")
    if base is not None and fmt == "raw":
        raise BlockError(errno.EINVAL, "base= needs format=qcow2 (a raw image has no backing)")
    return Creation(size, base, fmt, fs, SWITCHES[keep.lower()], throttle)
