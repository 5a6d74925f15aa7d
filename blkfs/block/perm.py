"""Permissions between nodes, as QEMU 7.2 computes them (block.c, ``bdrv_default_perms``).

Every edge (a parent's use of a node) says what the parent needs (``perm``) and what it lets
other users of the node do (``shared``). A node's cumulative permissions are the union of its
parents' needs and the intersection of what they share; two edges on one node conflict when
one needs what the other does not share. What a node needs of a child follows from the role
the child plays (:class:`Role`): a filter passes its parents' needs through, a format needs
to write its image file while it is writable and lets nobody else write it, a backing file
is only read, and written by nobody while anyone reads the overlay (QEMU shares write on a
backing file whenever the overlay's users do, though a writer below still changes what they
read: here only a commit's filter, which needs no consistent read, lets its job write the
base). The host file locks (:mod:`blkfs_drivers.image_lock`) are a file node's cumulative
permissions, so that QEMU's tools and blkfs see each other's use of an image.

Everything here is a function of values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Flag


class Perm(Flag):
    """QEMU's BLK_PERM_* bits (same values: they number the lock bytes)."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


NO_PERM = Perm(0)
ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
WRITERS = Perm.WRITE | Perm.WRITE_UNCHANGED
"""Permissions that need a writable node."""
RW = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
"""What a writer of a whole disk needs: a backend with a writable medium."""

PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}


class Role(Flag):
    """What a child is to its parent (QEMU's BDRV_CHILD_*)."""

    DATA = 0x01
    METADATA = 0x02
    FILTERED = 0x04
    COW = 0x08
    PRIMARY = 0x10


IMAGE = Role.DATA | Role.METADATA | Role.PRIMARY
"""A format's image file: its data and its metadata."""
FILTERED = Role.FILTERED | Role.PRIMARY
"""What a filter (or raw without offset/size) passes requests to unchanged."""


def root_perms(read_only: bool) -> tuple[Perm, Perm]:
    """What a backend needs of its medium's root, and what it shares. A writable backend is
    a disk with one writer, as a VM's disk is in QEMU (no share-rw): nobody else may write
    its image. A read-only one shares everything, so a CD can be read by many.
    (qemu-storage-daemon's FUSE export shares write too.)"""
    if read_only:
        return Perm.CONSISTENT_READ, ALL
    return RW, ALL & ~Perm.WRITE


@dataclass(frozen=True)
class Use:
    """One edge's permissions, as :func:`conflict` compares them."""

    perm: Perm
    shared: Perm
    who: str
    """Says who the user is, for messages: "backend 'disk0'" or "node 'top' (as 'file')"."""


def names(perm: Perm) -> str:
    return ", ".join(name for bit, name in PERM_NAMES.items() if bit in perm)


def child_perm(role: Role, writable: bool, perm: Perm, shared: Perm) -> tuple[Perm, Perm]:
    """What a node with cumulative ``perm`` and ``shared`` needs of and shares on a child in
    ``role``; ``writable`` is whether the node itself is open for writing (reference:
    bdrv_default_perms, bdrv_default_perms_for_cow, bdrv_default_perms_for_storage)."""
    if Role.FILTERED in role:
        return perm & ALL, shared & ALL
    if Role.COW in role:  # what an overlay's readers read, a write below would change
        changes = Perm.WRITE in shared and Perm.CONSISTENT_READ not in perm
        return (
            perm & Perm.CONSISTENT_READ,
            (Perm.WRITE | Perm.RESIZE if changes else NO_PERM)
            | Perm.CONSISTENT_READ
            | Perm.WRITE_UNCHANGED,
        )
    if Role.METADATA in role:
        if writable:  # a format writes its metadata even when no parent writes
            perm |= Perm.WRITE | Perm.RESIZE
        perm |= Perm.CONSISTENT_READ
        shared &= ~(Perm.WRITE | Perm.RESIZE)
    if Role.DATA in role:
        shared &= ~Perm.RESIZE
        if Perm.WRITE_UNCHANGED in perm:
            perm |= Perm.WRITE
        if Perm.WRITE in perm:
            perm |= Perm.RESIZE
    return perm, shared


def cumulative(uses: Iterable[Use]) -> tuple[Perm, Perm]:
    """The union of what the uses need and the intersection of what they share."""
    perm, shared = NO_PERM, ALL
    for use in uses:
        perm |= use.perm
        shared &= use.shared
    return perm, shared


FEW_USES = 8


def conflict(uses: list[Use]) -> str | None:
    """Why these uses of one node cannot coexist, or None."""
    pair = conflicting(uses)
    if pair is None:
        return None
    a, b = pair
    return (
        f"permissions '{names(a.perm & ~b.shared)}' are both required by {a.who} and "
        f"unshared by {b.who}"
    )


def conflicting(uses: list[Use]) -> tuple[Use, Use] | None:
    """The first use that needs what another does not share, and that other; None if the
    uses can coexist (reference: bdrv_a_allow_b).

    A base shared by a thousand overlays has a thousand uses: whether any two of many
    conflict is found per permission in one pass; only then are the pairs searched (a few
    uses are cheaper to compare pairwise at once)."""
    if len(uses) > FEW_USES and not any(_conflicting(uses, perm) for perm in Perm):
        return None
    for a in uses:
        for b in uses:
            if a is not b and a.perm & ~b.shared:
                return a, b
    return None


def _conflicting(uses: list[Use], perm: Perm) -> bool:
    """Whether one use needs ``perm`` and another does not share it."""
    needing = [use for use in uses if perm in use.perm]
    if not needing:
        return False
    refusing = [use for use in uses if perm not in use.shared]
    return bool(refusing) and (
        len(needing) > 1 or len(refusing) > 1 or needing[0] is not refusing[0]
    )
