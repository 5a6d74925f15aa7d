"""The qcow2 format driver: its declaration, open, reopen and close; its requests (reads,
in-place and allocating writes, zeroing, discard, growth, block status) are the classes it
builds on (:mod:`.mapped`, :mod:`.writes`, :mod:`.image_changes`).

Ground rules:

* Mapping is pure (:mod:`blkfs_drivers.qcow2.mapping`), clusters and refcounts come from the
  allocator (:mod:`blkfs_drivers.qcow2.refcount`), and metadata reaches the image through the
  metadata cache in the order :mod:`blkfs_drivers.qcow2.metadata` declares. So a crash (or kill -9)
  at any point leaves at worst leaked clusters, never a reference to a cluster without a
  refcount, and guest data is durable before the L2 entry that points to it.
* One metadata lock per image serialises mapping changes. Reads and in-place writes map from
  cached L2 tables without it (no await, so nothing interleaves) and take it only to load a
  table; either way they hold it only while mapping, never during data I/O.
* A freed cluster's space goes back to the host, and the cluster to the allocator for
  reuse, only after a write-back made its freeing durable and while no request that maps
  without the lock is in flight: a read or an in-place write may have mapped the cluster
  just before it was dropped.
* These paths are the hot ones: reads and in-place writes keep per-cluster values in locals
  and make no objects but the mappings they return.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import trio

from blkfs.block import (
    IMAGE,
    BlockError,
    Child,
    ChildSpec,
    Option,
    Role,
)
from blkfs.block.options import RBD_PREFIX, nbd_uri, rbd_filename

from .allocations import Allocations
from .backing_map import BackingMap
from .bitmap_directory import MAX_BITMAPS, MAX_GRANULARITY_BITS
from .bitmap_store import BitmapStore
from .check import check_child, repair_on_open
from .create import write_image
from .image_changes import ImageChanges
from .imagefile import ChildFile, read_header
from .metadata import Metadata
from .ondisk import (
    COMPRESSION_NAMES,
    MAGIC,
    feature_list,
)

DEFAULT_CACHE = 8 << 20


class Qcow2Driver(ImageChanges):
    name = "qcow2"
    is_format = True
    options = {
        "l2-cache-size": Option("size", DEFAULT_CACHE, "memory for cached L2 tables"),
        "refcount-cache-size": Option(
            "size", DEFAULT_CACHE // 4, "memory for cached refcount blocks"
        ),
        "repair": Option(
            "enum",
            "off",
            "check the image at a writable open and repair "
            "leaked clusters (refusing a corrupt image)",
            choices=("off", "leaks"),
        ),
    }
    children = {
        "file": ChildSpec(help="the image file", role=IMAGE),
        "backing": ChildSpec(
            required=False,
            auto=False,
            role=Role.COW,
            help="the backing image (default: as the header names it; null for none)",
        ),
    }

    @classmethod
    def probe(cls, header: bytes, filename: str) -> int:
        return 100 if header[:4] == MAGIC else 0

    @classmethod
    def create(
        cls,
        file: BinaryIO,
        size: int,
        options: Mapping[str, str],
        backing: str | None,
        backing_format: str | None,
    ) -> None:
        write_image(file, size, options, backing, backing_format)

    @classmethod
    async def check(cls, file: Child, repair: bool) -> dict[str, Any]:
        return await check_child(file, repair)

    # -- open and close ---------------------------------------------------------------------

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.file = self.child("file")
        self.lock = trio.Lock()
        self.in_flight = 0
        """Reads, writes and allocations in flight (and direct reads of overlays through this
        image, see BackingMap): each may have mapped a cluster that has since been dropped,
        so freed clusters are punched and reused only while there are none."""
        self.allocations = Allocations()
        self.backing_size = 0
        self.below = BackingMap(Qcow2Driver)
        """Where the backing chain holds the clusters this image leaves to it."""
        self._location_watchers: set[Callable[[], None]] = set()
        await self._load(not self.node.read_only, values)
        await self._load_bitmaps(not self.node.read_only)
        if "backing" in children:  # the user's choice: options, a node name, or None
            await self._open_backing(children["backing"])
        elif self.header.backing_file:
            await self._open_backing(self._backing_options(self.header.backing_file))

    async def _load(self, writable: bool, values: Mapping[str, Any]) -> None:
        """The image's metadata (at open, and when a read-only node turns writable: another
        program may have written the image meanwhile); with ``repair=leaks``, a writable
        open checks the image first (QEMU checks only with its repair option as well)."""
        metadata = await Metadata.load(
            ChildFile(self.file), writable, values["l2-cache-size"], values["refcount-cache-size"]
        )
        if writable and values["repair"] == "leaks":
            await repair_on_open(self.file)
        self._locations_changed()  # another program may have changed the image meanwhile
        self.metadata = metadata
        self.header = metadata.header
        self.geometry = metadata.geometry
        self.cluster_size = metadata.header.cluster_size
        self.discard_granularity = self.cluster_size  # discard frees whole clusters only
        self.allocator = metadata.allocator
        self.l1_table = metadata.l1_table
        self.l1 = metadata.l1_table.entries
        self.l2_tables = metadata.l2_tables
        self.l2_cache = metadata.l2_tables.tables

    async def _load_bitmaps(self, writable: bool) -> None:
        """The image's persistent bitmaps onto the node (replacing those loaded before), in
        use on disk from now if the image is open writable (see :mod:`.bitmap_store`)."""
        self.bitmap_store = BitmapStore(self.metadata)
        loaded = await self.bitmap_store.load(self.header.size)
        for bitmap in self.node.bitmaps:
            if bitmap.persistent:
                self.node.bitmaps.remove(bitmap.name)
        for bitmap in loaded:
            self.node.bitmaps.add(bitmap)
        if writable:
            await self.bitmap_store.mark_in_use()

    def check_new_bitmap(self, name: str, granularity: int) -> None:
        if self.header.version < 3:
            raise BlockError(errno.ENOTSUP, "qcow2: persistent bitmaps need a compat=1.1 image")
        if sum(b.persistent for b in self.node.bitmaps) >= MAX_BITMAPS:
            raise BlockError(errno.ENOSPC, f"qcow2: at most {MAX_BITMAPS} bitmaps")
        if granularity > 1 << MAX_GRANULARITY_BITS:
            raise BlockError(errno.EINVAL, "qcow2: a bitmap's granularity is at most 2 GiB")

    async def remove_stored_bitmap(self, name: str) -> None:
        """The directory stored again without it, the others still in use."""
        if not any(stored.name == name for stored in self.bitmap_store.stored):
            return  # added since the open: not in the image yet
        async with self.lock:
            others = [bitmap for bitmap in self.node.bitmaps if bitmap.name != name]
            await self.bitmap_store.store(others, self._write_back, in_use=True)

    async def _store_bitmaps(self) -> None:
        """The node's persistent bitmaps into the image, their in-use flags cleared (lock
        held; before the image turns read-only or closes)."""
        await self.bitmap_store.store(self.node.bitmaps, self._write_back)

    async def _open_backing(self, backing: dict[str, Any] | str | None) -> None:
        if backing is None:
            return
        edge = await self.node.open_child("backing", backing, Role.COW)
        self.backing_size = edge.node.size

    def _backing_options(self, name: str) -> dict[str, Any]:
        """Options for the backing file the header names: relative to the overlay's
        directory, read-only, through the graph (so --image-dir applies), format from the
        header extension or probed; with the image file's cache.direct, as QEMU's backing
        files inherit it. An NBD URI names an nbd node and an ``rbd:`` name an rbd node, as
        in QEMU, which the mount's network policy (--allow-nbd with --image-dir, no cluster
        under --image-dir) admits or refuses."""
        if name.startswith(RBD_PREFIX):  # a base image in a Ceph cluster, as QEMU allows
            fmt = self.header.backing_format or "raw"
            return {"file": rbd_filename(name), "read-only": True, "driver": fmt}
        file = nbd_uri(name)
        if file is None:
            base = self.file.node.filename()
            if base and not os.path.isabs(name):
                name = os.path.join(os.path.dirname(base), name)
            file = {"driver": "file", "filename": name}
            if self.file.node.values.get("cache.direct"):
                file["cache.direct"] = True
        options: dict[str, Any] = {"file": file, "read-only": True}
        if self.header.backing_format:
            options["driver"] = self.header.backing_format
        return options

    async def reopen(self, values: Mapping[str, Any]) -> None:
        """Cache sizes stay; read-only may change: writing back first when it turns on,
        loading the image as a writable open does when it turns off. The image must still be
        the one this node describes (same geometry and backing file)."""
        await super().reopen(values)
        if values["read-only"] == self.node.read_only:
            return
        async with self.lock:
            if values["read-only"]:
                await self._store_bitmaps()
                await self._write_back()
                return
            old = self.header
            new, _ = await read_header(self.metadata.file)
            if (new.cluster_bits, new.extended_l2, new.backing_file, new.size) != (
                old.cluster_bits,
                old.extended_l2,
                old.backing_file,
                old.size,
            ):
                raise BlockError(
                    errno.EBUSY,
                    "qcow2: the image was changed by another "
                    "program while read-only here; change the "
                    "medium to use it writable",
                )
            await self._load(True, values)
            await self._load_bitmaps(True)

    async def close(self) -> None:
        self.below.clear()
        self._locations_changed()
        if not self.node.read_only:
            async with self.lock:
                await self._store_bitmaps()
                await self._write_back()

    async def length(self) -> int:
        """The image's size; asked again when sizes are refreshed (children first), which
        is when a backing node that changed size since is noted, so that reads past its
        old end see what it holds now (QEMU's qcow2 asks bdrv_getlength of its backing)."""
        if self._backing_length() != self.backing_size:
            self.children_changed()
        return self.header.size

    def children_changed(self) -> None:
        self.backing_size = self._backing_length()
        self.below.clear()
        self._locations_changed()

    def _backing_length(self) -> int:
        backing = self.node.children.get("backing")
        return backing.node.size if backing is not None else 0

    def info(self) -> dict[str, Any]:
        header = self.header
        return {
            "compat": "1.1" if header.version >= 3 else "0.10",
            "cluster-size": header.cluster_size,
            "refcount-bits": header.refcount_bits,
            "compression-type": COMPRESSION_NAMES[header.compression_type],
            "extended-l2": header.extended_l2,
            "backing-filename": header.backing_file,
            "backing-format": header.backing_format,
            "features": feature_list(header),
        }
