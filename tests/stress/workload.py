"""A journaled writer for crash tests, and the model that says what must have survived.

The writer runs as its own process on a backend file: random data writes, zero writes and
whole-cluster zero writes (which blkfs turns into freed clusters with ``detect-zeroes=unmap``,
the discard path of the driver, since FUSE has no fallocate), with an fsync every few
operations. Before each operation it appends the operation to a journal, before each fsync
``S`` and after each fsync returns ``F``; the journal goes to the host page cache at once (an
``O_APPEND`` descriptor, no buffering), so it survives the daemon's ``kill -9``.

:func:`expected` replays a journal: every operation before the last ``F`` is durable and
must read back; bytes touched after it may hold anything those operations could leave, so
they are not checked.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WRITER = r"""
import os, random, sys
path, journal = sys.argv[1], sys.argv[2]
seed, ops, cluster = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
log = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
fd = os.open(path, os.O_RDWR)
size = os.fstat(fd).st_size
try:
    for n in range(ops):
        kind = rng.choice("wwwwzd")
        if kind == "d":
            length = cluster * rng.randint(1, 4)
            offset = rng.randrange(0, size - length + 1, cluster)
        else:
            length = rng.choice((512, 4096, 65536, 70000, 200000, 1 << 20))
            offset = rng.randrange(0, size - length)
            if rng.random() < 0.5:
                offset -= offset % 4096
        op_seed = rng.getrandbits(32)
        os.write(log, f"{kind} {offset} {length} {op_seed}\n".encode())
        data = bytes(length) if kind != "w" else random.Random(op_seed).randbytes(length)
        os.pwrite(fd, data, offset)
        if rng.random() < 0.25:
            os.write(log, b"S\n")
            os.fsync(fd)
            os.write(log, b"F\n")
    os.write(log, b"S\n")
    os.fsync(fd)
    os.write(log, b"F\n")
except OSError as exc:
    os.write(log, f"E {exc.errno}\n".encode())
"""


@dataclass
class Replay:
    """The journal's meaning: contents after the last completed fsync, and which byte ranges
    later operations may have changed."""

    model: bytearray
    uncertain: list[tuple[int, int]]
    writes: int = 0
    zero_writes: int = 0
    discards: int = 0
    fsyncs: int = 0
    errors: int = 0


def start_writer(
    path: Path, journal: Path, seed: int, ops: int = 100000, cluster: int = 65536
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(journal), str(seed), str(ops), str(cluster)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def replay(journal: Path, initial: bytes | bytearray) -> Replay:
    """Apply the durable part of a journal to ``initial``."""
    lines = journal.read_text().splitlines() if journal.exists() else []
    last_sync = max((i for i, line in enumerate(lines) if line == "F"), default=-1)
    result = Replay(bytearray(initial), [])
    for i, line in enumerate(lines):
        kind, *fields = line.split()
        if kind == "F":
            result.fsyncs += 1
            continue
        if kind == "E":
            result.errors += 1
            continue
        if kind == "S":
            continue
        offset, length, seed = map(int, fields)
        result.writes += kind == "w"
        result.zero_writes += kind == "z"
        result.discards += kind == "d"
        if i > last_sync:
            result.uncertain.append((offset, offset + length))
            continue
        data = bytes(length) if kind != "w" else random.Random(seed).randbytes(length)
        result.model[offset : offset + length] = data
    return result


def mismatches(actual: bytes, state: Replay) -> list[int]:
    """Offsets of 4 KiB blocks (at most 10) where a durable byte did not read back."""
    mask = bytearray(len(actual))
    for start, end in state.uncertain:
        mask[start:end] = b"\1" * (end - start)
    bad = []
    for block in range(0, len(actual), 4096):
        got, want = actual[block : block + 4096], state.model[block : block + 4096]
        if got == want:
            continue
        if any(
            g != w and not m for g, w, m in zip(got, want, mask[block : block + 4096], strict=False)
        ):
            bad.append(block)
            if len(bad) == 10:
                break
    return bad


def journaled(journal: Path) -> int:
    """How many operations the writer has started (fsync marks not counted)."""
    try:
        lines = journal.read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line[:1] in (b"w", b"z", b"d"))


def wait_for_fsync(journal: Path, timeout: float) -> bool:
    """Wait until the writer is inside an fsync (the journal ends with ``S``); False if that
    did not happen within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(journal, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 2))
                if f.read() == b"S\n":
                    return True
        except OSError:
            pass
        time.sleep(0.0005)
    return False
