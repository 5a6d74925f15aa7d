"""``blkfs ctl MOUNTPOINT COMMAND [ARGS]``: one ``.ctl`` command of a mount from the shell, or
one of its reports read. Relative file names are made absolute here, where the caller's
working directory is known; the daemon's reason is the error when the command fails."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from blkfs.backend import parse_options
from blkfs.cli.errors import UsageError
from blkfs.commands import COMMANDS
from blkfs.errors import BlockError
from blkfs.frontends import ctl

TREE_VERBS = ("create", "change", "insert")
"""Commands whose options may name host files."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commands = sub.add_parser(
        "ctl",
        help="send a .ctl command (or read a report)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(
            f"  {verb} {COMMANDS[verb].usage()}\n      {COMMANDS[verb].help.splitlines()[0]}"
            for verb in ctl.VERBS
        )
        + f"\nreports: {', '.join(ctl.REPORTS)}",
    )
    commands.add_argument("mountpoint")
    commands.add_argument("command", choices=ctl.VERBS + ctl.REPORTS)
    commands.add_argument("args", nargs="*")
    commands.set_defaults(func=cmd_ctl)


def cmd_ctl(args: argparse.Namespace) -> int:
    folder = Path(args.mountpoint, ".ctl")
    if args.command in ctl.REPORTS:
        try:
            sys.stdout.write(folder.joinpath(args.command).read_text())
        except OSError as exc:
            raise UsageError(f"cannot read {folder / args.command}: {exc.strerror}") from None
        return 0
    words = [
        f"{key}={os.path.abspath(path)}"
        if args.command == "export" and key in ("socket", "tls-creds", "tls-authz") and sep
        else word
        for word in args.args
        for key, sep, path in [word.partition("=")]
    ]
    text = absolute_filenames(" ".join(words)) if args.command in TREE_VERBS else " ".join(words)
    try:
        with open(folder / args.command, "wb", buffering=0) as f:
            f.write(text.encode())
    except OSError as exc:
        try:
            lines = folder.joinpath("error").read_text().splitlines()
        except OSError:
            lines = []
        raise UsageError(lines[-1] if lines else f"{args.command}: {exc.strerror}") from None
    return 0


def absolute_filenames(text: str) -> str:
    """``NAME OPTIONS`` with every relative ``filename`` made absolute here: the daemon
    resolves names in its own working directory, not the caller's. Options that do not
    parse go as they are, for the daemon to say what is wrong."""
    name, _, options = text.strip().partition(" ")
    if not options.strip():
        return text
    try:
        tree = parse_options(options)
    except BlockError:
        return text
    if not absolutize(tree):
        return text
    return f"{name} {json.dumps(tree)}"


def absolutize(tree: dict[str, Any]) -> bool:
    """Make every relative ``filename`` of an options tree absolute, in place; whether any
    was."""
    changed = False
    for key, value in tree.items():
        if isinstance(value, dict):
            changed |= absolutize(value)
        elif key == "filename" and isinstance(value, str) and not os.path.isabs(value):
            tree[key] = os.path.abspath(value)
            changed = True
    return changed
