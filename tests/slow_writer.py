"""A writer like ``dd`` with a rate limit, in a process of its own: ``python -m
tests.slow_writer PATH`` writes 40 MiB at about 10 MiB/s through one open descriptor, printing
each MiB's index once written, then fsyncs. (A descriptor held by the test process itself
would be flushed whenever a child it forks closes its copy: FUSE flushes on every close.)"""

from __future__ import annotations

import os
import sys
import time

MiB = 1 << 20
CHUNKS = 40


def chunk(index: int) -> bytes:
    """The 1 MiB written at MiB ``index``: every 4 KiB block says where it belongs."""
    return b"".join(
        f"chunk{index:04d}:block{b:03d}:".encode().ljust(4096, b".") for b in range(256)
    )


def main(path: str) -> None:
    with open(path, "r+b", buffering=0) as disk:
        for index in range(CHUNKS):
            disk.seek(index * MiB)
            disk.write(chunk(index))
            print(index, flush=True)
            time.sleep(0.1)
        os.fsync(disk.fileno())


if __name__ == "__main__":
    main(sys.argv[1])
