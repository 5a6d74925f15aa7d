"""The command layer: every command that changes or reports the block layer, declared once.

A command is an async function over the backend API, registered with :func:`command`. Its
signature is its declaration: each parameter's type says what the argument is (a backend or
node name, a medium, a size, an on/off flag, one of some words), its docstring is its help,
and the adapters derive everything else from them: the ``.ctl`` text grammar and its usage
lines (:mod:`blkfs.frontends.ctl`), the choices of ``blkfs ctl``, the types and checks of the
QMP arguments that feed it (:mod:`blkfs.frontends.qmp.translate`). Adding a command is one
function here.

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

from blkfs import bitmaps
from blkfs.backend import BlockBackend, Medium, OptionError, parse_bool, parse_size
from blkfs.error_policy import Policy
from blkfs.errors import BlockError
from blkfs.info import DaemonStatus, ExportStatus, JobInfo
from blkfs.jobs.backup import BackupJob, BitmapMode
from blkfs.jobs.commit import commit as commit_job
from blkfs.jobs.manager import JobManager
from blkfs.jobs.mirror import MirrorJob, start_copy
from blkfs.jobs.snapshot import rollback as rollback_medium
from blkfs.jobs.snapshot import snapshot as snapshot_medium
from blkfs.jobs.snapshot import snapshot_onto
from blkfs.jobs.stream import stream as stream_job
from blkfs.layer import BlockLayer

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
    COUNT = "N"  # key=a whole number, at least 1
    BYTES = "BYTES"  # key=bytes, with QEMU's suffixes

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
Count = Annotated[int, Kind.COUNT]
Bytes = Annotated[int, Kind.BYTES]
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
            if self.kind in (Kind.SIZE, Kind.RATE, Kind.BYTES):
                return parse_size(raw)
            if self.kind is Kind.FLAG:
                return parse_bool(raw)
            if self.kind is Kind.COUNT:
                return _count(raw)
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
    on_jobs: bool = False
    """The handler takes the JobManager, not the BlockLayer."""
    needs: tuple[str, ...] = ()
    """What the handler takes from :class:`Commands` besides the layer (its keyword-only
    parameters, such as ``exporter``), never from users."""

    def param(self, name: str) -> Param:
        """The parameter ``name`` (as users spell it); KeyError if there is none."""
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(f"{self.name} has no parameter '{name}'")

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
                    Kind.COUNT: "N",
                    Kind.BYTES: "BYTES",
                }.get(param.kind, "on")
                word = f"{param.name}={value}"
                words.append(word if param.required else f"[{word}]")
        return " ".join(words)


def _count(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise TypeError("must be a whole number")
    try:
        count = int(raw)
    except ValueError:
        raise ValueError("must be a whole number") from None
    if count < 1:
        raise ValueError("must be at least 1")
    return count


JobEvents = Callable[[str, JobInfo], None]
"""Called with a QMP event name (JOB_STATUS_CHANGE, BLOCK_JOB_READY, ...) and the job as
query-jobs shows it."""

COMMANDS: dict[str, Command] = {}
"""Every command by name, in the order declared (the order frontends list them in)."""


def command(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Declare a command from its handler: ``async def NAME(layer, ..., *, exporter)``, or
    ``NAME(jobs, ...)`` for one that drives block jobs (its first parameter a
    :class:`JobManager`); the function's name (``_`` for ``-``), signature and docstring are
    the whole declaration. Keyword-only parameters are what the daemon hands the command
    layer (see :class:`Commands`), not arguments."""
    hints = get_type_hints(handler, include_extras=True)
    first, *rest = inspect.signature(handler).parameters.items()
    params, needs = [], []
    for name, parameter in rest:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
            needs.append(name)
        else:
            params.append(parameter_of(name, hints[name], parameter.default))
    name = handler.__name__.rstrip("_").replace("_", "-")
    COMMANDS[name] = Command(
        name,
        inspect.getdoc(handler) or "",
        tuple(params),
        handler,
        report=name.startswith("query-"),
        needs=tuple(needs),
        on_jobs=hints[first[0]] is JobManager,
    )
    return handler


def parameter_of(arg: str, hint: Any, default: Any) -> Param:
    """The parameter a handler declares as ``arg: hint = default`` (no default: required);
    TypeError if the hint is no kind of argument. Also for adapters that take arguments of
    their own in the same types (QMP's)."""
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


class Exporter(Protocol):
    """What serves NBD exports (the NBD frontend); the daemon hands it to :class:`Commands`,
    so that the export commands reach it without knowing it."""

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
        bitmap: str | None = None,
        tls_creds: str | None = None,
        tls: bool | None = None,
        tls_verify_peer: bool | None = None,
        tls_authz: str | None = None,
    ) -> None:
        """Serve ``backend`` at the address given, or on the default server; with its
        dirty bitmap ``bitmap`` as the metadata context ``qemu:dirty-bitmap:NAME``, and the
        TLS asked for (None: not said)."""

    async def remove(self, name: str, force: bool) -> None:
        """Stop serving the export ``name``, or every export of the backend ``name``."""

    def status(self) -> list[ExportStatus]:
        """Every export, its clients and its counters."""


class Commands:
    """Runs commands against a BlockLayer and its jobs, and keeps the last failures.

    The daemon hands it what commands drive besides the layer: its ``jobs`` (none: one of its
    own, whose jobs refuse to start, since nothing runs them) and the ``exporter`` that
    serves NBD exports (none: the export commands fail with ENOTSUP)."""

    def __init__(
        self, layer: BlockLayer, jobs: JobManager | None = None, exporter: Exporter | None = None
    ) -> None:
        self.layer = layer
        self.jobs = jobs or JobManager(layer)
        self.exporter = exporter
        self.errors: deque[str] = deque(maxlen=ERROR_HISTORY)

    async def run(self, name: str, args: Mapping[str, Any]) -> Any:
        """Run command ``name`` with ``args`` by parameter name (as users spell them); on
        failure record the message and raise it (as one line)."""
        try:
            command = COMMANDS.get(name)
            if command is None:
                raise BlockError(errno.EINVAL, f"unknown command '{name}'")
            typed = self._check(command, args)
            given = {need: getattr(self, need) for need in command.needs}
            first = self.jobs if command.on_jobs else self.layer
            return await command.handler(first, **typed, **given)
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

    def watch_jobs(self, listener: JobEvents) -> Callable[[], None]:
        """Have ``listener`` hear every job event; returns what stops it."""

        def heard(event: str, job: Any) -> None:
            listener(event, job.info())

        self.jobs.listeners.append(heard)
        return lambda: self.jobs.listeners.remove(heard)

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
    passthrough: bool = False,
) -> None:
    """A new backend with that medium, or an empty drive.

    on-change=error: files opened before a media change fail with ESTALE until opened
    again (default: they follow the new medium, as a drive's users do). werror and rerror:
    what a write or read the medium fails does (QEMU's): report it, ignore it, or stop
    (pause the backend until cont); enospc stops on a full host and reports the rest.
    passthrough=on: the kernel serves opens of the backend's file straight from the host
    file (FUSE passthrough) for raw over a file with werror=report; while such a file is
    open, every change of the backend is refused (EBUSY)."""
    await layer.create(
        name, medium, on_change=on_change, werror=werror, rerror=rerror, passthrough=passthrough
    )


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
    layer.find(name).set_policies(werror, rerror, on_change)


@command
async def cont(layer: BlockLayer, name: BackendName | None = None) -> None:
    """Resume a backend its error policy paused (every paused backend, with no name).

    Its held requests are retried; if they fail again, it pauses again."""
    for backend in [layer.find(name)] if name else list(layer):
        backend.cont()


@command
async def throttle(
    layer: BlockLayer,
    name: BackendName,
    bps_total: Rate = 0,
    bps_read: Rate = 0,
    bps_write: Rate = 0,
    iops_total: Rate = 0,
    iops_read: Rate = 0,
    iops_write: Rate = 0,
    bps_total_max: Rate = 0,
    bps_read_max: Rate = 0,
    bps_write_max: Rate = 0,
    iops_total_max: Rate = 0,
    iops_read_max: Rate = 0,
    iops_write_max: Rate = 0,
    bps_total_max_length: Count = 1,
    bps_read_max_length: Count = 1,
    bps_write_max_length: Count = 1,
    iops_total_max_length: Count = 1,
    iops_read_max_length: Count = 1,
    iops_write_max_length: Count = 1,
    group: str | None = None,
) -> None:
    """Limit the backend's I/O (QEMU's block_set_io_throttle): bytes (bps-) or requests
    (iops-) per second, in total or for reads or writes.

    A throttle filter goes in front of the medium (a change that keeps it), is retuned in
    place when it is there, and comes out when every limit is 0. LIMIT-max=RATE allows
    bursts at that rate for LIMIT-max-length seconds; backends of one group share a
    budget."""
    given = locals()  # the limits by argument name: the throttle filter's, with "_" for "-"
    limits: dict[str, Any] = {
        "limits." + key.replace("_", "-"): value
        for key, value in given.items()
        if key.startswith(("bps_", "iops_"))
    }
    if group is not None:
        limits["throttle-group"] = group
    backend = layer.find(name)
    tree = (await backend.status())["tree"]
    if tree is None:
        raise BlockError(errno.ENOMEDIUM, f"{name}: no medium to throttle")
    off = not any((bps_total, bps_read, bps_write, iops_total, iops_read, iops_write))
    if tree["driver"] == "throttle":
        if off:
            await backend.change({"node": tree["children"]["file"]["node-name"]})
        else:
            await layer.reopen(tree["node-name"], limits)
    elif not off:
        await backend.change({"driver": "throttle", **limits, "file": tree["node-name"]})


@command
async def query_status(layer: BlockLayer, *, exporter: Exporter | None) -> DaemonStatus:
    """The daemon and every backend: medium, size, users, driver tree, statistics.

    Deleted backends that users still hold open are listed too, and the NBD exports with
    their clients and counters."""
    return {
        "pid": os.getpid(),
        "image-dirs": layer.image_dirs,
        "backends": await layer.status(),
        "nodes": layer.added_nodes(),
        "exports": exporter.status() if exporter else [],
    }


# -- snapshots and block jobs ---------------------------------------------------------------

MirrorSync = Literal["full", "top", "none"]
BackupSync = Literal["full", "top", "incremental", "bitmap"]
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
    await snapshot_onto(layer, layer.find(name), overlay)


@command
async def rollback(layer: BlockLayer, name: BackendName, force: bool = False) -> None:
    """Drop what was written since the last snapshot (the active overlay is emptied).

    Refused while the backend is open for writing: a filesystem mounted from it must be
    unmounted first, its cache would not match the disk any more. force=on: even so."""
    await rollback_medium(layer.find(name), force)


@command
async def commit(
    jobs: JobManager,
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
    await jobs.launch(commit_job(jobs, jobs.layer.find(name), job_id, top, base, speed))


@command
async def stream(
    jobs: JobManager,
    name: BackendName,
    base: str | None = None,
    speed: Rate = 0,
    job_id: str | None = None,
) -> None:
    """A job copying what the backing files above base hold into the active image.

    The streamed files then leave the chain (all of them without base=: the image stands
    alone)."""
    await jobs.launch(stream_job(jobs, jobs.layer.find(name), job_id, base, speed))


@command
async def mirror(
    jobs: JobManager,
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
        jobs,
        jobs.layer.find(name),
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
    jobs: JobManager,
    name: BackendName,
    target: HostPath,
    sync: BackupSync = "full",
    format_: ImageFormat | None = None,
    existing: bool = False,
    speed: Rate = 0,
    job_id: str | None = None,
    bitmap: str | None = None,
    bitmap_mode: BitmapMode | None = None,
) -> None:
    """A job copying the medium as it is now to a new image at TARGET, while it is used.

    Writes meanwhile first save the old data to the target: it ends as a copy of the moment
    the job started. TARGET node=NODE-NAME: a node added with node-add, unused (QEMU's
    blockdev-backup). sync=incremental bitmap=B: only what dirty bitmap B marks, and B
    starts afresh if the job succeeds; sync=bitmap with bitmap-mode=on-success|always|never
    says what B keeps (QEMU's)."""
    await start_copy(
        BackupJob,
        jobs,
        jobs.layer.find(name),
        job_id,
        target,
        format_,
        sync,
        "background",
        existing,
        speed,
        {"bitmap": bitmap, "bitmap_mode": bitmap_mode},
    )


@command
async def job_pause(jobs: JobManager, job: JobId) -> None:
    """Pause a job (its copy; the backend keeps serving)."""
    jobs.find(job).pause()


@command
async def job_resume(jobs: JobManager, job: JobId) -> None:
    """Resume a paused job."""
    jobs.find(job).resume()


@command
async def job_cancel(jobs: JobManager, job: JobId) -> None:
    """Stop a job; the backend stays as it was (a ready mirror keeps its target in sync
    up to now, without switching)."""
    jobs.find(job).cancel()


@command
async def job_complete(jobs: JobManager, job: JobId) -> None:
    """Finish a ready mirror or active commit: switch the backend to its target."""
    jobs.find(job).complete()


@command
async def job_set_speed(jobs: JobManager, job: JobId, speed: Rate) -> None:
    """Limit a job's copy to RATE bytes per second (0: no limit)."""
    jobs.find(job).set_speed(speed)


@command
async def job_dismiss(jobs: JobManager, job: JobId) -> None:
    """Forget a concluded job."""
    jobs.dismiss(job)


@command
async def query_jobs(jobs: JobManager) -> list[JobInfo]:
    """Every job: type, backend, status, progress, speed, error."""
    return jobs.status()


# -- exports --------------------------------------------------------------------------------

ExportOrBackend = Annotated[str, Kind.EXPORT]


def _serving(exporter: Exporter | None) -> Exporter:
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
    bitmap: str | None = None,
    tls_creds: str | None = None,
    tls: bool | None = None,
    tls_verify_peer: bool | None = None,
    tls_authz: str | None = None,
    *,
    exporter: Exporter | None,
) -> None:
    """Serve the backend over NBD, to QEMU, nbd-client, nbdcopy or another blkfs.

    On the mount's NBD server (blkfs mount --nbd), or on a unix socket (socket=PATH, mode
    0600 unless mode= says otherwise) or TCP address (host= port=) of its own. Read-only
    unless writable=on; clients ask for it by export-name (default: NAME). bitmap=B: the
    medium's dirty bitmap B is served as the metadata context qemu:dirty-bitmap:B (as
    qemu-nbd -B), busy while exported. tls-creds=DIR (ca-cert.pem, server-cert.pem,
    server-key.pem, as QEMU's tls-creds-x509) requires clients to use TLS, tls-verify-peer=on
    also a client certificate signed by the CA, tls-authz=FILE also one whose distinguished
    name a line of FILE matches (a glob); a TCP address of its own needs tls-creds or an
    explicit tls=off."""
    backend = layer.find(name)
    if socket is not None and (host is not None or port is not None):
        raise BlockError(errno.EINVAL, "export: give socket=PATH or host= port=, not both")
    if writable and backend.read_only:
        raise BlockError(errno.EROFS, f"{name}: read-only medium; export it without writable=on")
    await _serving(exporter).add(
        backend,
        export_name or name,
        writable,
        socket=socket,
        host=host,
        port=port,
        mode=mode,
        bitmap=bitmap,
        tls_creds=tls_creds,
        tls=tls,
        tls_verify_peer=tls_verify_peer,
        tls_authz=tls_authz,
    )


@command
async def export_del(
    layer: BlockLayer,
    name: ExportOrBackend,
    force: bool = False,
    *,
    exporter: Exporter | None,
) -> None:
    """Stop serving an export, named by its export name or by its backend's name.

    Refused while clients are connected (EBUSY) unless force=on, which disconnects them
    once their requests in flight are answered."""
    await _serving(exporter).remove(name, force)


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


# -- dirty bitmaps --------------------------------------------------------------------------


@command
async def bitmap_add(
    layer: BlockLayer,
    node: NodeName,
    name: str,
    granularity: Bytes | None = None,
    persistent: bool = False,
    disabled: bool = False,
) -> None:
    """A dirty bitmap on the node (QEMU's block-dirty-bitmap-add): from now on it marks
    what every write, write-zeroes and discard there changes, in chunks of granularity
    (default 64K). persistent=on: stored in the image (qcow2) and loaded with it again;
    disabled=on: it records nothing until bitmap-enable."""
    await bitmaps.add(layer, node, name, granularity, persistent, disabled)


@command
async def bitmap_remove(layer: BlockLayer, node: NodeName, name: str) -> None:
    """Drop a dirty bitmap (from its image too, if persistent)."""
    await bitmaps.remove(layer, node, name)


@command
async def bitmap_clear(layer: BlockLayer, node: NodeName, name: str) -> None:
    """Mark the whole bitmap clean."""
    bitmaps.clear(layer, node, name)


@command
async def bitmap_enable(layer: BlockLayer, node: NodeName, name: str) -> None:
    """The bitmap records writes again."""
    bitmaps.enable(layer, node, name, True)


@command
async def bitmap_disable(layer: BlockLayer, node: NodeName, name: str) -> None:
    """The bitmap stops recording (what it holds stays)."""
    bitmaps.enable(layer, node, name, False)


@command
async def bitmap_merge(layer: BlockLayer, node: NodeName, target: str, bitmaps_: str) -> None:
    """Mark in bitmap TARGET what the bitmaps named (comma-separated, of the same node)
    have marked."""
    bitmaps.merge(layer, node, target, [b for b in bitmaps_.split(",") if b])
