"""``blkfs snapshot|rollback|commit|stream|mirror|backup`` and ``blkfs job``: the snapshot
and block job commands of a mount, from the shell.

Each writes its ``.ctl`` command (as ``blkfs ctl`` does) and, for a job, by default follows
it to its end: a progress bar on a terminal, plain lines otherwise; a job that goes ready (a
mirror, an active commit) is completed when ready unless ``--no-complete``. The exit status
is non-zero if the job failed or was cancelled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import trio

from blkfs.cli import progress
from blkfs.cli.errors import JobError
from blkfs.info import JobInfo


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snapshot = sub.add_parser("snapshot", help="live external snapshot: a new qcow2 overlay")
    _mount_and_name(snapshot)
    snapshot.add_argument("path", help="the new overlay (it must not exist)")
    snapshot.add_argument("--cluster-size", help="the overlay's cluster size (default 64k)")
    snapshot.add_argument(
        "--extended-l2",
        action="store_true",
        help="subclusters: a small write to a new cluster copies less",
    )
    snapshot.add_argument("--compression-type", choices=("zlib", "zstd"))
    snapshot.set_defaults(func=cmd_snapshot)

    rollback = sub.add_parser("rollback", help="drop what was written since the last snapshot")
    _mount_and_name(rollback)
    rollback.add_argument(
        "--force",
        action="store_true",
        help="even while the backend is open for writing (a mounted "
        "filesystem would no longer match its disk)",
    )
    rollback.set_defaults(func=cmd_rollback)

    commit = sub.add_parser("commit", help="merge images of the chain down into a base")
    _mount_and_name(commit)
    commit.add_argument("--top", help="the highest image to commit (default: the active one)")
    commit.add_argument("--base", help="the image to commit into (default: the last one)")
    _job_options(commit, completes=True)

    stream = sub.add_parser("stream", help="pull the backing chain's data into the top")
    _mount_and_name(stream)
    stream.add_argument("--base", help="stream the images above this one (default: all)")
    _job_options(stream, completes=False)

    for verb, syncs, text in (
        (
            "mirror",
            ("full", "top", "none"),
            "copy the live backend to a new image and switch to it",
        ),
        (
            "backup",
            ("full", "top", "incremental", "bitmap"),
            "point-in-time copy of the live backend",
        ),
    ):
        parser = sub.add_parser(verb, help=text)
        _mount_and_name(parser)
        parser.add_argument(
            "target", help="the target image: a new file, or with --existing an image that exists"
        )
        parser.add_argument("--sync", choices=syncs, default="full")
        if verb == "mirror":
            parser.add_argument(
                "--mode", choices=("background", "write-blocking"), default="background"
            )
        else:
            parser.add_argument("--bitmap", help="the dirty bitmap of an incremental backup")
            parser.add_argument(
                "--bitmap-mode",
                choices=("on-success", "always", "never"),
                help="what the bitmap keeps at the end (as QEMU's bitmap-mode)",
            )
        parser.add_argument(
            "--format",
            choices=("qcow2", "raw"),
            help="of a new target (default: the active image's)",
        )
        parser.add_argument(
            "--existing",
            action="store_true",
            help="the target exists (at least as large as the backend)",
        )
        _job_options(parser, completes=verb == "mirror")

    bitmap = sub.add_parser("bitmap", help="a node's dirty bitmaps (QEMU's block-dirty-bitmap-*)")
    bitmap_verbs = bitmap.add_subparsers(dest="verb", required=True)
    for verb, text in BITMAP_VERBS.items():
        parser = bitmap_verbs.add_parser(verb, help=text)
        parser.add_argument("mountpoint")
        parser.add_argument("node", help="the node (a backend's image: its node-name)")
        parser.add_argument("bitmap", help="the bitmap's name (merge: the target)")
        if verb == "add":
            parser.add_argument("--granularity", help="bytes per bit (default 64K)")
            parser.add_argument("--persistent", action="store_true", help="stored in the image")
            parser.add_argument("--disabled", action="store_true", help="records nothing yet")
        if verb == "merge":
            parser.add_argument("sources", nargs="+", help="the bitmaps merged into it")
        parser.set_defaults(func=cmd_bitmap)

    job = sub.add_parser("job", help="list, follow and steer a mount's block jobs")
    verbs = job.add_subparsers(dest="verb", required=True)
    listing = verbs.add_parser("list", help="every job and where it stands")
    listing.add_argument("mountpoint")
    listing.set_defaults(func=cmd_job_list)
    for verb, text in (
        ("wait", "follow a job until it concludes or, by default, is ready (exit 1 if it failed)"),
        ("pause", "pause a job"),
        ("resume", "resume a paused job"),
        ("cancel", "stop a job (a ready mirror keeps its copy, unswitched)"),
        ("complete", "switch a ready mirror or active commit to its target"),
        ("dismiss", "forget a concluded job"),
    ):
        parser = verbs.add_parser(verb, help=text)
        parser.add_argument("mountpoint")
        parser.add_argument("job", help="the job's id (by default its backend's name)")
        parser.set_defaults(func=cmd_job_wait if verb == "wait" else cmd_job_control)
        if verb == "wait":
            parser.add_argument(
                "--until",
                choices=("ready", "concluded"),
                default="ready",
                help="ready (default, as virsh blockcopy --wait): return once a mirror or an "
                "active commit is ready, still running until blkfs job complete; "
                "concluded: wait until it has ended (completed, cancelled or failed)",
            )
    speed = verbs.add_parser("speed", help="limit a job's copy rate (0: no limit)")
    speed.add_argument("mountpoint")
    speed.add_argument("job")
    speed.add_argument("rate", help="bytes per second, with K, M, G suffixes")
    speed.set_defaults(func=cmd_job_control)


def _mount_and_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint")
    parser.add_argument("name", help="the backend")


def _job_options(parser: argparse.ArgumentParser, completes: bool) -> None:
    parser.add_argument("--speed", metavar="RATE", help="bytes per second (K, M, G suffixes)")
    parser.add_argument("--job-id", help="the job's id (default: the backend's name)")
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="return once the job runs (follow it with blkfs job wait)",
    )
    if completes:
        parser.add_argument(
            "--no-complete",
            action="store_true",
            help="stop following once the job is ready; blkfs job complete switches it later",
        )
    parser.set_defaults(func=cmd_start_job)


# -- the commands ---------------------------------------------------------------------------


BITMAP_VERBS = {
    "add": "a new dirty bitmap on the node",
    "remove": "drop a bitmap (from its image too, if persistent)",
    "clear": "mark the whole bitmap clean",
    "enable": "the bitmap records writes again",
    "disable": "the bitmap stops recording",
    "merge": "mark in the bitmap what the source bitmaps have marked",
}


def cmd_bitmap(args: argparse.Namespace) -> int:
    """``.ctl/bitmap-VERB NODE NAME ...``: the same command, spelled as a shell verb."""
    words = [args.node, f"{'target' if args.verb == 'merge' else 'name'}={args.bitmap}"]
    if args.verb == "add":
        words += [f"granularity={args.granularity}"] if args.granularity else []
        words += ["persistent=on"] * args.persistent + ["disabled=on"] * args.disabled
    if args.verb == "merge":
        words.append(f"bitmaps={','.join(args.sources)}")
    send(args.mountpoint, f"bitmap-{args.verb}", " ".join(words))
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    words = [args.name, os.path.abspath(args.path)]
    if args.cluster_size:
        words.append(f"cluster-size={args.cluster_size}")
    if args.extended_l2:
        words.append("extended-l2=on")
    if args.compression_type:
        words.append(f"compression-type={args.compression_type}")
    send(args.mountpoint, "snapshot", " ".join(words))
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    send(args.mountpoint, "rollback", args.name + (" force=on" if args.force else ""))
    return 0


def cmd_start_job(args: argparse.Namespace) -> int:
    verb = args.cmd
    words = [args.name]
    if verb in ("mirror", "backup"):
        target = args.target
        words.append(target if "=" in target or target.startswith("{") else os.path.abspath(target))
    for option in (
        "top",
        "base",
        "sync",
        "mode",
        "format",
        "speed",
        "job_id",
        "bitmap",
        "bitmap_mode",
    ):
        value = getattr(args, option, None)
        if value is not None:
            words.append(f"{option.replace('_', '-')}={_absolute_image(option, value)}")
    if getattr(args, "existing", False):
        words.append("existing=on")
    send(args.mountpoint, verb, " ".join(words))
    if not args.no_wait:
        follow(
            args.mountpoint,
            args.job_id or args.name,
            complete=not getattr(args, "no_complete", True),
        )
    return 0


def _absolute_image(option: str, value: str) -> str:
    """--top and --base name a node or an image file; a file name is made absolute (the
    daemon's working directory is not the caller's)."""
    if option in ("top", "base") and os.path.exists(value):
        return os.path.abspath(value)
    return value


def cmd_job_list(args: argparse.Namespace) -> int:
    sys.stdout.write(read_ctl(args.mountpoint, "jobs"))
    return 0


def cmd_job_wait(args: argparse.Namespace) -> int:
    job = follow(args.mountpoint, args.job, complete=False, until_ready=args.until == "ready")
    if job["status"] != "concluded":
        print(
            f"{args.job}: ready, still running: blkfs job complete {args.mountpoint} "
            f"{args.job} ends it (blkfs job wait --until concluded waits for that)",
            file=sys.stderr,
        )
    return 0


def cmd_job_control(args: argparse.Namespace) -> int:
    verb = "set-speed" if args.verb == "speed" else args.verb
    send(
        args.mountpoint,
        f"job-{verb}",
        f"{args.job} speed={args.rate}" if verb == "set-speed" else args.job,
    )
    return 0


# -- talking to the mount ---------------------------------------------------------------------


def send(mountpoint: str, verb: str, text: str) -> None:
    """One ``.ctl`` command; JobError with the daemon's reason if it failed."""
    folder = Path(mountpoint, ".ctl")
    try:
        with open(folder / verb, "wb", buffering=0) as f:
            f.write(text.encode())
    except OSError as exc:
        lines = read_ctl(mountpoint, "error").splitlines() if folder.is_dir() else []
        raise JobError(lines[-1] if lines else f"{verb}: {exc.strerror}") from None


def read_ctl(mountpoint: str, report: str) -> str:
    try:
        return Path(mountpoint, ".ctl", report).read_text()
    except OSError as exc:
        raise JobError(
            f"cannot read {mountpoint}/.ctl/{report}: {exc.strerror} (is it a blkfs mount?)"
        ) from None


def job_entry(mountpoint: str, job_id: str) -> JobInfo:
    jobs: list[JobInfo] = json.loads(read_ctl(mountpoint, "jobs.json"))
    for job in jobs:
        if job["id"] == job_id:
            return job
    raise JobError(f"no job '{job_id}' on {mountpoint} (dismissed?)")


def follow(mountpoint: str, job_id: str, complete: bool, until_ready: bool = True) -> JobInfo:
    """Follow a job until it concludes (or, unless ``complete`` or ``until_ready`` is
    false, goes ready); complete it once ready if ``complete``. Its last entry, if it has
    not failed (JobError otherwise)."""

    async def entry() -> JobInfo:
        return job_entry(mountpoint, job_id)

    async def completing() -> None:
        send(mountpoint, "job-complete", job_id)

    job = trio.run(
        progress.follow, job_id, entry, completing if complete else None, True, until_ready
    )
    failure = progress.job_failure(job)
    if failure is not None:
        raise JobError(str(failure))
    return job
