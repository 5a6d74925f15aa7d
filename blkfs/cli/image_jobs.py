"""``blkfs image commit``, ``rebase`` and ``convert``: qemu-img's verbs that copy data, run
as the daemon's block jobs on a backend in this process (as qemu-img runs QEMU's commit
job), through the same commands a mount takes; and ``bitmap``, qemu-img's offline bitmap
verbs, through the mount's bitmap commands."""

from __future__ import annotations

import argparse
import errno
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from blkfs.backend import parse_options
from blkfs.cli import progress
from blkfs.commands import Commands
from blkfs.errors import BlockError
from blkfs.image import create_image, image_info, is_volume_name, set_backing_file
from blkfs.info import JobInfo
from blkfs.jobs.manager import JobManager
from blkfs.layer import BlockLayer

NAME = "image"
"""The in-process backend's name (and so its job's id)."""
NEW_BASE = "new-base"
"""The backend (and node) of the image a safe rebase compares with."""


def add_parsers(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    commit = verbs.add_parser("commit", help="merge an overlay into its backing file")
    commit.add_argument(
        "-b",
        dest="base",
        help="commit down into this image of the chain (default: the backing file)",
    )
    commit.add_argument(
        "-d",
        dest="keep",
        action="store_true",
        help="leave the overlay as it is (default: emptied afterwards)",
    )
    commit.add_argument("-p", dest="progress", action="store_true", help="show progress")
    commit.add_argument("file")
    commit.set_defaults(func=cmd_commit)

    rebase = verbs.add_parser("rebase", help="give an image another backing file")
    rebase.add_argument(
        "-b",
        dest="backing",
        required=True,
        help="the new backing file ('' for none), relative to FILE's directory",
    )
    rebase.add_argument("-F", dest="backing_format", help="its format (default: probed)")
    rebase.add_argument(
        "-u",
        dest="unsafe",
        action="store_true",
        help="only rewrite the header (the new file must hold the same data)",
    )
    rebase.add_argument("-p", dest="progress", action="store_true", help="show progress")
    rebase.add_argument("file")
    rebase.set_defaults(func=cmd_rebase)

    convert = verbs.add_parser("convert", help="copy an image (and its chain) into a new one")
    convert.add_argument("-f", dest="format", help="the source's format (default: probed)")
    convert.add_argument("-O", dest="output_format", default="raw", choices=("raw", "qcow2"))
    convert.add_argument(
        "-t",
        dest="cache",
        default="writeback",
        choices=CACHE_MODES,
        help="the target's cache mode, as qemu-img's: writeback flushes it at the end "
        "(the default; qemu-img's is unsafe, which never does), none bypasses the host's "
        "page cache and flushes, unsafe never flushes",
    )
    convert.add_argument(
        "-T",
        dest="source_cache",
        default="writeback",
        choices=("none", "writeback"),
        help="the source's cache mode: none reads past the host's page cache",
    )
    convert.add_argument("-p", dest="progress", action="store_true", help="show progress")
    convert.add_argument("source")
    convert.add_argument("target", help="a new file or rbd: image (never overwritten)")
    convert.set_defaults(func=cmd_convert)


CACHE_MODES = ("none", "unsafe", "writeback")
"""``convert -t``'s cache modes (QEMU's bdrv_parse_cache_mode; writethrough and directsync
are not offered)."""


def cached_medium(path: str, fmt: str, cache: str) -> dict[str, Any]:
    """The options of a new image opened in cache mode ``cache`` (a volume in a storage
    service has no host page cache to bypass)."""
    options = {"driver": fmt, **file_medium(path)}
    if cache == "none" and not is_volume_name(path):
        options["file"] = {**options["file"], "cache.direct": True}
    elif cache == "unsafe":
        options["cache.no-flush"] = True
    return options


def add_bitmap_parser(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bitmap = verbs.add_parser(
        "bitmap",
        help="add, remove, clear, enable, disable or merge a persistent dirty bitmap",
        description="As qemu-img bitmap: the operations run in the order given.",
    )
    for verb in BITMAP_VERBS:
        bitmap.add_argument(
            f"--{verb}", dest="ops", action="append_const", const=(verb, None), help=verb
        )
    bitmap.add_argument(
        "--merge",
        dest="ops",
        action="append",
        type=lambda source: ("merge", source),
        metavar="SOURCE",
        help="mark what bitmap SOURCE of the same image marks",
    )
    bitmap.add_argument("-g", dest="granularity", help="granularity of --add (default 64K)")
    bitmap.add_argument("file")
    bitmap.add_argument("bitmap")
    bitmap.set_defaults(func=cmd_bitmap)


BITMAP_VERBS = ("add", "remove", "clear", "enable", "disable")


def cmd_bitmap(args: argparse.Namespace) -> int:
    if not args.ops:
        raise BlockError(errno.EINVAL, "image bitmap: give an operation (--add, ...)")

    async def bitmap(commands: Commands) -> None:
        medium = {**file_medium(args.file), "node-name": NAME}
        await commands.run("create", {"name": NAME, "medium": medium})
        for verb, source in args.ops:
            where = {"node": NAME}
            if verb == "merge":
                await commands.run(
                    "bitmap-merge", {**where, "target": args.bitmap, "bitmaps": source}
                )
                continue
            extra = {"persistent": True, "granularity": args.granularity} if verb == "add" else {}
            await commands.run(f"bitmap-{verb}", {**where, "name": args.bitmap, **extra})

    run_commands(bitmap)
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    async def commit(commands: Commands) -> None:
        base = args.base
        if base is None:
            chain = (await image_info(args.file))["backing-chain"]
            if not chain:
                raise BlockError(errno.EINVAL, f"{args.file} has no backing file to commit to")
            base = chain[0]["filename"]
        await open_image(commands, args.file)
        await run_job(commands, "commit", {"base": absolute(args.file, base)}, args.progress)
        if not args.keep:  # the overlay again, over the base that holds its data now
            await commands.run(
                "change", {"name": NAME, "medium": file_medium(args.file), "force": True}
            )
            await commands.run("rollback", {"name": NAME})

    run_commands(commit)
    print("Image committed.")
    return 0


def cmd_rebase(args: argparse.Namespace) -> int:
    if args.unsafe:
        trio.run(set_backing_file, args.file, args.backing or None, args.backing_format)
        return 0

    async def rebase(commands: Commands) -> None:
        new = absolute(args.file, args.backing) if args.backing else None
        chain = (await image_info(args.file))["backing-chain"]
        if new is not None and not in_chain(args.file, chain, new):
            # an image outside the chain: opened beside it, to compare with (safe rebase)
            medium = {**file_medium(new), "read-only": True, "node-name": NEW_BASE}
            if args.backing_format:
                medium["driver"] = args.backing_format
            await commands.run("create", {"name": NEW_BASE, "medium": medium})
            new = NEW_BASE
        await open_image(commands, args.file)
        await run_job(commands, "stream", {"base": new}, args.progress)

    run_commands(rebase)
    return 0


def in_chain(image: str, chain: list[dict[str, Any]], path: str) -> bool:
    """Whether ``path`` is an image file of ``image``'s backing ``chain`` (as image_info
    gives it: each name relative to the layer above)."""
    for layer in chain:
        image = absolute(image, layer["filename"])
        if os.path.realpath(image) == os.path.realpath(path):
            return True
    return False


def cmd_convert(args: argparse.Namespace) -> int:
    """A volume in a storage service (``rbd:``) as the target is made raw, of the source's
    size, and copied into as an existing image."""
    into_volume = is_volume_name(args.target)
    target = args.target if into_volume else os.path.abspath(args.target)

    async def convert(commands: Commands) -> None:
        medium = {**file_medium(args.source), "read-only": True}
        if args.format:
            medium["driver"] = args.format
        if args.source_cache == "none" and not is_volume_name(args.source):
            medium["file"]["cache.direct"] = True
        await commands.run("create", {"name": NAME, "medium": medium})
        job: dict[str, Any] = {"target": target, "format": args.output_format}
        if into_volume or args.cache != "writeback":
            if into_volume and args.output_format != "raw":
                raise BlockError(errno.EINVAL, f"{target}: only raw volumes are made (-O raw)")
            status = await commands.run("query-status", {})
            size = next(b["size"] for b in status["backends"] if b["name"] == NAME)
            await create_image(target, args.output_format, size)
            job = {"target": target, "existing": True}
            if args.cache != "writeback":  # opened by options, which name its format
                medium = cached_medium(target, args.output_format, args.cache)
                job = {"target": json.dumps(medium)}
        await run_job(commands, "backup", job, args.progress)

    run_commands(convert)
    return 0


def absolute(image: str, name: str) -> str:
    """A backing file name as an image header has it: relative to the image's directory."""
    return os.path.join(os.path.dirname(os.path.abspath(image)), name)


def file_medium(path: str) -> dict[str, Any]:
    """The medium of an image file, or of a raw volume in a storage service (``rbd:``)."""
    if is_volume_name(path):
        return {"driver": "raw", "file": parse_options(path)}
    return {"file": {"driver": "file", "filename": os.path.abspath(path)}}


async def open_image(commands: Commands, path: str) -> None:
    await commands.run("create", {"name": NAME, "medium": file_medium(path)})


async def run_job(commands: Commands, verb: str, args: dict[str, Any], show: bool) -> None:
    """Start the job and follow it to its end (completing it once ready)."""
    await commands.run(verb, {"name": NAME, **args})

    async def entry() -> JobInfo:
        jobs: list[JobInfo] = await commands.run("query-jobs", {})
        return next(job for job in jobs if job["id"] == NAME)

    async def complete() -> None:
        await commands.run("job-complete", {"job": NAME})

    job = await progress.follow(NAME, entry, complete, show)
    failure = progress.job_failure(job)
    if failure is not None:
        raise failure


def run_commands(script: Callable[[Commands], Awaitable[None]]) -> None:
    """Run ``script`` against a block layer of this process whose jobs run meanwhile; the
    layer is closed (flushing everything) afterwards, even on failure."""

    async def main() -> None:
        layer = BlockLayer()
        jobs = JobManager(layer)
        failed: BlockError | None = None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(jobs.serve)
                try:
                    await script(Commands(layer, jobs))
                except BlockError as exc:  # raised as it is, not in the nursery's group
                    failed = exc
                finally:
                    jobs.stop()  # a job still running is cancelled, and undone
        finally:
            with trio.CancelScope(shield=True):
                failures = await layer.close()
        if failed is not None:
            raise failed
        if failures:
            raise BlockError(errno.EIO, f"the final flush failed: {'; '.join(failures)}")

    trio.run(main)
