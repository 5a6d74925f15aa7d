"""QMP commands as translations onto the command layer: QEMU's names, arguments and reply
shapes in, blkfs commands out.

Ground rules: every QMP command here is a thin adapter, its behaviour that of a command of
:mod:`blkfs.commands`; arguments are checked against the command's declaration before
anything runs (QEMU's wording: "Parameter 'x' is missing"), and a failure is a
:class:`QmpError` with QEMU's error class. QEMU's model maps onto blkfs as README says: a node
from ``blockdev-add`` is held by the layer on its own (``node-add``); an export is a blkfs
backend (a file in the mount) made on a node, named by the export's id, and for type ``nbd``
also exported on the mount's NBD server; a "device" is a backend, named by itself or by its
root node's name.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from types import UnionType
from typing import Any, Literal, Protocol, Union, get_args, get_origin

from blkfs.backend import IoError
from blkfs.commands import (
    COMMANDS,
    BackendName,
    Commands,
    JobId,
    Kind,
    NodeName,
    Param,
    Size,
    parameter_of,
)
from blkfs.errors import BlockError, NotFound
from blkfs.info import Counters, DaemonStatus, JobInfo, NodeTree

VERSION = (0, 1, 0)
PACKAGE = "blkfs 0.1.0"


class QmpError(Exception):
    """A command failed: QEMU's error class and a description for people."""

    def __init__(self, klass: str, desc: str) -> None:
        super().__init__(desc)
        self.klass = klass
        self.desc = desc


def generic(desc: str) -> QmpError:
    return QmpError("GenericError", desc)


class Monitor(Protocol):
    """What a QMP command may reach besides the command layer."""

    commands: Commands
    mountpoint: str | None

    def emit(self, event: str, data: Mapping[str, Any]) -> None:
        """Send an event to every negotiated client."""


Handler = Callable[[Monitor, dict[str, Any]], Awaitable[Any]]
TYPES = {
    "str": (str, "string"),
    "int": (int, "integer"),
    "bool": (bool, "boolean"),
    "object": (dict, "object"),
    "array": (list, "array"),
}
"""QMP's JSON types: the Python type of each, and its name in QEMU's messages."""
NUMBERS = frozenset({Kind.SIZE, Kind.RATE, Kind.COUNT, Kind.BYTES})
OBJECTS = frozenset({Kind.MEDIUM, Kind.NODE_OPTIONS})


NewImageMode = Literal["existing", "absolute-paths"]
"""How drive-mirror and drive-backup find their target: made by blkfs, or there."""


@dataclass(frozen=True)
class Arg:
    """One argument of a QMP command: its type and checks are those of the command layer's
    parameter it feeds (or, for an argument only QMP has, of a parameter declared the way
    commands declare theirs); ``param`` None is a JSON array, which no command takes."""

    param: Param | None
    required: bool

    @property
    def type(self) -> str:
        """``str``, ``int``, ``bool``, ``object`` or ``array``."""
        if self.param is None:
            return "array"
        if self.param.kind in NUMBERS:
            return "int"
        if self.param.kind is Kind.FLAG:
            return "bool"
        return "object" if self.param.kind in OBJECTS else "str"

    def check(self, key: str, value: Any) -> None:
        """QEMU's checks of one value, in its words."""
        pytype, word = TYPES[self.type]
        if not isinstance(value, pytype) or (pytype is int and isinstance(value, bool)):
            raise generic(f"Invalid parameter type for '{key}', expected: {word}")
        kind = self.param.kind if self.param else None
        if isinstance(value, int) and kind in (Kind.SIZE, Kind.RATE, Kind.BYTES) and value < 0:
            raise generic(f"Parameter '{key}' expects a non-negative value")
        if isinstance(value, int) and kind is Kind.COUNT and value < 1:
            raise generic(f"Parameter '{key}' expects a positive value")
        if kind is Kind.CHOICE and self.param and value not in self.param.choices:
            raise generic(f"Parameter '{key}' does not accept value '{value}'")


@dataclass(frozen=True)
class QmpCommand:
    name: str
    args: Mapping[str, Arg] | None
    """Argument name -> its declaration; None: free-form (checked by the handler)."""
    handler: Handler


TABLE: dict[str, QmpCommand] = {}
"""Every QMP command blkfs answers, by name, but for the session's own: qmp_capabilities
and quit."""

Declared = str | Any
"""How a QMP command declares an argument: ``"PARAM"`` (``"PARAM?"``: optional), the
parameter of its command (``via``) the argument feeds, or ``"COMMAND.PARAM"`` of another
command; or, for an argument no command takes, a type as commands declare theirs
(``X | None``: optional; ``list``: a JSON array)."""


def qmp(
    name: str,
    via: str | None = None,
    /,
    *,
    free: bool = False,
    verbatim: Mapping[str, Declared] | None = None,
    **args: Declared,
) -> Callable[[Handler], Handler]:
    """Declare a QMP command that translates onto command ``via`` of the command layer,
    with its arguments (``_`` in keys for ``-``; ``verbatim`` keys as they are)."""
    named = {key.rstrip("_").replace("_", "-"): decl for key, decl in args.items()}
    spec = {key: _arg(via, key, decl) for key, decl in {**named, **(verbatim or {})}.items()}

    def declare(handler: Handler) -> Handler:
        TABLE[name] = QmpCommand(name, None if free else spec, handler)
        return handler

    return declare


def _arg(via: str | None, key: str, decl: Any) -> Arg:
    if isinstance(decl, str):
        ref = decl.removesuffix("?")
        command, _, param = ref.rpartition(".")
        return Arg(COMMANDS[command or str(via)].param(param), not decl.endswith("?"))
    optional = get_origin(decl) in (Union, UnionType) and type(None) in get_args(decl)
    if decl is list or (optional and list in get_args(decl)):
        return Arg(None, not optional)
    default = None if optional else inspect.Parameter.empty
    return Arg(parameter_of(key, decl, default), not optional)


def check_args(spec: Mapping[str, Arg], args: Mapping[str, Any]) -> None:
    """QEMU's argument checks, in its words."""
    for key in args:
        if key not in spec:
            raise generic(f"Parameter '{key}' is unexpected")
    for key, arg in spec.items():
        if key in args:
            arg.check(key, args[key])
        elif arg.required:
            raise generic(f"Parameter '{key}' is missing")


async def execute(monitor: Monitor, name: str, args: dict[str, Any]) -> Any:
    """Run QMP command ``name``; its return value, or QmpError."""
    command = TABLE.get(name)
    if command is None:
        raise QmpError("CommandNotFound", f"The command {name} has not been found")
    if command.args is not None:
        check_args(command.args, args)
    try:
        return await command.handler(monitor, args)
    except NotFound as exc:
        raise not_found(exc, args) from None
    except BlockError as exc:
        raise QmpError("GenericError", str(exc)) from None


def not_found(exc: NotFound, args: Mapping[str, Any]) -> QmpError:
    """QEMU's error for a name that names nothing: a backend is a device (DeviceNotFound);
    a job named as a device, as the block-job-* commands name it, is not active on it
    (DeviceNotActive, ``find_block_job``); a node, or a job by id, GenericError."""
    if exc.kind == "backend":
        return QmpError("DeviceNotFound", f"Device '{exc.name}' not found")
    if exc.kind == "job" and args.get("device") == exc.name:
        return QmpError("DeviceNotActive", f"Block job '{exc.name}' not found")
    return generic(str(exc))


async def run(monitor: Monitor, name: str, args: Mapping[str, Any]) -> Any:
    """Run a command of the command layer; arguments given as None are left out."""
    return await monitor.commands.run(name, {k: v for k, v in args.items() if v is not None})


async def status(monitor: Monitor) -> DaemonStatus:
    result: DaemonStatus = await run(monitor, "query-status", {})
    return result


async def jobs(monitor: Monitor) -> list[JobInfo]:
    result: list[JobInfo] = await run(monitor, "query-jobs", {})
    return result


def medium(tree: NodeTree) -> NodeTree:
    """The node under the throttle filter block_set_io_throttle put in, if any (QEMU
    throttles in the BlockBackend, so its device's node is the one below)."""
    while tree["driver"] == "throttle":
        tree = tree["children"]["file"]
    return tree


def backend_of(state: DaemonStatus, device: str, klass: str) -> str:
    """The backend a QMP "device" names: a backend's name, or its root node's name (under a
    throttle filter); QmpError of ``klass`` if none (QEMU says DeviceNotFound for devices,
    GenericError for nodes)."""
    live = [b for b in state["backends"] if not b["deleted"]]
    for backend in live:
        if backend["name"] == device:
            return backend["name"]
    for backend in live:
        tree = backend["tree"]
        if tree and device in (tree["node-name"], medium(tree)["node-name"]):
            return backend["name"]
    if klass == "DeviceNotFound":
        raise QmpError(klass, f"Device '{device}' not found")
    raise QmpError(klass, f"Cannot find device='{device}' nor node-name='{device}'")


async def device(
    monitor: Monitor, args: Mapping[str, Any], *keys: str, klass: str = "GenericError"
) -> str:
    """The backend named by the one of ``keys`` given."""
    given = [args[k] for k in keys if args.get(k) is not None]
    if len(given) != 1:
        raise generic(f"Need exactly one of {' and '.join(repr(k) for k in keys)}")
    return backend_of(await status(monitor), given[0], klass)


# -- describing nodes as QEMU does ------------------------------------------------------


def _filename(tree: NodeTree) -> str:
    for where in (tree["info"], tree["options"]):
        if isinstance(where.get("filename"), str):
            return str(where["filename"])
    for role in ("file", "data", *tree["children"]):
        if role in tree["children"]:
            return _filename(tree["children"][role])
    return ""


def image_info(tree: NodeTree) -> dict[str, Any]:
    """QEMU's ImageInfo, as far as blkfs knows it."""
    info: dict[str, Any] = {
        "filename": _filename(tree),
        "format": tree["driver"],
        "virtual-size": tree["size"],
        "dirty-flag": False,
    }
    if isinstance(tree["info"].get("cluster-size"), int):
        info["cluster-size"] = tree["info"]["cluster-size"]
    backing = tree["children"].get("backing")
    if backing is not None:
        info["backing-filename"] = _filename(backing)
        info["backing-image"] = image_info(backing)
    return info


def node_info(tree: NodeTree, limits: Mapping[str, float] | None = None) -> dict[str, Any]:
    """QEMU's BlockDeviceInfo of a node (query-named-block-nodes, query-block), with the
    ``limits`` of a throttle filter in front of it (its bps, iops fields)."""
    limits = limits or {}
    depth, node = 0, tree
    while "backing" in node["children"]:
        depth, node = depth + 1, node["children"]["backing"]
    return {
        "node-name": tree["node-name"],
        "drv": tree["driver"],
        "ro": tree["read-only"],
        "file": _filename(tree),
        "backing_file_depth": depth,
        "encrypted": False,
        "detect_zeroes": str(tree["options"].get("detect-zeroes", "off")),
        **{key: int(limits.get(limit, 0)) for key, limit in THROTTLE_LIMITS.items()},
        "write_threshold": 0,
        "cache": {"writeback": True, "direct": False, "no-flush": False},
        "image": image_info(tree),
        **({"dirty-bitmaps": tree["dirty-bitmaps"]} if tree["dirty-bitmaps"] else {}),
    }


def block_stats(stats: Counters) -> dict[str, int]:
    """QEMU's BlockDeviceStats, the counters blkfs keeps."""
    return {
        "rd_bytes": stats["read_bytes"],
        "wr_bytes": stats["write_bytes"],
        "unmap_bytes": stats["discard_bytes"],
        "rd_operations": stats["read_ops"],
        "wr_operations": stats["write_ops"],
        "flush_operations": stats["flush_ops"],
        "unmap_operations": stats["discard_ops"],
        "rd_total_time_ns": stats["read_ns"],
        "wr_total_time_ns": stats["write_ns"],
        "flush_total_time_ns": stats["flush_ns"],
        "unmap_total_time_ns": stats["discard_ns"],
    }


def all_nodes(state: DaemonStatus) -> Iterator[NodeTree]:
    """Every node once, parents before children."""
    seen: set[str] = set()

    def walk(tree: NodeTree) -> Iterator[NodeTree]:
        if tree["node-name"] not in seen:
            seen.add(tree["node-name"])
            yield tree
            for child in tree["children"].values():
                yield from walk(child)

    for backend in state["backends"]:
        if backend["tree"]:
            yield from walk(backend["tree"])
    for tree in state["nodes"]:
        yield from walk(tree)


# -- the monitor itself -----------------------------------------------------------------


@qmp("query-version")
async def query_version(monitor: Monitor, args: dict[str, Any]) -> Any:
    major, minor, micro = VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}


@qmp("query-commands")
async def query_commands(monitor: Monitor, args: dict[str, Any]) -> Any:
    return [{"name": name} for name in ["qmp_capabilities", "quit", *TABLE]]


# -- queries ----------------------------------------------------------------------------


@qmp("query-block")
async def query_block(monitor: Monitor, args: dict[str, Any]) -> Any:
    result = []
    for backend in (await status(monitor))["backends"]:
        if backend["deleted"]:
            continue
        entry: dict[str, Any] = {
            "device": backend["name"],
            "locked": False,
            "removable": True,
            "tray_open": False,
            "io-status": backend["io-status"],
        }
        tree = backend["tree"]
        if tree:
            limits = tree["info"].get("limits") if tree["driver"] == "throttle" else None
            entry["inserted"] = node_info(medium(tree), limits)
        result.append(entry)
    return result


@qmp("query-named-block-nodes", flat=bool | None)
async def query_named_block_nodes(monitor: Monitor, args: dict[str, Any]) -> Any:
    return [node_info(tree) for tree in all_nodes(await status(monitor))]


@qmp("query-blockstats", query_nodes=bool | None)
async def query_blockstats(monitor: Monitor, args: dict[str, Any]) -> Any:
    state = await status(monitor)
    if args.get("query-nodes"):
        return [
            {"node-name": tree["node-name"], "stats": block_stats(tree["stats"])}
            for tree in all_nodes(state)
        ]
    result = []
    for backend in state["backends"]:
        if backend["deleted"]:
            continue
        entry = {"device": backend["name"], "stats": block_stats(backend["stats"])}
        if backend["tree"]:
            entry["node-name"] = backend["tree"]["node-name"]
        result.append(entry)
    return result


# -- dirty bitmaps ----------------------------------------------------------------------


async def bitmap_node(monitor: Monitor, node: str) -> str:
    """The node a bitmap command names: a node, or a device (its image, under filters)."""
    for backend in (await status(monitor))["backends"]:
        if backend["name"] == node and backend["tree"] and not backend["deleted"]:
            return str(medium(backend["tree"])["node-name"])
    return node


@qmp(
    "block-dirty-bitmap-add",
    "bitmap-add",
    node="node",
    name="name",
    granularity="granularity?",
    persistent="persistent?",
    disabled="disabled?",
)
async def block_dirty_bitmap_add(monitor: Monitor, args: dict[str, Any]) -> Any:
    await run(monitor, "bitmap-add", {**args, "node": await bitmap_node(monitor, args["node"])})
    return {}


def _bitmap_verb(verb: str) -> None:
    @qmp(f"block-dirty-bitmap-{verb}", f"bitmap-{verb}", node="node", name="name")
    async def handler(monitor: Monitor, args: dict[str, Any]) -> Any:
        node = await bitmap_node(monitor, args["node"])
        await run(monitor, f"bitmap-{verb}", {"node": node, "name": args["name"]})
        return {}


for _verb in ("remove", "clear", "enable", "disable"):
    _bitmap_verb(_verb)


@qmp("block-dirty-bitmap-merge", "bitmap-merge", node="node", target="target", bitmaps=list)
async def block_dirty_bitmap_merge(monitor: Monitor, args: dict[str, Any]) -> Any:
    node = await bitmap_node(monitor, args["node"])
    names = []
    for source in args["bitmaps"]:
        if isinstance(source, dict):  # {node, name}: blkfs merges bitmaps of one node
            if await bitmap_node(monitor, str(source.get("node"))) != node:
                raise generic("blkfs merges only bitmaps of the target's node")
            source = source.get("name")
        if not isinstance(source, str) or "," in source:
            raise generic("Invalid parameter type for 'bitmaps', expected: array of names")
        names.append(source)
    await run(
        monitor,
        "bitmap-merge",
        {"node": node, "target": args["target"], "bitmaps": ",".join(names)},
    )
    return {}


# -- nodes and exports ------------------------------------------------------------------


@qmp("blockdev-add", "node-add", free=True)
async def blockdev_add(monitor: Monitor, args: dict[str, Any]) -> Any:
    options = dict(args)
    name = options.pop("node-name", None)
    if "driver" not in options:
        raise generic("Parameter 'driver' is missing")
    if not isinstance(options["driver"], str):
        raise generic("Invalid parameter type for 'driver', expected: string")
    if not isinstance(name, str):
        raise generic("'node-name' must be specified for the root node")
    await run(monitor, "node-add", {"node": name, "options": options})
    return {}


@qmp("blockdev-del", "node-del", node_name="node")
async def blockdev_del(monitor: Monitor, args: dict[str, Any]) -> Any:
    await run(monitor, "node-del", {"node": args["node-name"]})
    return {}


@qmp(
    "block-export-add",
    "export",
    type=Literal["fuse", "nbd"],
    id="name",
    node_name="node-add.node",
    writable="writable?",
    name="export-name?",
    mountpoint=str | None,
    bitmaps=list | None,
    tls_creds="tls-creds?",
    tls_authz="tls-authz?",
)
async def block_export_add(monitor: Monitor, args: dict[str, Any]) -> Any:
    kind, export_id = args["type"], args["id"]
    for other in (
        ("name", "bitmaps", "tls-creds", "tls-authz") if kind == "fuse" else ("mountpoint",)
    ):
        if other in args:
            raise generic(f"Parameter '{other}' is unexpected")
    bitmaps = args.get("bitmaps", [])
    if len(bitmaps) > 1 or not all(isinstance(b, str) for b in bitmaps):
        raise generic("blkfs exports at most one bitmap, by name")
    if kind == "fuse" and "mountpoint" in args:
        expected = f"{monitor.mountpoint or 'MOUNT'}/{export_id}"
        if args["mountpoint"].rstrip("/") != expected:
            raise generic(
                f"blkfs serves a fuse export as a file of its mount: mountpoint "
                f"must be {expected} (or left out)"
            )
    await run(monitor, "create", {"name": export_id, "medium": {"node": args["node-name"]}})
    if kind == "nbd":
        try:
            await run(
                monitor,
                "export",
                {
                    "name": export_id,
                    "export-name": args.get("name", args["node-name"]),
                    "writable": args.get("writable", False),
                    "bitmap": bitmaps[0] if bitmaps else None,
                    "tls-creds": args.get("tls-creds"),
                    "tls-authz": args.get("tls-authz"),
                },
            )
        except BlockError:
            await run(monitor, "delete", {"name": export_id})
            raise
    return {}


@qmp("block-export-del", "export-del", id="name", mode=Literal["safe", "hard"] | None)
async def block_export_del(monitor: Monitor, args: dict[str, Any]) -> Any:
    export_id, mode = args["id"], args.get("mode", "safe")
    state = await status(monitor)
    if not any(b["name"] == export_id and not b["deleted"] for b in state["backends"]):
        raise generic(f"Export '{export_id}' is not found")
    if any(e["backend"] == export_id and not e["retired"] for e in state["exports"]):
        await run(monitor, "export-del", {"name": export_id, "force": mode == "hard"})
    await run(monitor, "delete", {"name": export_id, "force": mode == "hard"})
    monitor.emit("BLOCK_EXPORT_DELETED", {"id": export_id})
    return {}


@qmp("query-block-exports")
async def query_block_exports(monitor: Monitor, args: dict[str, Any]) -> Any:
    state = await status(monitor)
    nbd = {e["backend"] for e in state["exports"] if not e["retired"]}
    return [
        {
            "type": "nbd" if b["name"] in nbd else "fuse",
            "id": b["name"],
            "node-name": b["tree"]["node-name"],
            "shutting-down": False,
        }
        for b in state["backends"]
        if b["tree"] and not b["deleted"]
    ]


# -- media ------------------------------------------------------------------------------


def _tray(monitor: Monitor, name: str, tray_open: bool) -> None:
    monitor.emit("DEVICE_TRAY_MOVED", {"device": name, "id": name, "tray-open": tray_open})


@qmp(
    "blockdev-change-medium",
    "change",
    id="name?",
    device_="name?",
    filename=str,
    format=str | None,
    read_only_mode=Literal["retain", "read-only", "read-write"] | None,
    force="force?",
)
async def blockdev_change_medium(monitor: Monitor, args: dict[str, Any]) -> Any:
    name = await device(monitor, args, "device", "id", klass="DeviceNotFound")
    mode = args.get("read-only-mode", "retain")
    medium: dict[str, Any] = {"file": {"driver": "file", "filename": args["filename"]}}
    if "format" in args:
        medium["driver"] = args["format"]
    if mode != "retain":
        medium["read-only"] = mode == "read-only"
    await run(monitor, "change", {"name": name, "medium": medium, "force": args.get("force")})
    _tray(monitor, name, True)
    _tray(monitor, name, False)
    return {}


@qmp("cont", "cont")
async def cont(monitor: Monitor, args: dict[str, Any]) -> Any:
    """QEMU's cont resumes the machine; here, every backend its error policy paused."""
    await run(monitor, "cont", {})
    return {}


@qmp("eject", "eject", id="name?", device_="name?", force="force?")
async def eject(monitor: Monitor, args: dict[str, Any]) -> Any:
    name = await device(monitor, args, "device", "id", klass="DeviceNotFound")
    await run(monitor, "eject", {"name": name, "force": args.get("force")})
    _tray(monitor, name, True)
    return {}


@qmp("blockdev-remove-medium", "eject", id="name")
async def blockdev_remove_medium(monitor: Monitor, args: dict[str, Any]) -> Any:
    name = await device(monitor, args, "id", klass="DeviceNotFound")
    await run(monitor, "eject", {"name": name})
    _tray(monitor, name, True)
    return {}


@qmp("blockdev-insert-medium", "insert", id="name", node_name="node-add.node")
async def blockdev_insert_medium(monitor: Monitor, args: dict[str, Any]) -> Any:
    name = await device(monitor, args, "id", klass="DeviceNotFound")
    await run(monitor, "insert", {"name": name, "medium": {"node": args["node-name"]}})
    _tray(monitor, name, False)
    return {}


@qmp("blockdev-open-tray", id=BackendName | None, device_=BackendName | None, force=bool | None)
async def blockdev_open_tray(monitor: Monitor, args: dict[str, Any]) -> Any:
    """blkfs has no tray: the event a drive's tray gives, and nothing else (the medium
    stays until blockdev-remove-medium, which takes it out at once)."""
    _tray(monitor, await device(monitor, args, "device", "id", klass="DeviceNotFound"), True)
    return {}


@qmp("blockdev-close-tray", id=BackendName | None, device_=BackendName | None)
async def blockdev_close_tray(monitor: Monitor, args: dict[str, Any]) -> Any:
    """The event, and nothing else (see blockdev-open-tray)."""
    _tray(monitor, await device(monitor, args, "device", "id", klass="DeviceNotFound"), False)
    return {}


@qmp("block_resize", "resize", device_="name?", node_name="name?", size="size")
async def block_resize(monitor: Monitor, args: dict[str, Any]) -> Any:
    name = await device(monitor, args, "device", "node-name")
    await run(monitor, "resize", {"name": name, "size": args["size"], "shrink": True})
    return {}


THROTTLE_LIMITS = {
    "bps": "bps-total",
    "bps_rd": "bps-read",
    "bps_wr": "bps-write",
    "iops": "iops-total",
    "iops_rd": "iops-read",
    "iops_wr": "iops-write",
}
"""QEMU's throttle arguments and the throttle filter's limits they set."""
THROTTLE_ARGS = {
    key + suffix: limit + option
    for key, limit in THROTTLE_LIMITS.items()
    for suffix, option in (("", ""), ("_max", "-max"), ("_max_length", "-max-length"))
}
"""QEMU's throttle arguments and the parameters of ``throttle`` they feed."""


@qmp(
    "block_set_io_throttle",
    "throttle",
    device_="name?",
    id="name?",
    group="group?",
    verbatim={
        "iops_size": Size | None,
        **{
            key: param if key in THROTTLE_LIMITS else f"{param}?"
            for key, param in THROTTLE_ARGS.items()
        },
    },
)
async def block_set_io_throttle(monitor: Monitor, args: dict[str, Any]) -> Any:
    name = await device(monitor, args, "device", "id", klass="DeviceNotFound")
    if args.get("iops_size", 0):
        raise generic("blkfs's throttle filter counts every request as one: iops_size must be 0")
    limits = {THROTTLE_ARGS[key]: value for key, value in args.items() if key in THROTTLE_ARGS}
    await run(monitor, "throttle", {"name": name, "group": args.get("group"), **limits})
    return {}


@qmp("blockdev-reopen", "reopen", options=list)
async def blockdev_reopen(monitor: Monitor, args: dict[str, Any]) -> Any:
    if len(args["options"]) != 1 or not isinstance(args["options"][0], dict):
        raise generic("blkfs reopens one node per blockdev-reopen: give one options object")
    options = dict(args["options"][0])
    node = options.pop("node-name", None)
    if not isinstance(node, str):
        raise generic("Parameter 'node-name' is missing")
    options.pop("driver", None)
    await run(monitor, "reopen", {"node": node, "options": options})
    return {}


# -- snapshots and jobs -----------------------------------------------------------------


@qmp(
    "blockdev-snapshot-sync",
    "snapshot",
    device_="name?",
    node_name="name?",
    snapshot_file="path",
    format=str | None,
    mode=str | None,
)
async def blockdev_snapshot_sync(monitor: Monitor, args: dict[str, Any]) -> Any:
    name = await device(monitor, args, "device", "node-name")
    if args.get("format", "qcow2") != "qcow2":
        raise generic("blkfs makes qcow2 snapshot overlays only")
    if args.get("mode", "absolute-paths") != "absolute-paths":
        raise generic("blkfs creates the overlay itself: mode must be absolute-paths")
    await run(monitor, "snapshot", {"name": name, "path": args["snapshot-file"]})
    return {}


@qmp("blockdev-snapshot", "snapshot-node", node="name", overlay="overlay")
async def blockdev_snapshot(monitor: Monitor, args: dict[str, Any]) -> Any:
    name = await device(monitor, args, "node")
    await run(monitor, "snapshot-node", {"name": name, "overlay": args["overlay"]})
    return {}


@qmp(
    "block-commit",
    "commit",
    job_id="job-id?",
    device_="name",
    top="top?",
    base="base?",
    top_node="top?",
    base_node="base?",
    speed="speed?",
)
async def block_commit(monitor: Monitor, args: dict[str, Any]) -> Any:
    top = args.get("top-node", args.get("top"))
    base = args.get("base-node", args.get("base"))
    fields = {"top": top, "base": base}
    return await _job(monitor, args, "commit", fields, klass="DeviceNotFound")  # as QEMU's


@qmp(
    "block-stream",
    "stream",
    job_id="job-id?",
    device_="name",
    base="base?",
    base_node="base?",
    speed="speed?",
)
async def block_stream(monitor: Monitor, args: dict[str, Any]) -> Any:
    return await _job(monitor, args, "stream", {"base": args.get("base-node", args.get("base"))})


async def _job(
    monitor: Monitor,
    args: Mapping[str, Any],
    verb: str,
    fields: Mapping[str, Any],
    klass: str = "GenericError",
) -> Any:
    """Start job ``verb`` with ``fields`` on the backend ``args`` names as its device, with
    the speed and job id ``args`` give; QMP's empty reply."""
    name = await device(monitor, args, "device", klass=klass)
    job = {"name": name, **fields, "speed": args.get("speed"), "job-id": args.get("job-id")}
    await run(monitor, verb, job)
    return {}


def _bitmap(args: Mapping[str, Any]) -> dict[str, Any]:
    """A backup's bitmap and bitmap mode, as ``args`` give them."""
    return {key: args.get(key) for key in ("bitmap", "bitmap-mode")}


async def _copy(
    monitor: Monitor, args: dict[str, Any], verb: str, extra: Mapping[str, Any] | None = None
) -> Any:
    fields = {
        "target": args["target"],
        "sync": args["sync"],
        "format": args.get("format"),
        "existing": args.get("mode", "absolute-paths") == "existing",
        **(extra or {}),
    }
    return await _job(monitor, args, verb, fields)


@qmp(
    "drive-mirror",
    "mirror",
    job_id="job-id?",
    device_="name",
    target="target",
    format="format?",
    sync="sync",
    mode=NewImageMode | None,
    speed="speed?",
)
async def drive_mirror(monitor: Monitor, args: dict[str, Any]) -> Any:
    return await _copy(monitor, args, "mirror")


@qmp(
    "drive-backup",
    "backup",
    job_id="job-id?",
    device_="name",
    target="target",
    format="format?",
    sync="sync",
    mode=NewImageMode | None,
    speed="speed?",
    bitmap="bitmap?",
    bitmap_mode="bitmap-mode?",
)
async def drive_backup(monitor: Monitor, args: dict[str, Any]) -> Any:
    return await _copy(monitor, args, "backup", _bitmap(args))


def _node_target(node: str) -> str:
    """The jobs' target ``node=NAME``, as JSON: a name with commas stays one name."""
    return json.dumps({"node": node})


@qmp(
    "blockdev-mirror",
    "mirror",
    job_id="job-id?",
    device_="name",
    target=NodeName,
    sync="sync",
    speed="speed?",
    copy_mode="mode?",
)
async def blockdev_mirror(monitor: Monitor, args: dict[str, Any]) -> Any:
    target = _node_target(args["target"])
    fields = {"target": target, "sync": args["sync"], "mode": args.get("copy-mode")}
    return await _job(monitor, args, "mirror", fields)


@qmp(
    "blockdev-backup",
    "backup",
    job_id="job-id?",
    device_="name",
    target=NodeName,
    sync="sync",
    speed="speed?",
    bitmap="bitmap?",
    bitmap_mode="bitmap-mode?",
)
async def blockdev_backup(monitor: Monitor, args: dict[str, Any]) -> Any:
    fields = {"target": _node_target(args["target"]), "sync": args["sync"], **_bitmap(args)}
    return await _job(monitor, args, "backup", fields)


def job_info(job: JobInfo) -> dict[str, Any]:
    """QEMU's JobInfo of a blkfs job."""
    info = {key: job[key] for key in ("id", "type", "status", "current-progress", "total-progress")}
    if job["error"]:
        info["error"] = job["error"]
    return info


@qmp("query-jobs")
async def query_jobs(monitor: Monitor, args: dict[str, Any]) -> Any:
    return [job_info(job) for job in await jobs(monitor)]


def _job_verb(verb: str, key: str) -> Handler:
    async def handler(monitor: Monitor, args: dict[str, Any]) -> Any:
        await run(monitor, verb, {"job": args[key]})
        return {}

    return handler


for _verb in ("pause", "resume", "cancel", "complete", "dismiss"):
    qmp(f"job-{_verb}", f"job-{_verb}", id="job")(_job_verb(f"job-{_verb}", "id"))
for _verb in ("pause", "resume", "cancel", "complete"):
    qmp(f"block-job-{_verb}", f"job-{_verb}", device_="job")(_job_verb(f"job-{_verb}", "device"))


@qmp("job-finalize", id=JobId)
async def job_finalize(monitor: Monitor, args: dict[str, Any]) -> Any:
    if not any(job["id"] == args["id"] for job in await jobs(monitor)):
        raise generic(f"no job named '{args['id']}'")
    raise generic(
        f"Job '{args['id']}' cannot accept command verb 'finalize': blkfs jobs "
        "finalize by themselves (auto-finalize)"
    )


@qmp("block-job-set-speed", "job-set-speed", device_="job", speed="speed")
async def block_job_set_speed(monitor: Monitor, args: dict[str, Any]) -> Any:
    await run(monitor, "job-set-speed", {"job": args["device"], "speed": args["speed"]})
    return {}


def job_event(event: str, job: JobInfo) -> dict[str, Any]:
    """The data of QEMU's event ``event`` for a blkfs job."""
    if event == "JOB_STATUS_CHANGE":
        return {"id": job["id"], "status": job["status"]}
    data = {
        "type": job["type"],
        "device": job["id"],
        "len": job["total-progress"],
        "offset": job["current-progress"],
        "speed": job["speed"],
    }
    if event == "BLOCK_JOB_COMPLETED" and job["error"]:
        data["error"] = job["error"]
    return data


def io_error_event(error: IoError) -> dict[str, Any]:
    """The data of QEMU's BLOCK_IO_ERROR for a request a backend's medium failed, with what
    the backend's error policy made of it (report, ignore, stop)."""
    return {
        "device": error.backend,
        "node-name": error.node,
        "operation": error.operation,
        "action": error.action,
        "nospace": error.errno == errno.ENOSPC,
        "reason": os.strerror(error.errno),
    }
