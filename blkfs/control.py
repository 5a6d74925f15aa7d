"""The ``.ctl`` command language, parsed and executed over the backend API.

Ground rules: one write is one command (``NAME`` or ``NAME OPTIONS``, a trailing newline
allowed); it succeeds only if the command did, and a failed command changes nothing and
raises :class:`BlockError` with the errno the write fails with. Messages of failures are kept
for ``.ctl/error``. Nothing here knows about FUSE, so it is tested with plain bytes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from blkfs.backend import BlockLayer, parse_bool, parse_options, parse_size
from blkfs.errors import BlockError

log = logging.getLogger("blkfs.control")

MAX_COMMAND = 64 * 1024
ERROR_HISTORY = 32

COMMANDS = ("create", "delete", "change", "eject", "insert", "reopen", "resize")
"""Writable control files, in the order ``ls .ctl`` shows them."""
REPORTS = ("status", "status.json", "error")
"""Readable control files."""

USAGE = {
    "create": "NAME [OPTIONS]",
    "delete": "NAME [force=on]",
    "change": "NAME OPTIONS[,force=on]",
    "eject": "NAME [force=on]",
    "insert": "NAME OPTIONS",
    "reopen": "NODE-NAME OPTIONS",
    "resize": "NAME [SIZE] [shrink=on]",
}


FLAGS = {"delete": ("force",), "eject": ("force",)}
"""Verbs that take only ``key=on|off`` words after the name."""


@dataclass(frozen=True)
class Command:
    verb: str
    name: str
    options: str | None
    flags: dict[str, bool]


def parse_command(verb: str, payload: bytes) -> Command:
    """Decode one control write; BlockError(EINVAL) says what was wrong and what is right."""
    usage = f"usage: echo '{USAGE[verb]}' > .ctl/{verb}"
    if len(payload) > MAX_COMMAND:
        raise BlockError(errno.EINVAL, f"command longer than {MAX_COMMAND} bytes")
    if b"\0" in payload:
        raise BlockError(errno.EINVAL, "command contains a NUL byte")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise BlockError(errno.EINVAL, "command is not valid UTF-8") from None
    text = text.rstrip("\r\n")
    if "\n" in text:
        raise BlockError(errno.EINVAL, f"one command per write ({usage})")
    name, _, options = text.strip().partition(" ")
    options = options.strip() or None
    if not name:
        raise BlockError(errno.EINVAL, f"no name given ({usage})")
    needs_options = "OPTIONS" in USAGE[verb] and "[OPTIONS]" not in USAGE[verb]
    if needs_options and options is None:
        raise BlockError(errno.EINVAL, f"options missing ({usage})")
    return Command(verb, name, options, flags(verb, options, FLAGS[verb])
                   if verb in FLAGS else {})


def flags(verb: str, text: str | None, known: tuple[str, ...]) -> dict[str, bool]:
    """``key=on|off`` words after a name (``force=on``), each of ``known``; EINVAL else."""
    given = {key: False for key in known}
    for word in (text or "").split():
        key, sep, value = word.partition("=")
        if not sep or key not in known:
            raise BlockError(errno.EINVAL, f"takes only a name and {' '.join(known)}=on "
                                           f"(got '{word}'; usage: {USAGE[verb]})")
        try:
            given[key] = parse_bool(value)
        except ValueError:
            raise BlockError(errno.EINVAL, f"{key} must be on or off (got '{value}')") from None
    return given


class ControlPlane:
    """Runs control commands against a BlockLayer and keeps the last error messages."""

    def __init__(self, layer: BlockLayer) -> None:
        self.layer = layer
        self.errors: deque[str] = deque(maxlen=ERROR_HISTORY)
        self._handlers: dict[str, Callable[[Command], Awaitable[None]]] = {
            "create": self._create, "delete": self._delete, "change": self._change,
            "eject": self._eject, "insert": self._insert, "reopen": self._reopen,
            "resize": self._resize,
        }

    async def run(self, verb: str, payload: bytes) -> None:
        """Execute one command; on failure record the message and re-raise."""
        try:
            command = parse_command(verb, payload)
            await self._handlers[verb](command)
        except BlockError as exc:
            raise self.record(verb, exc) from None

    def record(self, what: str, exc: BlockError) -> BlockError:
        """Keep a failure's message for ``.ctl/error`` and the log (also for failures a
        frontend met outside a command, such as a refused truncate); returns the error to
        raise, its message made one line."""
        text = one_line(str(exc))
        message = f"{what}: {text} [{errno.errorcode.get(exc.errno, exc.errno)}]"
        self.errors.append(message)
        log.warning("%s failed: %s", what, message)
        return exc if text == str(exc) else BlockError(exc.errno, text)

    async def _create(self, cmd: Command) -> None:
        await self.layer.create(cmd.name, cmd.options)

    async def _delete(self, cmd: Command) -> None:
        await self.layer.delete(cmd.name, **cmd.flags)

    async def _change(self, cmd: Command) -> None:
        tree = parse_options(_given(cmd.options))
        try:
            force = parse_bool(tree.pop("force", False))
        except ValueError:
            raise BlockError(errno.EINVAL, "force must be on or off") from None
        await self.layer.find(cmd.name).change(tree, force=force)

    async def _eject(self, cmd: Command) -> None:
        await self.layer.find(cmd.name).eject(**cmd.flags)

    async def _resize(self, cmd: Command) -> None:
        words = (cmd.options or "").split()
        size = words.pop(0) if words and "=" not in words[0] else None
        shrink = flags("resize", " ".join(words), ("shrink",))["shrink"]
        backend = self.layer.find(cmd.name)
        if size is None:
            if shrink:
                raise BlockError(errno.EINVAL, f"shrink=on needs a size ({USAGE['resize']})")
            await backend.refresh_size()
            return
        try:
            length = parse_size(size)
        except ValueError as exc:
            raise BlockError(errno.EINVAL, f"size '{size}': {exc}") from None
        await backend.truncate(length, shrink=shrink)

    async def _insert(self, cmd: Command) -> None:
        await self.layer.find(cmd.name).insert(_given(cmd.options))

    async def _reopen(self, cmd: Command) -> None:
        await self.layer.reopen(cmd.name, _given(cmd.options))

    # -- reports -------------------------------------------------------------------------

    async def status(self) -> list[dict[str, Any]]:
        return await self.layer.status()

    async def status_json(self) -> str:
        return json.dumps({"pid": os.getpid(), "image-dirs": self.layer.image_dirs,
                           "backends": await self.status()}, indent=2) + "\n"

    async def status_text(self) -> str:
        return format_status(await self.status())

    def error_text(self) -> str:
        return "".join(line + "\n" for line in self.errors)


def one_line(text: str) -> str:
    """``text`` with every unprintable character escaped, so that a message quoting user
    input stays one line in ``.ctl/error`` and the log (no CR, LF, NUL or Unicode line
    separators)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _given(options: str | None) -> str:
    assert options is not None, "parse_command guarantees options for this verb"
    return options


def format_status(backends: list[dict[str, Any]]) -> str:
    """The human table of ``.ctl/status``: one row per backend, then each driver tree."""
    header = ("BACKEND", "MEDIUM", "RO", "SIZE", "OPEN", "ROOT")
    rows = [header]
    for b in backends:
        tree = b["tree"]
        rows.append((b["name"], "yes" if b["medium"] else "no", "yes" if b["read-only"] else "no",
                     human_size(b["size"]), str(b["open"]),
                     f"{tree['driver']} {tree['node-name']}" if tree else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for b in backends:
        if b["tree"]:
            lines.append("")
            lines.append(f"{b['name']}:")
            lines.extend(_tree_lines(b["tree"], "  ", "root"))
    return "\n".join(lines) + "\n"


def _tree_lines(node: dict[str, Any], indent: str, role: str) -> list[str]:
    options = [f"{k}={v}" for k, v in node["options"].items()
               if k not in ("node-name", "driver")]
    details = [f"{k}={v}" for k, v in node["info"].items()
               if isinstance(v, (str, int, float)) and not isinstance(v, bool)
               and node["options"].get(k) != v]
    flags = " read-only" if node["read-only"] else ""
    line = (f"{indent}{role}: {node['driver']} [{node['node-name']}] "
            f"{human_size(node['size'])}{flags}")
    if options:
        line += " (" + ",".join(options) + ")"
    if details:
        line += " " + " ".join(details)
    lines = [line]
    for child_role, child in node["children"].items():
        lines.extend(_tree_lines(child, indent + "  ", child_role))
    return lines


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{size} B" if size < 1024 else f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
