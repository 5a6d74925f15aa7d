"""The image a mirror or a backup writes: a new one made for it (as QEMU's drive-mirror and
drive-backup do), or an existing one the user names."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from blkfs.block.options import parse_options
from blkfs.errors import BlockError
from blkfs.image import create_image, is_volume_name
from blkfs.jobs.chain import chain, header_name

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend


async def target_options(
    backend: BlockBackend, target: str, fmt: str | None, sync: str, existing: bool
) -> tuple[dict[str, Any] | str, bool]:
    """(the target's node options, or the name of an existing node; whether the image was
    made here).

    ``target`` is a path, the options of a node over an existing image (``driver=...``,
    JSON: a target behind a filter, say; an ``rbd:`` image), or ``node=NAME`` alone for a
    node opened already (node-add), as QEMU's blockdev-mirror and blockdev-backup take it. A
    new image has the medium's size and, unless the format is given, the active image's
    format (qcow2 or raw). With ``sync=top`` or ``none`` a new qcow2 target takes the active
    image's backing file as its own (the target holds only the top, as the source does), and
    shares the backend's node for it."""
    if "=" in target or target.startswith("{") or is_volume_name(target):
        if fmt or (existing and not is_volume_name(target)):
            raise BlockError(
                errno.EINVAL,
                "a target given as options names its image and "
                "format itself (no format=, existing=)",
            )
        given = parse_options(target)
        if set(given) == {"node"} and isinstance(given["node"], str):
            return given["node"], False
        return given, False
    path = target
    if not os.path.isabs(path):
        raise BlockError(
            errno.EINVAL,
            f"target '{path}': an absolute path is needed (the "
            "daemon's working directory is not yours)",
        )
    layers = chain(backend)
    file = {"driver": "file", "filename": path}
    if existing:
        return ({"driver": fmt, "file": file} if fmt else {"file": file}), False
    fmt = fmt or (layers[0].driver.name if layers[0].driver.name in ("qcow2", "raw") else "raw")
    below = layers[1] if len(layers) > 1 and sync in ("top", "none") else None
    if below is not None and fmt != "qcow2":
        raise BlockError(
            errno.EINVAL,
            f"sync={sync} copies only the active image: the target "
            "needs a backing file, so format=qcow2",
        )
    options: dict[str, Any] = {"driver": fmt, "file": file}
    if below is None:
        await create_image(path, fmt, backend.length())
        return options, True
    await create_image(
        path,
        fmt,
        backend.length(),
        backing=header_name(path, below.filename() or below.name),
        backing_format=below.driver.name,
    )
    return {**options, "backing": below.name}, True
