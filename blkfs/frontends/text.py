"""Text for people, shared by the ``.ctl`` reports and the ``blkfs`` command: sizes in binary
units and aligned tables, so that a size reads the same in ``.ctl/status`` and in a progress
line."""

from __future__ import annotations

from collections.abc import Sequence


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{size} B" if size < 1024 else f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows as lines, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
