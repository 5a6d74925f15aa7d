"""The command layer: every command that changes or reports the block layer, declared once.

A command is an async function over the backend API, registered with :func:`command`. Its
signature is its declaration: each parameter's type says what the argument is (a backend or
node name, a medium, a size, an on/off flag, one of some words), its docstring is its help,
and the adapters derive everything else from them: the ``.ctl`` text grammar and its usage
lines (:mod:`blkfs.frontends.ctl`), the choices of ``blkfs ctl``, later the QMP monitor.
Adding a command is one function here.

Ground rules: :meth:`Commands.run` checks and converts every argument before the handler
runs, so a bad argument is EINVAL and changes nothing; a handler raises
:class:`~blkfs.errors.BlockError` (errno and message) when it fails, and a failed command
changes nothing. The last failures are kept (``.ctl/error``) and logged, one line each.
"""

from __future__ import annotations

import errno
import inspect
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import UnionType
from typing import (
    Annotated,
    Any,
    Literal,
    Protocol,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)
from weakref import WeakKeyDictionary

from blkfs.backend import BlockBackend, BlockLayer, Medium, OptionError, parse_bool, parse_size
from blkfs.error_policy import Policy
from blkfs.errors import BlockError
from blkfs.jobs.backup import BackupJob
from blkfs.jobs.commit import commit as commit_job
from blkfs.jobs.mirror import MirrorJob, start_copy
from blkfs.jobs.snapshot import rollback as rollback_medium
from blkfs.jobs.snapshot import snapshot as snapshot_medium
from blkfs.jobs.snapshot import snapshot_onto
from blkfs.jobs.stream import stream as stream_job

log = logging.getLogger("blkfs.commands")

ERROR_HISTORY = 32


class Kind(Enum):
    """What an argument is, beyond its Python type; the value is how usage lines show it."""

    NAME = "NAME"  # a backend's name: the first word
    NODE = "NODE-NAME"  # a node's name: the first word
    MEDIUM = "OPTIONS"  # the options of a medium (or node=NAME): the rest of the line
    NODE_OPTIONS = "OPTIONS "  # option values for a live node (reopen); shown as OPTIONS
    SIZE = "SIZE"  # bytes, with QEMU's suffixes
    FLAG = "on|off"  # key=on|off
    CHOICE = "word"  # key=one-of-some-words
    EXPORT = "NAME-OR-EXPORT"  # a backend's name or an export's: the first word
    JOB = "JOB-ID"  # a job's id: the first word
    PATH = "PATH"  # an absolute host path: a word after the name
    TEXT = "text"  # key=text (a path, a host); shown as key=KEY
    RATE = "RATE"  # key=bytes per second, with QEMU's suffixes (0: no limit)

    @property
    def word(self) -> str:
        return str(self.value).strip()


POSITIONAL = frozenset(
    {
        Kind.NAME,
        Kind.NODE,
        Kind.EXPORT,
        Kind.JOB,
        Kind.MEDIUM,
        Kind.NODE_OPTIONS,
        Kind.SIZE,
        Kind.PATH,
    }
)
"""Kinds given by position (the first word, the words after it, the rest of the line); the
others are ``key=value``."""

BackendName = Annotated[str, Kind.NAME]
NodeName = Annotated[str, Kind.NODE]
MediumOptions = Annotated[Medium, Kind.MEDIUM]
NodeOptions = Annotated[Mapping[str, Any], Kind.NODE_OPTIONS]
Size = Annotated[int, Kind.SIZE]
JobId = Annotated[str, Kind.JOB]
HostPath = Annotated[str, Kind.PATH]
Rate = Annotated[int, Kind.RATE]
OnChange = Literal["follow", "error"]


@dataclass(frozen=True)
class Param:
    """One argument of a command, as its handler declares it."""

    name: str
    """As users spell it: ``on-change`` for the handler's ``on_change``."""
    arg: str
    """As the handler spells it (``format_`` for ``format``)."""
    kind: Kind
    required: bool
    default: Any
    choices: tuple[str, ...] = ()

    def convert(self, command: str, raw: Any) -> Any:
        """The typed value of ``raw``; EINVAL naming the argument if it is not one."""
        try:
            if self.kind in (Kind.SIZE, Kind.RATE):
                return parse_size(raw)
            if self.kind is Kind.FLAG:
                return parse_bool(raw)
        except (TypeError, ValueError) as exc:
            raise BlockError(errno.EINVAL, f"{command}: {self.name} {exc} (got {raw!r})") from None
        if self.kind is Kind.CHOICE and raw not in self.choices:
            raise BlockError(
                errno.EINVAL,
                f"{command}: {self.name} must be {' or '.join(self.choices)} (got {raw!r})",
            )
        if self.kind in (
            Kind.NAME,
            Kind.NODE,
            Kind.EXPORT,
            Kind.JOB,
            Kind.PATH,
            Kind.TEXT,
        ) and not isinstance(raw, str):
            raise BlockError(
                errno.EINVAL,
                f"{command}: {self.name} must be {'text' if self.kind is Kind.TEXT else 'a name'}",
            )
        return raw


@dataclass(frozen=True)
class Command:
    """A command: its name, help, parameters and handler."""

    name: str
    help: str
    params: tuple[Param, ...]
    handler: Callable[..., Awaitable[Any]]
    report: bool
    """Only reads state (status): a frontend may offer it as something to read."""

    def usage(self) -> str:
        """``NAME [OPTIONS] [on-change=follow|error]``: the first words, then key=value."""
        words = []
        for param in self.params:
            if param.kind in POSITIONAL:
                word = param.kind.word
                words.append(word if param.required else f"[{word}]")
            else:
                value = {
                    Kind.CHOICE: "|".join(param.choices),
                    Kind.TEXT: param.name.upper(),
                    Kind.RATE: "RATE",
                }.get(param.kind, "on")
                word = f"{param.name}={value}"
                words.append(word if param.required else f"[{word}]")
        return " ".join(words)


COMMANDS: dict[str, Command] = {}
"""Every command by name, in the order declared (the order frontends list them in)."""


def command(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Declare a command from its handler: ``async def NAME(layer, ...)``; the function's
    name (``_`` for ``-``), signature and docstring are the whole declaration."""
    hints = get_type_hints(handler, include_extras=True)
    params = []
    for name, parameter in list(inspect.signature(handler).parameters.items())[1:]:
        params.append(_param(name, hints[name], parameter.default))
    name = handler.__name__.rstrip("_").replace("_", "-")
    COMMANDS[name] = Command(
        name,
        inspect.getdoc(handler) or "",
        tuple(params),
        handler,
        report=name.startswith("query-"),
    )
    return handler


def _param(arg: str, hint: Any, default: Any) -> Param:
    required = default is inspect.Parameter.empty
    name = arg.rstrip("_").replace("_", "-")
    if get_origin(hint) in (Union, UnionType):  # X | None: optional, as its default says
        hint = next(a for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is Annotated:
        return Param(name, arg, get_args(hint)[1], required, None if required else default)
    if get_origin(hint) is Literal:
        return Param(name, arg, Kind.CHOICE, required, default, tuple(get_args(hint)))
    if hint is bool:
        return Param(name, arg, Kind.FLAG, required, default)
    if hint is str:
        return Param(name, arg, Kind.TEXT, required, default)
    raise TypeError(f"command parameter {arg}: no argument kind for {hint!r}")


class Commands:
    """Runs commands against a BlockLayer and keeps the last failures."""

    def __init__(self, layer: BlockLayer) -> None:
        self.layer = layer
        self.errors: deque[str] = deque(maxlen=ERROR_HISTORY)

    async def run(self, name: str, args: Mapping[str, Any]) -> Any:
        """Run command ``name`` with ``args`` by parameter name (as users spell them); on
        failure record the message and raise it (as one line)."""
        try:
            command = COMMANDS.get(name)
            if command is None:
                raise BlockError(errno.EINVAL, f"unknown command '{name}'")
            typed = self._check(command, args)
            return await command.handler(self.layer, **typed)
        except BlockError as exc:
            raise self.record(name, exc) from None

    @staticmethod
    def _check(command: Command, args: Mapping[str, Any]) -> dict[str, Any]:
        known = {param.name: param for param in command.params}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise OptionError(
                f"{command.name} takes no argument '{unknown[0]}' (usage: {command.usage()})"
            )
        typed = {}
        for param in command.params:
            if param.name in args and args[param.name] is not None:
                typed[param.arg] = param.convert(command.name, args[param.name])
            elif param.required:
                raise BlockError(
                    errno.EINVAL,
                    f"{command.name}: {param.kind.word} missing (usage: {command.usage()})",
                )
        return typed

    def record(self, what: str, exc: BlockError) -> BlockError:
        """Keep a failure's message for ``.ctl/error`` and the log (also for failures a
        frontend met outside a command, such as a refused truncate); returns the error to
        raise, its message made one line."""
        text = one_line(str(exc))
        message = f"{what}: {text} [{errno.errorcode.get(exc.errno, exc.errno)}]"
        self.errors.append(message)
        log.warning("%s failed: %s", what, message)
        return exc if text == str(exc) else BlockError(exc.errno, text)


def one_line(text: str) -> str:
    """``text`` with every unprintable character escaped, so that a message quoting user
    input stays one line in ``.ctl/error`` and the log (no CR, LF, NUL or Unicode line
    separators)."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


# -- the commands ---------------------------------------------------------------------------


@command
async def create(
    layer: BlockLayer,
    name: BackendName,
    medium: MediumOptions | None = None,
    on_change: OnChange = "follow",
    werror: Policy = "enospc",
    rerror: Policy = "report",
) -> None:
    """A new backend with that medium, or an empty drive.

    on-change=error: files opened before a media change fail with ESTALE until opened
    again (default: they follow the new medium, as a drive's users do). werror and rerror:
    what a write or read the medium fails does (QEMU's): report it, ignore it, or stop
    (pause the backend until cont); enospc stops on a full host and reports the rest."""
    await layer.create(name, medium, on_change=on_change, werror=werror, rerror=rerror)


@command
async def delete(layer: BlockLayer, name: BackendName, force: bool = False) -> None:
    """Remove the backend's name; files open for reading keep working until closed.

    force=on: even under writers (their files keep working), or if the final flush
    fails."""
    await layer.delete(name, force=force)


@command
async def change(
    layer: BlockLayer, name: BackendName, medium: MediumOptions, force: bool = False
) -> None:
    """Replace the medium atomically.

    Drains and flushes the old medium, opens the new one (taking over the old tree's nodes
    where it names or describes them), then swaps. force=on: under writers, or when the old
    medium cannot be flushed."""
    await layer.find(name).change(medium, force=force)


@command
async def eject(layer: BlockLayer, name: BackendName, force: bool = False) -> None:
    """Remove the medium; the backend stays, with size 0.

    Drains, flushes and closes it. force=on: under writers, or when the medium cannot be
    flushed."""
    await layer.find(name).eject(force=force)


@command
async def insert(layer: BlockLayer, name: BackendName, medium: MediumOptions) -> None:
    """A medium into an empty backend."""
    await layer.find(name).insert(medium)


@command
async def reopen(layer: BlockLayer, node: NodeName, options: NodeOptions) -> None:
    """Change the options of a live node atomically (QEMU's blockdev-reopen)."""
    await layer.reopen(node, options)


@command
async def resize(
    layer: BlockLayer, name: BackendName, size: Size | None = None, shrink: bool = False
) -> None:
    """Grow the medium to SIZE, or shrink it with shrink=on.

    Shrinking needs shrink=on, as qemu-img resize --shrink; with no size, the backend takes
    the size its image has now on the host (as losetup -c)."""
    backend = layer.find(name)
    if size is None:
        if shrink:
            raise BlockError(errno.EINVAL, "resize: shrink=on needs a size")
        await backend.refresh_size()
    else:
        await backend.truncate(size, shrink=shrink)


@command
async def set_(
    layer: BlockLayer,
    name: BackendName,
    werror: Policy | None = None,
    rerror: Policy | None = None,
    on_change: OnChange | None = None,
) -> None:
    """Change a backend's own options live: its error policies and on-change."""
    backend = layer.find(name)
    backend.werror = werror or backend.werror
    backend.rerror = rerror or backend.rerror
    backend.on_change = on_change or backend.on_change


@command
async def cont(layer: BlockLayer, name: BackendName | None = None) -> None:
    """Resume a backend its error policy paused (every paused backend, with no name).

    Its held requests are retried; if they fail again, it pauses again."""
    for backend in [layer.find(name)] if name else list(layer):
        backend.cont()


@command
async def query_status(layer: BlockLayer) -> dict[str, Any]:
    """The daemon and every backend: medium, size, users, driver tree, statistics.

    Deleted backends that users still hold open are listed too, and the NBD exports with
    their clients and counters."""
    exporter = _EXPORTERS.get(layer)
    return {
        "pid": os.getpid(),
        "image-dirs": layer.image_dirs,
        "backends": await layer.status(),
        "nodes": layer.added_nodes(),
        "exports": exporter.status() if exporter else [],
    }


# -- snapshots and block jobs ---------------------------------------------------------------

MirrorSync = Literal["full", "top", "none"]
BackupSync = Literal["full", "top"]
MirrorMode = Literal["background", "write-blocking"]
ImageFormat = Literal["qcow2", "raw"]


@command
async def snapshot(
    layer: BlockLayer,
    name: BackendName,
    path: HostPath,
    cluster_size: str | None = None,
    extended_l2: bool = False,
    compression_type: Literal["zlib", "zstd"] = "zlib",
) -> None:
    """A live external snapshot: a new qcow2 overlay at PATH over the medium.

    The image now in use becomes its read-only backing file and keeps the data of this
    moment; users of the backend see no interruption. cluster-size, extended-l2 and
    compression-type are the overlay's (qemu-img create -o cluster_size=...)."""
    options = {"extended_l2": "on" if extended_l2 else "off", "compression_type": compression_type}
    if cluster_size is not None:
        options["cluster_size"] = cluster_size
    await snapshot_medium(layer, layer.find(name), path, options)


@command
async def snapshot_node(layer: BlockLayer, name: BackendName, overlay: NodeName) -> None:
    """A live external snapshot onto an existing node (QEMU's blockdev-snapshot).

    OVERLAY, a qcow2 node added with node-add (backing=null), unused, writable and as large
    as the medium, becomes the active image over it; its header is made to name the image
    that was active, which turns read-only."""
    node = layer.graph.find(overlay)
    await snapshot_onto(layer, layer.find(name), node)


@command
async def rollback(layer: BlockLayer, name: BackendName, force: bool = False) -> None:
    """Drop what was written since the last snapshot (the active overlay is emptied).

    Refused while the backend is open for writing: a filesystem mounted from it must be
    unmounted first, its cache would not match the disk any more. force=on: even so."""
    await rollback_medium(layer.find(name), force)


@command
async def commit(
    layer: BlockLayer,
    name: BackendName,
    top: str | None = None,
    base: str | None = None,
    speed: Rate = 0,
    job_id: str | None = None,
) -> None:
    """A job copying the images from top down to base into the base, which replaces them.

    top (default: the active image) and base (default: the last backing file) are node
    names or image file names. Committing the active image goes ready; job-complete then
    switches the backend to the base."""
    await layer.jobs.launch(commit_job(layer.jobs, layer.find(name), job_id, top, base, speed))


@command
async def stream(
    layer: BlockLayer,
    name: BackendName,
    base: str | None = None,
    speed: Rate = 0,
    job_id: str | None = None,
) -> None:
    """A job copying what the backing files above base hold into the active image.

    The streamed files then leave the chain (all of them without base=: the image stands
    alone)."""
    await layer.jobs.launch(stream_job(layer.jobs, layer.find(name), job_id, base, speed))


@command
async def mirror(
    layer: BlockLayer,
    name: BackendName,
    target: HostPath,
    sync: MirrorSync = "full",
    mode: MirrorMode = "background",
    format_: ImageFormat | None = None,
    existing: bool = False,
    speed: Rate = 0,
    job_id: str | None = None,
) -> None:
    """A job copying the live medium to a new image at TARGET, then switching to it.

    It goes ready once in sync; job-complete switches the backend to the target, job-cancel
    then leaves the target as a copy of that moment. sync=top|none: only the active image's
    data (the target shares its backing file); mode=write-blocking: writes reach both before
    they complete. existing=on: TARGET is an image already (at least as large);
    TARGET node=NODE-NAME: a node added with node-add, unused (QEMU's blockdev-mirror)."""
    await start_copy(
        MirrorJob,
        layer.jobs,
        layer.find(name),
        job_id,
        target,
        format_,
        sync,
        mode,
        existing,
        speed,
    )


@command
async def backup(
    layer: BlockLayer,
    name: BackendName,
    target: HostPath,
    sync: BackupSync = "full",
    format_: ImageFormat | None = None,
    existing: bool = False,
    speed: Rate = 0,
    job_id: str | None = None,
) -> None:
    """A job copying the medium as it is now to a new image at TARGET, while it is used.

    Writes meanwhile first save the old data to the target: it ends as a copy of the moment
    the job started. TARGET node=NODE-NAME: a node added with node-add, unused (QEMU's
    blockdev-backup)."""
    await start_copy(
        BackupJob,
        layer.jobs,
        layer.find(name),
        job_id,
        target,
        format_,
        sync,
        "background",
        existing,
        speed,
    )


@command
async def job_pause(layer: BlockLayer, job: JobId) -> None:
    """Pause a job (its copy; the backend keeps serving)."""
    layer.jobs.find(job).pause()


@command
async def job_resume(layer: BlockLayer, job: JobId) -> None:
    """Resume a paused job."""
    layer.jobs.find(job).resume()


@command
async def job_cancel(layer: BlockLayer, job: JobId) -> None:
    """Stop a job; the backend stays as it was (a ready mirror keeps its target in sync
    up to now, without switching)."""
    layer.jobs.find(job).cancel()


@command
async def job_complete(layer: BlockLayer, job: JobId) -> None:
    """Finish a ready mirror or active commit: switch the backend to its target."""
    layer.jobs.find(job).complete()


@command
async def job_set_speed(layer: BlockLayer, job: JobId, speed: Rate) -> None:
    """Limit a job's copy to RATE bytes per second (0: no limit)."""
    layer.jobs.find(job).set_speed(speed)


@command
async def job_dismiss(layer: BlockLayer, job: JobId) -> None:
    """Forget a concluded job."""
    layer.jobs.dismiss(job)


@command
async def query_jobs(layer: BlockLayer) -> list[dict[str, Any]]:
    """Every job: type, backend, status, progress, speed, error."""
    return layer.jobs.status()


JobEvents = Callable[[str, dict[str, Any]], None]
"""Called with a QMP event name (JOB_STATUS_CHANGE, BLOCK_JOB_READY, ...) and the job as
query-jobs shows it."""


def watch_jobs(layer: BlockLayer, listener: JobEvents) -> Callable[[], None]:
    """Have ``listener`` hear every job event of ``layer``; returns what stops it."""

    def heard(event: str, job: Any) -> None:
        listener(event, job.info())

    layer.jobs.listeners.append(heard)
    return lambda: layer.jobs.listeners.remove(heard)


# -- exports --------------------------------------------------------------------------------

ExportOrBackend = Annotated[str, Kind.EXPORT]


class Exporter(Protocol):
    """What serves NBD exports (the NBD frontend). It registers itself for its layer with
    :func:`serve_exports`, so that the export commands reach it without knowing it."""

    async def add(
        self,
        backend: BlockBackend,
        export_name: str,
        writable: bool,
        *,
        socket: str | None,
        host: str | None,
        port: str | None,
        mode: str | None,
        tls_creds: str | None,
        tls: bool | None,
        tls_verify_peer: bool | None,
    ) -> None:
        """Serve ``backend`` at the address given, or on the default server, with the TLS
        asked for (None: not said)."""

    async def remove(self, name: str, force: bool) -> None:
        """Stop serving the export ``name``, or every export of the backend ``name``."""

    def status(self) -> list[dict[str, Any]]:
        """Every export, its clients and its counters."""


_EXPORTERS: WeakKeyDictionary[BlockLayer, Exporter] = WeakKeyDictionary()


def serve_exports(layer: BlockLayer, exporter: Exporter) -> None:
    """Make ``exporter`` the one the export commands of ``layer`` drive."""
    _EXPORTERS[layer] = exporter


def _exporter(layer: BlockLayer) -> Exporter:
    exporter = _EXPORTERS.get(layer)
    if exporter is None:
        raise BlockError(errno.ENOTSUP, "this daemon serves no NBD exports")
    return exporter


@command
async def export(
    layer: BlockLayer,
    name: BackendName,
    socket: str | None = None,
    host: str | None = None,
    port: str | None = None,
    mode: str | None = None,
    writable: bool = False,
    export_name: str | None = None,
    tls_creds: str | None = None,
    tls: bool | None = None,
    tls_verify_peer: bool | None = None,
) -> None:
    """Serve the backend over NBD, to QEMU, nbd-client, nbdcopy or another blkfs.

    On the mount's NBD server (blkfs mount --nbd), or on a unix socket (socket=PATH, mode
    0600 unless mode= says otherwise) or TCP address (host= port=) of its own. Read-only
    unless writable=on; clients ask for it by export-name (default: NAME). tls-creds=DIR
    (ca-cert.pem, server-cert.pem, server-key.pem, as QEMU's tls-creds-x509) requires
    clients to use TLS, tls-verify-peer=on also a client certificate signed by the CA; a
    TCP address of its own needs tls-creds or an explicit tls=off."""
    backend = layer.find(name)
    if socket is not None and (host is not None or port is not None):
        raise BlockError(errno.EINVAL, "export: give socket=PATH or host= port=, not both")
    if writable and backend.read_only:
        raise BlockError(errno.EROFS, f"{name}: read-only medium; export it without writable=on")
    await _exporter(layer).add(
        backend,
        export_name or name,
        writable,
        socket=socket,
        host=host,
        port=port,
        mode=mode,
        tls_creds=tls_creds,
        tls=tls,
        tls_verify_peer=tls_verify_peer,
    )


@command
async def export_del(layer: BlockLayer, name: ExportOrBackend, force: bool = False) -> None:
    """Stop serving an export, named by its export name or by its backend's name.

    Refused while clients are connected (EBUSY) unless force=on, which disconnects them
    once their requests in flight are answered."""
    await _exporter(layer).remove(name, force)


# -- nodes on their own ---------------------------------------------------------------------


@command
async def node_add(layer: BlockLayer, node: NodeName, options: NodeOptions) -> None:
    """A node named NODE-NAME, opened with OPTIONS and held without a backend (QEMU's
    blockdev-add); create, insert and change take it as node=NODE-NAME."""
    await layer.add_node(node, options)


@command
async def node_del(layer: BlockLayer, node: NodeName) -> None:
    """Close a node that node-add made (QEMU's blockdev-del); refused while in use."""
    await layer.delete_node(node)
