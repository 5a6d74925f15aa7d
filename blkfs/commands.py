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
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from blkfs.backend import BlockLayer, Medium, OptionError, parse_bool, parse_size
from blkfs.errors import BlockError

log = logging.getLogger("blkfs.commands")

ERROR_HISTORY = 32


class Kind(Enum):
    """What an argument is, beyond its Python type; the value is how usage lines show it."""

    NAME = "NAME"            # a backend's name: the first word
    NODE = "NODE-NAME"       # a node's name: the first word
    MEDIUM = "OPTIONS"       # the options of a medium (or node=NAME): the rest of the line
    NODE_OPTIONS = "OPTIONS "  # option values for a live node (reopen); shown as OPTIONS
    SIZE = "SIZE"            # bytes, with QEMU's suffixes
    FLAG = "on|off"          # key=on|off
    CHOICE = "word"          # key=one-of-some-words

    @property
    def word(self) -> str:
        return str(self.value).strip()


BackendName = Annotated[str, Kind.NAME]
NodeName = Annotated[str, Kind.NODE]
MediumOptions = Annotated[Medium, Kind.MEDIUM]
NodeOptions = Annotated[Mapping[str, Any], Kind.NODE_OPTIONS]
Size = Annotated[int, Kind.SIZE]
OnChange = Literal["follow", "error"]


@dataclass(frozen=True)
class Param:
    """One argument of a command, as its handler declares it."""

    name: str
    """As users spell it: ``on-change`` for the handler's ``on_change``."""
    kind: Kind
    required: bool
    default: Any
    choices: tuple[str, ...] = ()

    def convert(self, command: str, raw: Any) -> Any:
        """The typed value of ``raw``; EINVAL naming the argument if it is not one."""
        try:
            if self.kind is Kind.SIZE:
                return parse_size(raw)
            if self.kind is Kind.FLAG:
                return parse_bool(raw)
        except (TypeError, ValueError) as exc:
            raise BlockError(errno.EINVAL, f"{command}: {self.name} {exc} (got {raw!r})") \
                from None
        if self.kind is Kind.CHOICE and raw not in self.choices:
            raise BlockError(errno.EINVAL, f"{command}: {self.name} must be "
                                           f"{' or '.join(self.choices)} (got {raw!r})")
        if self.kind in (Kind.NAME, Kind.NODE) and not isinstance(raw, str):
            raise BlockError(errno.EINVAL, f"{command}: {self.name} must be a name")
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
            if param.kind in (Kind.NAME, Kind.NODE, Kind.MEDIUM, Kind.NODE_OPTIONS, Kind.SIZE):
                word = param.kind.word
                words.append(word if param.required else f"[{word}]")
            else:
                value = "|".join(param.choices) if param.kind is Kind.CHOICE else "on"
                words.append(f"[{param.name}={value}]")
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
    COMMANDS[name] = Command(name, inspect.getdoc(handler) or "", tuple(params), handler,
                             report=name.startswith("query-"))
    return handler


def _param(name: str, hint: Any, default: Any) -> Param:
    required = default is inspect.Parameter.empty
    spelled = name.replace("_", "-")
    if get_origin(hint) in (Union, UnionType):  # X | None: optional, as its default says
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if get_origin(hint) is Annotated:
        return Param(spelled, get_args(hint)[1], required, None if required else default)
    if get_origin(hint) is Literal:
        return Param(spelled, Kind.CHOICE, required, default, tuple(get_args(hint)))
    if hint is bool:
        return Param(spelled, Kind.FLAG, required, default)
    raise TypeError(f"command parameter {name}: no argument kind for {hint!r}")


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
            raise OptionError(f"{command.name} takes no argument '{unknown[0]}' "
                              f"(usage: {command.usage()})")
        typed = {}
        for param in command.params:
            if param.name in args and args[param.name] is not None:
                typed[param.name.replace("-", "_")] = param.convert(command.name,
                                                                   args[param.name])
            elif param.required:
                raise BlockError(errno.EINVAL, f"{command.name}: {param.kind.word} missing "
                                               f"(usage: {command.usage()})")
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
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


# -- the commands ---------------------------------------------------------------------------

@command
async def create(layer: BlockLayer, name: BackendName, medium: MediumOptions | None = None,
                 on_change: OnChange = "follow") -> None:
    """A new backend with that medium, or an empty drive.

    on-change=error: files opened before a media change fail with ESTALE until opened
    again (default: they follow the new medium, as a drive's users do)."""
    await layer.create(name, medium, on_change=on_change)


@command
async def delete(layer: BlockLayer, name: BackendName, force: bool = False) -> None:
    """Remove the backend's name; open files keep working until closed.

    force=on: even if the final flush fails."""
    await layer.delete(name, force=force)


@command
async def change(layer: BlockLayer, name: BackendName, medium: MediumOptions,
                 force: bool = False) -> None:
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
async def resize(layer: BlockLayer, name: BackendName, size: Size | None = None,
                 shrink: bool = False) -> None:
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
async def query_status(layer: BlockLayer) -> dict[str, Any]:
    """The daemon and every backend: medium, size, users, driver tree, statistics.

    Deleted backends that users still hold open are listed too."""
    return {"pid": os.getpid(), "image-dirs": layer.image_dirs,
            "backends": await layer.status()}
