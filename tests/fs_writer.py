"""A container-like writer on a mounted filesystem, in a process of its own: ``python -m
tests.fs_writer DIR STOP`` writes 1 MiB files with fsync, reading each one back, until STOP
exists; prints the number of each file once it is safe, and exits 1 with the error at the
first failure (which the tests that insert filters under it must never see)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

MiB = 1 << 20


def main(directory: Path, stop: Path) -> int:
    index = 0
    while not stop.exists():
        data = os.urandom(MiB)
        path = directory / f"f{index % 64:02d}"
        try:
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if path.read_bytes() != data:
                raise OSError(f"{path} reads back other data")
        except OSError as exc:
            print(f"error: {exc}", flush=True)
            return 1
        print(index, flush=True)
        index += 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
