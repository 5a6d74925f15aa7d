"""Creating and inspecting image files (``blkfs image``), with no mount and no QEMU.

All go through the same graph and drivers as a mount does: ``create`` asks the format
driver to lay out the new file, ``info`` opens the image read-only (sharing QEMU's image
locks) and describes each layer of its backing chain, ``check`` hands the image file to its
format driver's checker (read-only, or holding the write lock to repair).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

from blkfs.block.graph import Graph
from blkfs.block.node import Node
from blkfs.block.options import RBD_PREFIX, parse_options, parse_size, validate
from blkfs.block.perm import ALL, IMAGE, Perm
from blkfs.errors import BlockError

__all__ = ["check_image", "create_image", "image_info"]


async def create_image(
    filename: str,
    fmt: str,
    size: int | str | None = None,
    *,
    backing: str | None = None,
    backing_format: str | None = None,
    options: Mapping[str, str] | None = None,
) -> None:
    """Create a new image; never replaces an existing file.

    ``backing`` is named as it will be stored (relative names are relative to the new image's
    directory, as QEMU resolves them). Its format is probed if not given and then recorded,
    and it gives the size if ``size`` is None.
    """
    graph = Graph()
    if is_volume_name(filename):
        await _create_volume(graph, filename, fmt, size, backing, options)
        return
    if fmt not in format_names(graph):
        raise BlockError(
            errno.EINVAL,
            f"'{fmt}' is not an image format blkfs can create "
            f"(formats: {', '.join(format_names(graph))})",
        )
    cls = graph.drivers.get(fmt)
    if backing is not None:
        backing_format, backing_size = await _inspect_backing(
            graph, filename, backing, backing_format
        )
        size = backing_size if size is None else size
    length = _bytes(size, "a size is needed (or a backing file to take it from)")
    try:
        file = open(filename, "xb")  # noqa: SIM115 (closed below, and removed on failure)
    except FileExistsError:
        raise BlockError(
            errno.EEXIST, f"{filename} exists; blkfs never overwrites an image (remove it first)"
        ) from None
    except OSError as exc:
        raise BlockError(
            exc.errno or errno.EIO, f"cannot create {filename}: {exc.strerror}"
        ) from None
    try:
        with file:
            cls.create(file, length, dict(options or {}), backing, backing_format)
            file.flush()
            os.fsync(file.fileno())
        _fsync_directory(filename)  # the new name survives a power cut too
    except BaseException:
        os.unlink(filename)
        raise


async def _create_volume(
    graph: Graph,
    name: str,
    fmt: str,
    size: int | str | None,
    backing: str | None,
    options: Mapping[str, str] | None,
) -> None:
    """A raw volume in a storage service (an ``rbd:`` image), made by its protocol driver."""
    if fmt != "raw" or backing is not None or options:
        raise BlockError(
            errno.EINVAL, f"{name}: only raw volumes without options or backing file are made"
        )
    length = _bytes(size, "a size is needed")
    tree = parse_options(name)
    cls = graph.drivers.get(tree["driver"])
    values = validate(cls.name, cls.options, cls.children, tree).values
    await cls.create_volume(values, length)


def _bytes(size: int | str | None, missing: str) -> int:
    """A new image's ``size`` in bytes; EINVAL saying ``missing`` if none is given."""
    if size is None:
        raise BlockError(errno.EINVAL, missing)
    try:
        return parse_size(size)
    except (TypeError, ValueError) as exc:
        raise BlockError(errno.EINVAL, f"size {size!r}: {exc}") from None


def is_volume_name(filename: str) -> bool:
    """Whether ``filename`` names a volume in a storage service (``rbd:POOL/IMAGE``)
    rather than a host file."""
    return filename.startswith(RBD_PREFIX)


def _fsync_directory(filename: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(filename)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def format_names(graph: Graph) -> list[str]:
    return sorted(cls.name for cls in graph.drivers.formats())


async def _inspect_backing(
    graph: Graph, filename: str, backing: str, backing_format: str | None
) -> tuple[str, int]:
    """The backing file's format and virtual size; it must open."""
    path = os.path.join(os.path.dirname(os.path.abspath(filename)), backing)  # noqa: ASYNC240 (no I/O)
    file_options: dict[str, Any] = (
        parse_options(backing) if is_volume_name(backing) else {"driver": "file", "filename": path}
    )
    tree: dict[str, Any] = {"file": file_options, "force-share": True}  # as qemu-img create:
    if backing_format:  # the backing file may be in use (the overlay goes on a live image)
        tree["driver"] = backing_format
    root = await graph.open_node(tree, read_only=True)
    try:
        return root.driver.name, root.size
    finally:
        await graph.unref(root)


async def set_backing_file(filename: str, backing: str | None, backing_format: str | None) -> None:
    """Name another backing file (or none) in the image's header, its data untouched
    (``qemu-img rebase -u``). The new backing file must open; its format is probed if not
    given, then recorded."""
    graph = Graph()
    if backing is not None:
        backing_format, _ = await _inspect_backing(graph, filename, backing, backing_format)
    root = await graph.open_node(
        {"file": {"driver": "file", "filename": filename}, "backing": None}
    )
    try:
        await root.driver.change_backing_file(backing, backing_format)
    finally:
        await graph.unref(root)


async def image_info(filename: str, force_share: bool = False) -> dict[str, Any]:
    """Format, sizes, format details and the backing chain of an image, as plain data.

    Opened read-only, as ``qemu-img info``: a format with metadata refuses to share write
    (EBUSY while another program writes it) unless ``force_share`` (``qemu-img info -U``),
    and then what it reports may be stale. A backing file that cannot be opened does not
    hide the image's own facts: its layer is reported with the error.
    """
    graph = Graph()
    if is_volume_name(filename):
        node = await graph.open_node({**parse_options(filename), "read-only": True})
        try:
            return {
                **await _describe_layer(node),
                "filename": filename,
                "format": "raw",
                "backing-chain": [],
            }
        finally:
            await graph.unref(node)
    file_node = await graph.open_node(
        {"driver": "file", "filename": filename, "read-only": True, "force-share": force_share}
    )
    try:
        fmt = await graph.probe(file_node)
        tree: dict[str, Any] = {
            "driver": fmt,
            "file": file_node.name,
            "read-only": True,
            "force-share": force_share,
        }
        backing_error = None
        try:
            root = await graph.open_node(tree)
        except BlockError as exc:
            if "backing" not in graph.drivers.get(fmt).children:
                raise
            backing_error = str(exc)
            root = await graph.open_node({**tree, "backing": None})
    finally:
        await graph.unref(file_node)
    try:
        chain = [await _describe_layer(root)]
        node = root
        while "backing" in node.children:
            node = node.children["backing"].node
            chain.append(await _describe_layer(node))
        if backing_error:
            chain.append({"error": backing_error})
        return {**chain[0], "backing-chain": chain[1:]}
    finally:
        await graph.unref(root)


async def _describe_layer(node: Node) -> dict[str, Any]:
    file = node.children.get("file")
    return {
        "filename": file.node.filename() if file else None,
        "format": node.driver.name,
        "virtual-size": node.size,
        "disk-size": await node.driver.allocated_bytes(),
        "format-specific": node.driver.info(),
    }


async def check_image(filename: str, repair: bool = False) -> dict[str, Any]:
    """Check an image's metadata (``qemu-img check``); with ``repair``, also lower leaked
    refcounts, which needs the image's write lock (EBUSY while a VM or a mount writes it).
    The format is probed; only the image itself is checked, never its backing file. ENOTSUP
    for a format without metadata (raw)."""
    graph = Graph()
    file_node = await graph.open_node(
        {"driver": "file", "filename": filename, "read-only": not repair}
    )
    try:
        fmt = await graph.probe(file_node)
        perm = Perm.CONSISTENT_READ | (Perm.WRITE | Perm.RESIZE if repair else Perm(0))
        edge = file_node.attach(
            None, "blkfs image check", "file", IMAGE, perm, ALL & ~(Perm.WRITE | Perm.RESIZE)
        )
        try:
            graph.refresh_perms([file_node])
            report = await graph.drivers.get(fmt).check(edge, repair)
        finally:
            file_node.detach(edge)
        return {"filename": filename, "format": fmt, **report}
    finally:
        await graph.unref(file_node)
