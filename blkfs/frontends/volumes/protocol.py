"""Docker's volume plugin protocol, and blkfs's verbs beside it, without I/O: a request's
path and JSON body in, a status and a JSON reply out.

Docker POSTs ``/Plugin.Activate`` first, then ``/VolumeDriver.*`` with a JSON object; a
reply carries ``Err`` ("" or the reason), and a failure also answers with status 500 (the
plugin helpers Docker's own examples use do so). ``/BlkfsVolume.*`` are blkfs's verbs, sent
by ``blkfs volume``; Docker never calls them.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from typing import Any

from blkfs.errors import BlockError

from .volumes import Volumes

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
Handler = Callable[[Volumes, dict[str, Any]], dict[str, Any]]


def _name(body: dict[str, Any], field: str = "Name") -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise BlockError(errno.EINVAL, f"{field}: a volume name is needed")
    return value


def _opts(body: dict[str, Any]) -> dict[str, str]:
    opts = body.get("Opts") or {}
    if not isinstance(opts, dict):
        raise BlockError(errno.EINVAL, "Opts: an object of strings is needed")
    return opts


def _mount_id(body: dict[str, Any]) -> str:
    value = body.get("ID")
    if not isinstance(value, str) or not value:
        raise BlockError(errno.EINVAL, "ID: a mount ID is needed")
    return value


def _create(v: Volumes, b: dict[str, Any]) -> dict[str, Any]:
    v.create(_name(b), _opts(b))
    return {}


def _remove(v: Volumes, b: dict[str, Any]) -> dict[str, Any]:
    v.remove(_name(b))
    return {}


def _unmount(v: Volumes, b: dict[str, Any]) -> dict[str, Any]:
    v.unmount(_name(b), _mount_id(b))
    return {}


def _rollback(v: Volumes, b: dict[str, Any]) -> dict[str, Any]:
    v.rollback(_name(b), remount=b.get("Remount") is True)
    return {}


def _commit(v: Volumes, b: dict[str, Any]) -> dict[str, Any]:
    v.commit(_name(b))
    return {}


def _clone(v: Volumes, b: dict[str, Any]) -> dict[str, Any]:
    v.clone(_name(b, "Source"), _name(b), _opts(b))
    return {}


ENDPOINTS: dict[str, Handler] = {
    "/Plugin.Activate": lambda v, b: {"Implements": ["VolumeDriver"]},
    "/VolumeDriver.Capabilities": lambda v, b: {"Capabilities": {"Scope": "local"}},
    "/VolumeDriver.Create": _create,
    "/VolumeDriver.Remove": _remove,
    "/VolumeDriver.Mount": lambda v, b: {"Mountpoint": v.mount(_name(b), _mount_id(b))},
    "/VolumeDriver.Unmount": _unmount,
    "/VolumeDriver.Path": lambda v, b: {"Mountpoint": v.path(_name(b))},
    "/VolumeDriver.Get": lambda v, b: {"Volume": v.get(_name(b))},
    "/VolumeDriver.List": lambda v, b: {"Volumes": v.listed()},
    "/BlkfsVolume.Snapshot": lambda v, b: {"Snapshot": v.snapshot(_name(b))},
    "/BlkfsVolume.Rollback": _rollback,
    "/BlkfsVolume.Commit": _commit,
    "/BlkfsVolume.Clone": _clone,
    "/BlkfsVolume.Inspect": lambda v, b: {"Volume": v.inspect(_name(b))},
}
"""Each endpoint's handler: the reply's fields besides ``Err``."""


def handle(volumes: Volumes, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """The status and reply for one request; a failed operation's reply names why."""
    handler = ENDPOINTS.get(path)
    if handler is None:
        return 404, {"Err": f"{path}: no such endpoint"}
    try:
        request = json.loads(body) if body.strip() else None
    except (ValueError, UnicodeDecodeError):
        return 400, {"Err": f"{path}: the body is not JSON"}
    if request is None:
        request = {}  # Docker sends null to the endpoints that take nothing
    if not isinstance(request, dict):
        return 400, {"Err": f"{path}: the body must be a JSON object"}
    try:
        return 200, {**handler(volumes, request), "Err": ""}
    except BlockError as exc:
        return 500, {"Err": str(exc), "Errno": exc.errno}
