"""What the backend API reports, as typed shapes: a backend's status, a node tree, a job, an
NBD export, and the daemon's status that holds them.

Ground rules: each shape is declared once, here, with the keys its producer writes (QMP's
spelling, ``-`` between words) and what ``.ctl/status.json`` and ``.ctl/jobs.json`` show; the
frontends and the command line read them through these types, so that a key misspelt or
gone is a type error, not a ``KeyError`` in a user's terminal. Plain data only (JSON in,
JSON out); this module imports nothing of blkfs, so frontends may import it.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

Counters = dict[str, int]
"""Request statistics, flat: ``read_ops``, ``read_bytes``, ``read_ns``, ..., ``errors``."""


class PauseInfo(TypedDict):
    operation: str
    node: str
    offset: int | None
    errno: str
    message: str
    since: float
    reason: str


"""Why a backend's error policy paused it (``stop``), until ``cont``."""

NodeTree = TypedDict(
    "NodeTree",
    {
        "node-name": str,
        "driver": str,
        "read-only": bool,
        "size": int,
        "options": dict[str, Any],
        "info": dict[str, Any],
        "stats": Counters,
        "dirty-bitmaps": list[dict[str, object]],
        "in-flight": int,
        "oldest-ms": int | None,
        "children": dict[str, "NodeTree"],
    },
)
"""A node and its subtree: the options it was given, its driver's own report (``info``:
each driver's keys, such as a throttle's ``limits``), its dirty bitmaps (as QEMU's
BlockDirtyInfo), its children by role."""

PassthroughStatus = TypedDict("PassthroughStatus", {"on": bool, "open": int, "why-not": str | None})
"""Kernel passthrough (``passthrough=on``): files open with it now, and why new opens are
not served by it (None: they are; the frontend may have reasons of its own)."""

BackendStatus = TypedDict(
    "BackendStatus",
    {
        "name": str,
        "deleted": bool,
        "medium": bool,
        "read-only": bool,
        "size": int,
        "allocated": int | None,
        "open": int,
        "writers": int,
        "generation": int,
        "on-change": str,
        "werror": str,
        "rerror": str,
        "passthrough": PassthroughStatus,
        "io-status": str,
        "paused": PauseInfo | None,
        "stats": Counters,
        "tree": NodeTree | None,
    },
)
"""A backend: its medium (``tree``, None with none), its users, its error policies."""

JobInfo = TypedDict(
    "JobInfo",
    {
        "id": str,
        "type": str,
        "device": str,
        "status": str,
        "current-progress": int,
        "total-progress": int,
        "speed": int,
        "error": str | None,
        "ready": bool,
    },
)
"""A block job, with QMP's names (query-jobs): ``device`` is its backend's name."""

ClientStatus = TypedDict("ClientStatus", {"peer": str, "since": int, "in-flight": int, "tls": bool})
"""An NBD client of an export; ``tls``: it talks over TLS."""


class ExportStatus(TypedDict):
    """An NBD export: where it is offered, its clients and counters; ``retired`` once
    withdrawn while clients remain."""

    name: str
    backend: str
    writable: bool
    bitmap: NotRequired[str]
    """The dirty bitmap served as ``qemu:dirty-bitmap:NAME``, if one is."""
    address: str
    tls: bool
    """Its listener requires TLS."""
    retired: bool
    clients: list[ClientStatus]
    stats: Counters


DaemonStatus = TypedDict(
    "DaemonStatus",
    {
        "pid": int,
        "image-dirs": tuple[str, ...] | list[str] | None,
        "backends": list[BackendStatus],
        "nodes": list[NodeTree],
        "exports": list[ExportStatus],
    },
)
"""``query-status``: the daemon, every backend (deleted ones still open too), the nodes
added on their own, the NBD exports."""
