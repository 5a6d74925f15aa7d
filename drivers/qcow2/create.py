"""Making a new qcow2 image, as ``qemu-img create -f qcow2`` does.

A new image holds the header (with extensions and the backing file name) in cluster 0, then
the refcount table, the refcount blocks that count every metadata cluster, and the L1 table.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from typing import BinaryIO, TypeVar

from blkfs.block import BlockError
from blkfs.block.options import parse_bool, parse_size

from .mapping import Geometry
from .ondisk import (
    COMPRESSION_NAMES,
    INCOMPAT_COMPRESSION,
    INCOMPAT_EXTL2,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    V2_HEADER_LENGTH,
    V3_HEADER_LENGTH,
    Header,
    encode_entry,
    refcount_entries,
    set_refcount,
)

T = TypeVar("T")
CREATE_OPTIONS = ("cluster_size", "compat", "compression_type", "extended_l2", "refcount_bits")


def invalid(message: str) -> BlockError:
    return BlockError(errno.EINVAL, f"qcow2: {message}")


def _parse_int(raw: str) -> int:
    if not raw.strip().isdigit():
        raise ValueError("must be a whole number")
    return int(raw)


def _parsed(options: Mapping[str, str], name: str, default: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(options.get(name, default))
    except (TypeError, ValueError) as exc:
        raise invalid(f"{name} {exc} (got {options[name]!r})") from None


def build_header(
    size: int, options: Mapping[str, str], backing: str | None, backing_fmt: str | None
) -> Header:
    """A header for a new image from qemu-img style ``-o`` options; EINVAL names the fault."""
    unknown = set(options) - set(CREATE_OPTIONS)
    if unknown:
        raise invalid(
            f"unknown option(s) {', '.join(sorted(unknown))} (known: {', '.join(CREATE_OPTIONS)})"
        )
    cluster_size = _parsed(options, "cluster_size", "64k", parse_size)
    refcount_bits = _parsed(options, "refcount_bits", "16", _parse_int)
    extended_l2 = _parsed(options, "extended_l2", "off", parse_bool)
    cluster_bits = cluster_size.bit_length() - 1
    if (
        cluster_size <= 0
        or cluster_size != 1 << cluster_bits
        or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS
    ):
        raise invalid(f"cluster_size must be a power of two from 512 to 2M (got {cluster_size})")
    if refcount_bits not in (1, 2, 4, 8, 16, 32, 64):
        raise invalid(f"refcount_bits must be a power of two up to 64 (got {refcount_bits})")
    compat = options.get("compat", "1.1")
    if compat not in ("1.1", "0.10", "v3", "v2"):
        raise invalid(f"compat must be 1.1 or 0.10 (got {compat})")
    version = 3 if compat in ("1.1", "v3") else 2
    compression = options.get("compression_type", "zlib")
    types = {name: number for number, name in COMPRESSION_NAMES.items()}
    if compression not in types:
        raise invalid(f"compression_type must be zlib or zstd (got {compression})")
    if version == 2 and (refcount_bits != 16 or extended_l2 or compression != "zlib"):
        raise invalid("compat=0.10 images have 16-bit refcounts, zlib and no extended L2")
    if extended_l2 and cluster_size < 16384:
        raise invalid("extended_l2 needs a cluster_size of at least 16k")
    incompatible = (INCOMPAT_EXTL2 if extended_l2 else 0) | (
        INCOMPAT_COMPRESSION if types[compression] else 0
    )
    header = Header(
        version=version,
        backing_file_offset=0,
        backing_file_size=0,
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=0,
        l1_table_offset=0,
        refcount_table_offset=0,
        refcount_table_clusters=0,
        nb_snapshots=0,
        snapshots_offset=0,
        incompatible_features=incompatible,
        refcount_order=refcount_bits.bit_length() - 1,
        header_length=V3_HEADER_LENGTH if version == 3 else V2_HEADER_LENGTH,
        compression_type=types[compression],
    )
    if backing is not None and len(backing.encode()) > MAX_BACKING_NAME:
        raise invalid(f"the backing file name is longer than {MAX_BACKING_NAME} bytes")
    header.set_backing(backing, backing_fmt)
    if header.pack_cluster() is None:
        raise invalid("the backing file name does not fit in the first cluster")
    return header


def empty_image(header: Header) -> bytes:
    """Every metadata cluster of a new, empty image, cluster 0 first."""
    cluster = header.cluster_size
    geometry = Geometry(header.cluster_bits, header.extended_l2)
    header.l1_size = geometry.l1_size_for(header.size)
    l1_clusters = -(-header.l1_size * 8 // cluster)  # none for a zero-size image, as QEMU
    per_block = refcount_entries(header.cluster_bits, header.refcount_order)
    table_clusters, blocks = 1, 1
    while True:  # the refcount structures count themselves: iterate to a fixed point
        total = 1 + table_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cluster)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    header.refcount_table_offset = cluster
    header.refcount_table_clusters = table_clusters
    first_block = 1 + table_clusters
    header.l1_table_offset = (first_block + blocks) * cluster if l1_clusters else 0
    image = bytearray(total * cluster)
    head = header.pack()
    image[: len(head)] = head
    for i in range(blocks):
        entry = (first_block + i) * cluster
        image[cluster + 8 * i : cluster + 8 * i + 8] = encode_entry(entry)
    refcounts = bytearray(blocks * cluster)
    for cluster_index in range(total):
        block, index = divmod(cluster_index, per_block)
        view = memoryview(refcounts)[block * cluster : (block + 1) * cluster]
        set_refcount(view, index, header.refcount_order, 1)
    image[first_block * cluster : (first_block + blocks) * cluster] = refcounts
    return bytes(image)


def write_image(
    file: BinaryIO,
    size: int,
    options: Mapping[str, str],
    backing: str | None,
    backing_format: str | None,
) -> None:
    """Lay out a new empty qcow2 image in ``file``."""
    if size % 512:
        raise invalid(f"the virtual size must be a multiple of 512 bytes (got {size})")
    file.write(empty_image(build_header(size, options, backing, backing_format)))


__all__ = ["CREATE_OPTIONS", "write_image"]
