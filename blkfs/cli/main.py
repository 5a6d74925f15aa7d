"""``blkfs``: the parser and the dispatch to the verbs.

Each verb lives in the module :data:`VERBS` names, and a command line imports only the module
of the verb it names: ``blkfs umount`` or ``blkfs ctl`` needs none of the FUSE, NBD or QMP
frontends, and ``blkfs --version`` none of the block layer. Help, the man page and shell
completion see every verb.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Collection
from importlib.metadata import version
from pkgutil import resolve_name
from typing import NoReturn

from blkfs.cli import completion, mount_helper
from blkfs.cli.errors import JobError, UsageError
from blkfs.errors import BlockError

JOB_VERBS = ("snapshot", "rollback", "commit", "stream", "mirror", "backup", "bitmap", "job")
VERBS = {
    "mount": "blkfs.cli.mount:add_parser",
    "umount": "blkfs.cli.umount:add_parser",
    "ctl": "blkfs.cli.control:add_parser",
    **dict.fromkeys(JOB_VERBS, "blkfs.cli.jobs:add_parsers"),
    "image": "blkfs.cli.image:add_parser",
    **dict.fromkeys(("volume-plugin", "volume"), "blkfs.frontends.volumes.command:add_parsers"),
}
"""Every verb, in the order help lists them, and the function that declares it (with the
other verbs of its module) on the verbs' subparsers."""


def fail(message: str, status: int = 1) -> NoReturn:
    print(f"blkfs: {message}", file=sys.stderr)
    sys.exit(status)


def parser(verbs: Collection[str] = tuple(VERBS)) -> argparse.ArgumentParser:
    """The ``blkfs`` parser with ``verbs`` (and the other verbs of their modules) declared
    in full, the rest by name only; by default every verb in full, as help, the man page
    and shell completion show them."""
    top = argparse.ArgumentParser(
        prog="blkfs",
        description="Serve block backends (QEMU-style trees of driver nodes) as the files of a "
        "FUSE mount; take snapshots, run block jobs and handle image files from the shell.",
        epilog="As a mount helper (mount -t fuse.blkfs, /etc/fstab): "
        "blkfs CONFIG MOUNTPOINT [-o OPTIONS].",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {version('blkfs')}")
    sub = top.add_subparsers(dest="cmd", required=True)
    full = {VERBS[verb] for verb in verbs}
    done: set[str] = set()
    for verb, declare in VERBS.items():
        if declare not in full:
            sub.add_parser(verb)  # named, so that a usage line lists every verb
        elif declare not in done:
            resolve_name(declare)(sub)
            done.add(declare)
    completion.add_to(top)
    return top


def needed(argv: list[str]) -> tuple[str, ...]:
    """The verbs a command line needs declared in full: the one it names; none to print
    the version; else every one (for help and completion)."""
    words = [word for word in argv if not word.startswith("-")]
    if words and words[0] in VERBS:
        return (words[0],)
    return () if argv == ["--version"] else tuple(VERBS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if mount_helper.is_helper_call(argv, set(VERBS)):
            argv = mount_helper.mount_argv(argv)
    except mount_helper.HelperError as exc:
        fail(str(exc))
    args = parser(needed(argv)).parse_args(argv)
    try:
        status: int = args.func(args)
        sys.stdout.flush()  # a pipe's buffer: a reader that went away shows here, not at exit
        return status
    except (UsageError, BlockError, JobError) as exc:
        fail(str(exc))
    except BrokenPipeError:  # the reader went away (| head): end quietly, as other tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # a shell's status for SIGPIPE
    except KeyboardInterrupt:
        return 130
