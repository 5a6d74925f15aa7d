"""The ``.ctl`` text grammar: an adapter from one line of text to the command layer.

Ground rules: one write to ``.ctl/COMMAND`` is one command (a trailing newline allowed); it
succeeds only if the command did, and a failed command changes nothing and raises
:class:`BlockError` with the errno the write fails with. The first word is the command's
first argument (a backend or node name). For a command that takes options (create, change,
insert, reopen), the rest of the line is one option string in any spelling (a path, dotted
keys, JSON), out of which the command's own arguments are taken (``force=on``,
``on-change=error``); for the others, the rest is words: a size, then ``key=value`` words.
Everything about a command (its arguments, their types, its usage line) comes from the
command table (:mod:`blkfs.commands`); nothing here knows FUSE, so it is tested with plain
bytes.
"""

from __future__ import annotations

import errno
import json
from typing import Any

from blkfs.backend import parse_options
from blkfs.commands import COMMANDS, POSITIONAL, Command, Commands, Kind
from blkfs.errors import BlockError
from blkfs.frontends.text import human_size, table
from blkfs.info import BackendStatus, DaemonStatus, ExportStatus, JobInfo, NodeTree

MAX_COMMAND = 64 * 1024
VERBS = tuple(name for name, command in COMMANDS.items() if not command.report)
"""Writable control files, in the order ``ls .ctl`` shows them."""
REPORTS = ("status", "status.json", "jobs", "jobs.json", "error")
"""Readable control files."""


def usage(verb: str) -> str:
    return f"usage: echo '{COMMANDS[verb].usage()}' > .ctl/{verb}"


def parse(verb: str, payload: bytes) -> dict[str, Any]:
    """The arguments of one control write, by name; BlockError(EINVAL) says what was wrong
    and what is right."""
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
        raise BlockError(errno.EINVAL, f"one command per write ({usage(verb)})")
    first, _, rest = text.strip().partition(" ")
    command = COMMANDS[verb]
    if not first:
        if command.params[0].required:
            raise BlockError(errno.EINVAL, f"no name given ({usage(verb)})")
        return {}
    args: dict[str, Any] = {command.params[0].name: first}
    options = next((p for p in command.params if p.kind in (Kind.MEDIUM, Kind.NODE_OPTIONS)), None)
    if options is None:
        args.update(_words(command, rest.split()))
    elif rest.strip():
        tree = parse_options(rest)
        for param in command.params[1:]:
            if param is not options and param.name in tree:
                args[param.name] = tree.pop(param.name)
        if tree:
            args[options.name] = tree
    if options is not None and options.required and options.name not in args:
        raise BlockError(errno.EINVAL, f"options missing ({usage(verb)})")
    return args


def _words(command: Command, words: list[str]) -> dict[str, str]:
    """Positional words (a size, a path) and ``key=value`` words after the name."""
    positional = [p for p in command.params[1:] if p.kind in POSITIONAL]
    named = {p.name for p in command.params[1:] if p.kind not in POSITIONAL}
    args = {}
    for word in words:
        key, sep, value = word.partition("=")
        if sep and key in named:
            args[key] = value
        elif positional:  # a path, or a target's options (driver=...)
            args[positional.pop(0).name] = word
        else:
            raise BlockError(
                errno.EINVAL, f"takes only {command.usage()} (got '{word}'; {usage(command.name)})"
            )
    return args


class ControlFiles:
    """What ``.ctl/`` serves: a write runs a command, a read gives a report."""

    def __init__(self, commands: Commands) -> None:
        self.commands = commands

    async def write(self, verb: str, payload: bytes) -> None:
        """Run one command; on failure it is recorded (``.ctl/error``) and raised."""
        try:
            args = parse(verb, payload)
        except BlockError as exc:
            raise self.commands.record(verb, exc) from None
        await self.commands.run(verb, args)

    async def read(self, report: str) -> str:
        if report == "error":
            return "".join(line + "\n" for line in self.commands.errors)
        if report.startswith("jobs"):
            jobs: list[JobInfo] = await self.commands.run("query-jobs", {})
            return json.dumps(jobs, indent=2) + "\n" if report == "jobs.json" else format_jobs(jobs)
        status: DaemonStatus = await self.commands.run("query-status", {})
        if report == "status.json":
            return json.dumps(status, indent=2) + "\n"
        return format_status(status["backends"]) + format_exports(status["exports"])


def format_status(backends: list[BackendStatus]) -> str:
    """The human table of ``.ctl/status``: one row per backend, then each driver tree."""
    header = ("BACKEND", "MEDIUM", "RO", "SIZE", "OPEN", "ROOT")
    rows = [header]
    for b in backends:
        tree = b["tree"]
        name = b["name"] + (" (deleted)" if b["deleted"] else "")
        rows.append(
            (
                name,
                "yes" if b["medium"] else "no",
                "yes" if b["read-only"] else "no",
                human_size(b["size"]),
                str(b["open"]),
                f"{tree['driver']} {tree['node-name']}" if tree else "-",
            )
        )
    lines = table(rows)
    lines.extend(
        f"{b['name']}: {b['paused']['reason']}; 'cont {b['name']}' retries it"
        for b in backends
        if b["paused"]
    )
    lines.extend(_passthrough_line(b) for b in backends if b["passthrough"]["on"])
    for b in backends:
        if b["tree"]:
            lines.append("")
            lines.append(f"{b['name']}:")
            lines.extend(_tree_lines(b["tree"], "  ", "root"))
    return "\n".join(lines) + "\n"


def _passthrough_line(b: BackendStatus) -> str:
    p = b["passthrough"]
    if p["open"]:
        return f"{b['name']}: passthrough=on, {p['open']} file(s) served by the kernel"
    return f"{b['name']}: passthrough=on" + (f", not now: {p['why-not']}" if p["why-not"] else "")


def format_exports(exports: list[ExportStatus]) -> str:
    """The NBD exports under ``.ctl/status``: one row each, then a line per client."""
    if not exports:
        return ""
    rows = [
        ("EXPORT", "BACKEND", "ADDRESS", "RW", "CLIENTS", "CONNECTIONS", "ERRORS"),
        *(
            (
                e["name"] + (" (withdrawn)" if e["retired"] else ""),
                e["backend"],
                e["address"],
                "yes" if e["writable"] else "no",
                str(len(e["clients"])),
                str(e["stats"]["connections"]),
                str(e["stats"]["errors"]),
            )
            for e in exports
        ),
    ]
    lines = ["", *table(rows)]
    for e in exports:
        lines.extend(
            f"{e['name']}: client {c['peer']}, {c['in-flight']} in flight" for c in e["clients"]
        )
    return "\n".join(lines) + "\n"


def format_jobs(jobs: list[JobInfo]) -> str:
    """The table of ``.ctl/jobs``: one row per job."""
    rows = [("JOB", "TYPE", "BACKEND", "STATUS", "PROGRESS", "SPEED", "ERROR")]
    for job in jobs:
        done, total = job["current-progress"], job["total-progress"]
        rows.append(
            (
                job["id"],
                job["type"],
                job["device"],
                job["status"],
                f"{human_size(done)}/{human_size(total)}"
                f" ({100 * done // total if total else 100}%)",
                f"{human_size(job['speed'])}/s" if job["speed"] else "-",
                job["error"] or "-",
            )
        )
    return "\n".join(table(rows)) + "\n"


def _tree_lines(node: NodeTree, indent: str, role: str) -> list[str]:
    options = [f"{k}={v}" for k, v in node["options"].items() if k not in ("node-name", "driver")]
    details = [
        f"{k}={v}"
        for k, v in node["info"].items()
        if isinstance(v, (str, int, float))
        and not isinstance(v, bool)
        and node["options"].get(k) != v
    ]
    flags = " read-only" if node["read-only"] else ""
    line = (
        f"{indent}{role}: {node['driver']} [{node['node-name']}] {human_size(node['size'])}{flags}"
    )
    if options:
        line += " (" + ",".join(options) + ")"
    if details:
        line += " " + " ".join(details)
    if node["in-flight"]:
        line += f" in-flight={node['in-flight']}"
        if node["oldest-ms"] is not None:
            line += f" oldest={node['oldest-ms']}ms"
    lines = [line]
    for child_role, child in node["children"].items():
        lines.extend(_tree_lines(child, indent + "  ", child_role))
    return lines
