"""``blkfs image create``, ``info`` and ``check``: qemu-img's everyday verbs, no QEMU
needed (``commit``, ``rebase`` and ``convert``, which run jobs, are in
:mod:`blkfs.cli.image_jobs`)."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from typing import Any

import trio

from blkfs.cli import image_jobs
from blkfs.errors import BlockError
from blkfs.image import check_image, create_image, image_info

CHECK_CLEAN, CHECK_FAILED, CHECK_CORRUPT, CHECK_LEAKS, CHECK_UNSUPPORTED = 0, 1, 2, 3, 63
"""``blkfs image check`` exit statuses, those of ``qemu-img check``."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    image = sub.add_parser("image", help="create or inspect image files")
    verbs = image.add_subparsers(dest="verb", required=True)

    create = verbs.add_parser("create", help="create a new image (never overwrites)")
    create.add_argument("-f", dest="format", default="raw", help="raw (default) or qcow2")
    create.add_argument("-b", dest="backing", help="backing file (relative to FILE's directory)")
    create.add_argument("-F", dest="backing_format", help="backing file format (default: probed)")
    create.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE,...",
        help="format options: cluster_size, compat, compression_type, extended_l2, refcount_bits",
    )
    create.add_argument("file")
    create.add_argument("size", nargs="?", help="virtual size, e.g. 10G (default: the backing's)")
    create.set_defaults(func=cmd_create)

    info = verbs.add_parser("info", help="format, sizes and backing chain of an image")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument(
        "-U",
        "--force-share",
        action="store_true",
        help="read an image another program writes (what it shows may be stale)",
    )
    info.add_argument("file")
    info.set_defaults(func=cmd_info)

    check = verbs.add_parser(
        "check",
        help="check an image's metadata; repair leaked clusters",
        description="Exit status as qemu-img check: 0 clean, 2 corruptions, 3 leaked "
        "clusters only, 1 the check could not be done, 63 the format has no "
        "metadata to check.",
    )
    check.add_argument(
        "-r",
        "--repair",
        choices=["leaks"],
        help="lower leaked refcounts (only on an image with no corruption)",
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    check.add_argument("file")
    check.set_defaults(func=cmd_check)
    image_jobs.add_parsers(verbs)
    image_jobs.add_bitmap_parser(verbs)


def parse_create_options(items: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in ",".join(items).split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BlockError(
                errno.EINVAL, f"-o expects KEY=VALUE pairs separated by commas, got '{item}'"
            )
        options[key] = value
    return options


def cmd_create(args: argparse.Namespace) -> int:
    options = parse_create_options(args.options)
    trio.run(
        lambda: create_image(
            args.file,
            args.format,
            args.size,
            backing=args.backing,
            backing_format=args.backing_format,
            options=options,
        )
    )
    print(
        f"Formatting '{args.file}', fmt={args.format}"
        + (f" backing_file={args.backing}" if args.backing else "")
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    try:
        info = trio.run(image_info, args.file, args.force_share)
    except BlockError as exc:
        if exc.errno == errno.EBUSY and not args.force_share:  # as qemu-img info
            raise BlockError(
                exc.errno,
                f"{exc}; is another process using the image? -U (--force-share) reads it anyway",
            ) from None
        raise
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(describe(info))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    repair = args.repair == "leaks"
    try:
        report = trio.run(check_image, args.file, repair)
        if report["leaks-fixed"]:
            fixed = report
            report = trio.run(check_image, args.file, False)  # double-check, as qemu-img
            report["leaks-fixed"] = fixed["leaks-fixed"]
    except BlockError as exc:
        if exc.errno == errno.ENOTSUP:
            print(f"blkfs: {args.file}: {exc}", file=sys.stderr)
            return CHECK_UNSUPPORTED
        if args.json:
            print(json.dumps({"filename": args.file, "error": str(exc)}, indent=2))
        print(f"blkfs: check failed: {exc}", file=sys.stderr)
        return CHECK_FAILED
    print(json.dumps(report, indent=2) if args.json else describe_check(report, repair))
    if report["check-errors"]:
        return CHECK_FAILED
    if report["corruptions"]:
        return CHECK_CORRUPT
    return CHECK_LEAKS if report["leaks"] else CHECK_CLEAN


def describe_check(report: dict[str, Any], repair: bool) -> str:
    """The human form, worded like ``qemu-img check``."""
    lines = list(report["messages"])
    if lines:
        lines.append("")
    if report["leaks-fixed"]:
        lines += [
            "The following inconsistencies were found and repaired:",
            "",
            f"    {report['leaks-fixed']} leaked clusters",
            "    0 corruptions",
            "",
        ]
    if report["corruptions"]:
        lines += [
            f"{report['corruptions']} errors were found on the image.",
            "Data may be corrupted, or further writes to the image may corrupt it.",
        ]
        if repair and report["leaks"]:
            lines.append("Leaks are not repaired on a corrupt image.")
        lines.append("")
    if report["leaks"]:
        lines += [
            f"{report['leaks']} leaked clusters were found on the image.",
            "This means waste of disk space, but no harm to data.",
            "",
        ]
    if report["check-errors"]:
        lines += [f"{report['check-errors']} internal errors have occurred during the check.", ""]
    if not (report["corruptions"] or report["leaks"] or report["check-errors"]):
        lines.append("No errors were found on the image.")
    total = report["total-clusters"]
    allocated = report["allocated-clusters"]
    share = 100 * allocated / total if total else 0.0
    compressed = 100 * report["compressed-clusters"] / allocated if allocated else 0.0
    lines.append(
        f"{allocated}/{total} = {share:.2f}% allocated, {compressed:.2f}% compressed clusters"
    )
    lines.append(f"Image end offset: {report['image-end-offset']}")
    return "\n".join(lines)


def describe(info: dict[str, Any]) -> str:
    """The human form, laid out like ``qemu-img info``."""
    lines = layer_lines(info)
    for depth, layer in enumerate(info["backing-chain"], 1):
        lines.append("")
        lines.append(f"backing layer {depth}:")
        lines.extend("    " + line for line in layer_lines(layer))
    return "\n".join(lines)


def layer_lines(layer: dict[str, Any]) -> list[str]:
    if "error" in layer:
        return [f"unreadable: {layer['error']}"]
    disk = layer["disk-size"]
    lines = [
        f"image: {layer['filename']}",
        f"file format: {layer['format']}",
        f"virtual size: {human(layer['virtual-size'])} ({layer['virtual-size']} bytes)",
        f"disk size: {human(disk) if disk is not None else 'unknown'}",
    ]
    specific = layer["format-specific"]
    if specific:
        lines.append("format specific information:")
        for key, value in specific.items():
            if value is None:
                continue
            if isinstance(value, list):
                value = ", ".join(map(str, value)) or "none"
            lines.append(f"    {key}: {value}")
    return lines


def human(size: int) -> str:
    """Bytes in the largest binary unit that keeps the number at least 1 (qemu-img style)."""
    exponent = min(max(size.bit_length() - 1, 0) // 10, 4)
    if not exponent:
        return f"{size} B"
    return f"{size / 1024**exponent:.3g} {('KiB', 'MiB', 'GiB', 'TiB')[exponent - 1]}"
