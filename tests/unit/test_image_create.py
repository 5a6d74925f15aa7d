"""``blkfs image create`` makes a new image durable: the file's data and its name (strace,
installed by scripts/setup, shows the fsyncs)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_the_new_image_and_its_directory_entry_are_fsynced(tmp_path: Path, fmt: str) -> None:
    image = tmp_path / "new.img"
    trace = tmp_path / "trace"
    subprocess.run(
        [
            "strace",
            "-f",
            "-y",
            "-e",
            "trace=fsync,fdatasync",
            "-o",
            str(trace),
            sys.executable,
            "-m",
            "blkfs",
            "image",
            "create",
            "-f",
            fmt,
            str(image),
            "1M",
        ],
        check=True,
        capture_output=True,
    )
    synced = re.findall(r"f(?:data)?sync\(\d+<([^>]*)>\) = 0", trace.read_text())
    assert str(image) in synced
    assert str(tmp_path) in synced, "the directory entry is not durable"
