"""Live external snapshots and rollback: not jobs, but graph changes of a moment.

A snapshot makes a new qcow2 overlay over the backend's medium (the image file is created
first, its header naming the active image as backing file) and switches the backend to it,
with the old medium as its backing node; the old active image turns read-only (as after
QEMU's blockdev-snapshot-sync). The backend is drained only for the switch: open files, loop
devices and mounted filesystems see no interruption. A rollback (which QEMU has not) drops
what was written since: with the backend drained, the active overlay is emptied in place
(QEMU's bdrv_make_empty), so the backend shows its backing file's content again.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

from blkfs.errors import BlockError
from blkfs.image import create_image
from blkfs.jobs.chain import chain, header_name

if TYPE_CHECKING:
    from blkfs.backend import BlockBackend
    from blkfs.block import Node
    from blkfs.layer import BlockLayer

log = logging.getLogger("blkfs.jobs")


def _backing_file(backend: BlockBackend, active: Node) -> str:
    """The file of ``active``, the backend's active image, which the overlay's header names
    as its backing file; EINVAL if it has none."""
    image = active.filename()
    if image is None:
        raise BlockError(
            errno.EINVAL,
            f"snapshot: {backend.name}'s medium has no image file to name as backing file",
        )
    return image


async def snapshot(
    layer: BlockLayer, backend: BlockBackend, overlay: str, options: Mapping[str, str] | None = None
) -> None:
    """Put a new qcow2 overlay at ``overlay`` (a new file, made with the qcow2 creation
    ``options``) on top of the backend's medium."""
    if not os.path.isabs(overlay):
        raise BlockError(
            errno.EINVAL,
            f"snapshot: '{overlay}': an absolute path is needed "
            "(the daemon's working directory is not yours)",
        )
    backend.check_op("snapshot it")  # before the overlay's file is made
    root = backend.root_node()
    active = chain(backend)[0]
    image = _backing_file(backend, active)
    await create_image(
        overlay,
        "qcow2",
        backend.length(),
        backing=header_name(overlay, image),
        backing_format=active.driver.name,
        options=options,
    )

    async def still_ours() -> None:
        """Once the backend is drained: the medium the overlay was made for is still the
        one it serves (another snapshot or change may have switched it meanwhile)."""
        if backend.root_node() is not root:
            raise BlockError(
                errno.EBUSY,
                f"snapshot: {backend.name}'s medium changed while "
                f"{overlay} was made; nothing was switched",
            )

    try:
        await backend.change(
            {
                "driver": "qcow2",
                "read-only": backend.read_only,
                "file": {"driver": "file", "filename": overlay},
                "backing": root.name,
            },
            same_data=True,
            before_swap=still_ours,
        )
    except BaseException:
        os.unlink(overlay)
        raise
    log.info("%s: snapshot: new overlay %s over %s", backend.name, overlay, image)
    if not active.read_only:
        try:
            await layer.reopen_node(active.name, {"read-only": True})
        except BlockError as exc:  # it stays writable; nothing writes it but the overlay's
            log.warning("%s: snapshot: %s stays writable: %s", backend.name, image, exc)


async def snapshot_onto(layer: BlockLayer, backend: BlockBackend, overlay_name: str) -> None:
    """Make the node ``overlay_name``, an unused qcow2 node without backing file (QEMU's
    blockdev-snapshot), the backend's active image over its medium. Its header is made to
    name the image now active (QEMU leaves it as it is), so that the image file opens alone
    later; if the switch fails, the overlay gets its old header and no backing file again."""
    overlay = layer.find_node(overlay_name)
    backend.check_op("snapshot it")
    root = backend.root_node()
    active = chain(backend)[0]
    what = f"snapshot: overlay '{overlay.name}'"
    if overlay.driver.name != "qcow2":
        raise BlockError(
            errno.EINVAL, f"{what} is a {overlay.driver.name} node; blkfs puts qcow2 overlays only"
        )
    if overlay.read_only and not backend.read_only:
        raise BlockError(errno.EROFS, f"{what} is read-only")
    claims = layer.registry("snapshot-overlays")  # two snapshots onto one overlay
    if overlay.parents or overlay in layer.subtree(root) or overlay.name in claims:
        raise BlockError(errno.EBUSY, f"{what} is already in use")
    if "backing" in overlay.children:
        raise BlockError(
            errno.EINVAL, f"{what} already has a backing image (add it with backing=null)"
        )
    if overlay.size != backend.length():
        raise BlockError(
            errno.EINVAL,
            f"{what} has {overlay.size} bytes, {backend.name} "
            f"{backend.length()}: they must be the same size",
        )
    image = _backing_file(backend, active)
    info = overlay.driver.info()
    previous = (
        (info["backing-filename"], info["backing-format"]) if info.get("backing-filename") else None
    )

    async def still_ours() -> None:
        if backend.root_node() is not root:
            raise BlockError(
                errno.EBUSY,
                f"snapshot: {backend.name}'s medium changed meanwhile; nothing was switched",
            )

    claims[overlay.name] = backend
    try:
        await layer.set_backing(
            overlay, root, (header_name(overlay.filename(), image), active.driver.name)
        )
        try:
            await backend.change({"node": overlay.name}, same_data=True, before_swap=still_ours)
        except BaseException:
            with trio.CancelScope(shield=True):
                await layer.set_backing(overlay, None, previous)
            raise
    finally:
        del claims[overlay.name]
    log.info("%s: snapshot: overlay node %s over %s", backend.name, overlay.name, image)


async def rollback(backend: BlockBackend, force: bool = False) -> None:
    """Empty the active overlay: the backend shows what it showed at the last snapshot.
    Refused while a user writes (a mounted filesystem's cache would no longer match its
    disk) unless ``force``."""

    async def empty() -> None:  # the chain as it is once drained (a snapshot may just end)
        layers = chain(backend)
        if len(layers) == 1:
            raise BlockError(
                errno.EINVAL,
                f"rollback: {backend.name}'s image "
                f"'{layers[0].filename()}' has no backing file to "
                "go back to",
            )
        if layers[0].read_only:
            raise BlockError(
                errno.EROFS,
                f"rollback: {backend.name}'s image '{layers[0].filename()}' is read-only",
            )
        await layers[0].driver.make_empty()
        log.info("%s: rolled back to %s", backend.name, layers[1].filename())

    await backend.rewind(empty, force)
