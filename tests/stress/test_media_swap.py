"""Media changes under load: readers and writers never see a torn or misplaced block.

Every 4 KiB block of every image is filled with one repeated 23-byte tag (kind, image or
writer id, block number, sequence), so any completed read can be checked on its own: it must
be one intact tag repeated, for the block number it was read at. A read that mixed two media
or two writes, or returned another block, fails the check.

Writers and the test share a seqlock counter (an mmap'd file): the test makes it odd before
each change, eject or insert and even after the command returned, and keeps the list of
media by generation (``counter // 2``). A writer reads it before its write and after its
read-back; when both are the same even value no media command overlapped, so the write went
to that generation's medium and the read-back must show it. Writes that overlapped a command
are ambiguous and only constrain the final contents (they may be in either medium).
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import needs_fuse, needs_qemu
from tests.helpers import Mount

pytestmark = [needs_fuse, needs_qemu, pytest.mark.fuse, pytest.mark.stress]

BLOCK = 4096
BLOCKS = 1024  # 4 MiB images
TAG = 23
RSS_GROWTH_KIB = 16 * 1024
"""How much the daemon's RSS may grow after warm-up over the whole run."""
WORKER_SOURCE = r'''
import ctypes, errno, json, mmap, os, random, struct, subprocess, sys, time

BLOCK, TAG = 4096, 23
cfg = json.loads(sys.argv[1])
path, blocks = cfg["path"], cfg["blocks"]
images = set(cfg["images"])
shared = open(cfg["shared"], "r+b")
mm = mmap.mmap(shared.fileno(), 16)
shared_counter = ctypes.c_uint64.from_buffer(mm)  # one aligned 8-byte load: never torn


def counter():
    return shared_counter.value


def stopped():
    return struct.unpack_from("<Q", mm, 8)[0] != 0


def tag(kind, ident, blk, seq):
    return f"{kind}{ident:03d}:{blk:07d}:{seq:09d}:".encode()


def fill(t):
    return (t * (BLOCK // TAG + 1))[:BLOCK]


summary = {"role": cfg["role"], "reads": 0, "blocks": 0, "writes": 0, "errors": [],
           "bad": [], "short": 0}


def bad(offset, data, why):
    if len(summary["bad"]) < 20:
        summary["bad"].append([offset, why, bytes(data[:48]).decode("latin-1")])


def verify(offset, data):
    """Check every whole block of a completed read; count the good ones."""
    for i in range(0, len(data) - BLOCK + 1, BLOCK):
        block = data[i:i + BLOCK]
        blk = (offset + i) // BLOCK
        t = bytes(block[:TAG])
        try:
            kind, ident, number = t[:1], int(t[1:4]), int(t[5:12])
        except ValueError:
            bad(offset + i, block, "no tag")
            continue
        if block != fill(t):
            bad(offset + i, block, "torn")
        elif number != blk:
            bad(offset + i, block, "wrong block")
        elif kind == b"I" and ident not in images:
            bad(offset + i, block, "unknown image")
        elif kind not in (b"I", b"W"):
            bad(offset + i, block, "unknown kind")
        else:
            summary["blocks"] += 1


def error(exc, t0):
    summary["errors"].append([exc.errno or -1, t0, time.monotonic()])
    time.sleep(0.002)


def open_retrying(flags):
    while not stopped():
        t0 = time.monotonic()
        try:
            return os.open(path, flags)
        except OSError as exc:
            error(exc, t0)
    return None


def role_pread():
    rnd = random.Random(cfg["seed"])
    fd = open_retrying(os.O_RDONLY)  # one descriptor for the whole run, across ejects
    while fd is not None and not stopped():
        count = rnd.choice((1, 1, 4, 16))
        blk = rnd.randrange(blocks - count + 1)
        t0 = time.monotonic()
        try:
            data = os.pread(fd, count * BLOCK, blk * BLOCK)
        except OSError as exc:
            error(exc, t0)
            continue
        summary["reads"] += 1
        if len(data) != count * BLOCK:
            summary["short"] += 1
            bad(blk * BLOCK, data, f"short read {len(data)}")
        verify(blk * BLOCK, data)
    if fd is not None:
        os.close(fd)


def role_seq():
    while not stopped():
        fd = open_retrying(os.O_RDONLY)
        if fd is None:
            break
        offset, eof = 0, False
        try:
            while not stopped():
                t0 = time.monotonic()
                try:
                    data = os.read(fd, 64 * 1024)
                except OSError as exc:
                    error(exc, t0)
                    break
                if not data:
                    eof = True
                    break
                summary["reads"] += 1
                verify(offset, data)
                offset += len(data)
        finally:
            os.close(fd)
        if eof and offset != blocks * BLOCK:
            summary["short"] += 1


def role_dd():
    while not stopped():
        t0 = time.monotonic()
        proc = subprocess.run(["dd", f"if={path}", "bs=64k", "status=none"],
                              capture_output=True)
        summary["reads"] += 1
        verify(0, proc.stdout)
        if proc.returncode:
            code = errno.ENOMEDIUM if b"No medium" in proc.stderr else -1
            summary["errors"].append([code, t0, time.monotonic()])
            time.sleep(0.002)
        elif len(proc.stdout) != blocks * BLOCK:
            summary["short"] += 1


def role_write():
    """Write stamped blocks this writer owns; log (seq, blk, c0, c1, result, readback)."""
    rnd = random.Random(cfg["seed"])
    wid, nwriters = cfg["wid"], cfg["writers"]
    owned = list(range(wid, blocks, nwriters))
    log = open(cfg["log"], "w")
    fd = open_retrying(os.O_RDWR)
    seq = 0
    while fd is not None and not stopped():
        blk = rnd.choice(owned)
        seq += 1
        data = fill(tag("W", wid, blk, seq))
        c0 = counter()
        t0 = time.monotonic()
        try:
            written = os.pwrite(fd, data, blk * BLOCK)
        except OSError as exc:
            c1 = counter()
            summary["errors"].append([exc.errno or -1, t0, time.monotonic()])
            log.write(f"{seq} {blk} {c0} {c1} {exc.errno} -1\n")
            time.sleep(0.002)
            continue
        summary["writes"] += 1
        try:
            back = os.pread(fd, BLOCK, blk * BLOCK)
            same = int(back == data)
            summary["reads"] += 1
            verify(blk * BLOCK, back)
        except OSError as exc:
            summary["errors"].append([exc.errno or -1, t0, time.monotonic()])
            same = -1
        c1 = counter()
        log.write(f"{seq} {blk} {c0} {c1} {0 if written == BLOCK else -2} {same}\n")
    if fd is not None:
        os.close(fd)
    log.close()


{"pread": role_pread, "seq": role_seq, "dd": role_dd, "write": role_write}[cfg["role"]]()
with open(cfg["out"], "w") as out:
    json.dump(summary, out)
'''


def block_tag(kind: str, ident: int, blk: int, seq: int = 0) -> bytes:
    return f"{kind}{ident:03d}:{blk:07d}:{seq:09d}:".encode()


def fill(tag: bytes) -> bytes:
    return (tag * (BLOCK // TAG + 1))[:BLOCK]


def tagged_image(path: Path, image_id: int) -> None:
    """A raw image whose every block is its tag (image id, block number) repeated."""
    path.write_bytes(b"".join(fill(block_tag("I", image_id, blk)) for blk in range(BLOCKS)))


def to_qcow2(raw: Path, qcow2: Path) -> None:
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
        check=True,
        capture_output=True,
    )


def read_image(path: Path, tmp: Path) -> bytes:
    """Guest contents of an image file (qcow2 through qemu-img, raw as is)."""
    if path.suffix != ".qcow2":
        return path.read_bytes()
    out = tmp / (path.name + ".raw")
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(path), str(out)], check=True, capture_output=True
    )
    return out.read_bytes()


def daemon_usage(pid: int) -> tuple[int, int]:
    """The daemon's resident set (KiB) and open file descriptors."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def spelled_out(image: Path, aio: str) -> str:
    """The options of a medium on ``image``, its format and its file node's aio named."""
    fmt = "qcow2" if image.suffix == ".qcow2" else "raw"
    return f"driver={fmt},file.driver=file,file.filename={image},file.aio={aio}"


@pytest.fixture(params=["threads", "io_uring"])
def aio(request: pytest.FixtureRequest) -> str:
    """How the file nodes of the media hand host calls off."""
    param: str = request.param
    return param


class Media:
    """The test's side of the seqlock: counter odd while a media command runs, the medium of
    every generation recorded, and the intervals during which the drive was empty."""

    def __init__(
        self,
        mount: Mount,
        name: str,
        images: list[Path],
        shared: Path,
        extra: str = "",
        force: bool = False,
        aio: str = "threads",
    ) -> None:
        self.mount, self.name, self.images, self.extra = mount, name, images, extra
        self.aio = aio
        """The file nodes' aio wherever a medium is spelled out (a path alone gets the
        default)."""
        self.force = force
        """Change and eject under writers, which only force=on may."""
        shared.write_bytes(bytes(16))
        self._file = open(shared, "r+b")
        self._mm = mmap.mmap(self._file.fileno(), 16)
        self._counter = ctypes.c_uint64.from_buffer(self._mm)
        """Read and written as one aligned 8-byte word: struct.pack_into may store byte by
        byte, and a worker reading mid-store (255 -> 256) would see a counter go back."""
        self.by_generation: list[int | None] = [0]
        self.empty: list[tuple[float, float]] = []
        self.changes = self.ejects = 0

    @property
    def counter(self) -> int:
        return self._counter.value

    def run(self, verb: str, text: str, medium: int | None) -> None:
        """One media command inside the seqlock; a failed command leaves the old medium."""
        self._counter.value += 1
        done = False
        try:
            self.mount.ctl(verb, text)
            done = True
        finally:
            self.by_generation.append(medium if done else self.by_generation[-1])
            self._counter.value += 1

    def change(self, index: int) -> None:
        image = self.images[index]
        spelled = (
            f"{self.name} {image}"
            if self.changes % 2
            else f"{self.name} {spelled_out(image, self.aio)}"
        )
        self.run("change", spelled + self.extra + (",force=on" if self.force else ""), index)
        self.changes += 1

    def eject_insert(self, index: int, pause: float) -> None:
        """An explicit empty phase: eject, leave the drive empty briefly, insert."""
        start = time.monotonic()
        self.run("eject", self.name + (" force=on" if self.force else ""), None)
        time.sleep(pause)
        self.run(
            "insert", f"{self.name} {spelled_out(self.images[index], self.aio)}{self.extra}", index
        )
        self.empty.append((start, time.monotonic()))
        self.ejects += 1

    def stop_workers(self) -> None:
        struct.pack_into("<Q", self._mm, 8, 1)

    def close(self) -> None:
        del self._counter  # the mmap cannot close while a ctypes view exports its buffer
        self._mm.close()
        self._file.close()

    def during_empty(self, t0: float, t1: float) -> bool:
        return any(t0 <= end and start <= t1 for start, end in self.empty)


@dataclass
class Workers:
    """Worker processes (readers and writers) and their summaries."""

    tmp: Path
    procs: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)

    def start(self, **cfg: Any) -> None:
        index = len(self.procs)
        out = self.tmp / f"worker{index}.json"
        cfg = {"seed": index, **cfg, "out": str(out)}
        script = self.tmp / "worker.py"
        if not script.exists():
            script.write_text(WORKER_SOURCE)
        proc = subprocess.Popen(
            [sys.executable, str(script), json.dumps(cfg)], stderr=subprocess.PIPE, text=True
        )
        self.procs.append((proc, out))

    def finish(self) -> list[dict[str, Any]]:
        summaries = []
        for proc, out in self.procs:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"worker failed: {err}"
            summaries.append(json.loads(out.read_text()))
        return summaries

    def kill(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path: Path):
    pool = Workers(tmp_path)
    yield pool
    pool.kill()


def make_images(images: Path, count: int, qcow2: bool) -> list[Path]:
    paths = []
    for image_id in range(1, count + 1):
        raw = images / f"m{image_id}.img"
        tagged_image(raw, image_id)
        if qcow2 and image_id == count:
            to_qcow2(raw, images / f"m{image_id}.qcow2")
            raw.unlink()
            raw = images / f"m{image_id}.qcow2"
        paths.append(raw)
    return paths


def swap_loop(
    media: Media, pid: int, seconds: float, min_changes: int, eject_every: int, dwell: float
) -> dict[str, int]:
    """Change media until both the time and the minimum count are reached, with an explicit
    eject/insert every ``eject_every`` changes, each medium staying in for up to ``dwell``
    seconds (0: back to back); returns daemon usage after warm-up and at the end (same
    state: one medium in)."""
    rnd = random.Random(5)
    usage: dict[str, int] = {}
    start = time.monotonic()
    deadline, warm = start + seconds, start + seconds / 4
    step = 0
    while media.changes < min_changes or time.monotonic() < deadline:
        step += 1
        target = step % len(media.images)
        if step % eject_every == 0:
            media.eject_insert(target, pause=0.02)
        else:
            media.change(target)
        if dwell:
            time.sleep(rnd.uniform(0, dwell))
        if "rss_start" not in usage and time.monotonic() >= warm and media.changes >= 30:
            usage["rss_start"], usage["fds_start"] = daemon_usage(pid)
        if step % 10 == 0:
            usage["rss_peak"] = max(usage.get("rss_peak", 0), daemon_usage(pid)[0])
    usage["rss_end"], usage["fds_end"] = daemon_usage(pid)
    return usage


def check_reader_summaries(summaries: list[dict[str, Any]], media: Media) -> dict[str, int]:
    errors: dict[str, int] = {}
    for s in summaries:
        assert s["bad"] == [], f"{s['role']}: bad blocks {s['bad']}"
        assert s["short"] == 0, f"{s['role']}: short reads"
        for code, t0, t1 in s["errors"]:
            errors[errno.errorcode.get(code, str(code))] = (
                errors.get(errno.errorcode.get(code, str(code)), 0) + 1
            )
            assert code == errno.ENOMEDIUM and media.during_empty(t0, t1), (
                f"{s['role']}: {os.strerror(code) if code > 0 else code} outside an eject"
            )
    return errors


def check_usage(usage: dict[str, int]) -> None:
    assert usage["fds_end"] <= usage["fds_start"], usage
    assert usage["rss_end"] - usage["rss_start"] <= RSS_GROWTH_KIB, usage


def test_readers_see_one_intact_medium_across_hundreds_of_changes(
    aio: str,
    mount_factory: Callable[..., Mount],
    images: Path,
    tmp_path: Path,
    workers: Workers,
    stress_seconds: Callable[[float], float],
    figures: dict[str, Any],
) -> None:
    paths = make_images(images, 3, qcow2=True)
    mount = mount_factory("--backend", f"cd={spelled_out(paths[0], aio)},read-only=on")
    media = Media(mount, "cd", paths, tmp_path / "shared", extra=",read-only=on", aio=aio)
    try:
        base = {
            "path": str(mount / "cd"),
            "blocks": BLOCKS,
            "images": [1, 2, 3],
            "shared": str(tmp_path / "shared"),
        }
        for role in ("pread", "pread", "seq", "dd"):
            workers.start(role=role, **base)
        usage = swap_loop(
            media, mount.pid, stress_seconds(25), min_changes=300, eject_every=25, dwell=0.004
        )
        media.stop_workers()
        summaries = workers.finish()
    finally:
        media.close()
    errors = check_reader_summaries(summaries, media)
    figures.update(
        changes=media.changes,
        ejects=media.ejects,
        reads=sum(s["reads"] for s in summaries),
        blocks_verified=sum(s["blocks"] for s in summaries),
        errors=errors or 0,
        **usage,
    )
    assert media.changes >= 300
    assert all(s["blocks"] > 0 for s in summaries), summaries
    check_usage(usage)
    assert mount.backends()["cd"]["tree"] is not None


@dataclass
class WriteLog:
    """What the writers did, from their logs: per (image, block) the last write that
    certainly went there, and for every write the images it may have gone to."""

    unambiguous: int = 0
    ambiguous: int = 0
    read_back: int = 0
    last_certain: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    possible: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    """(writer, seq) -> images the write may have reached."""


def parse_write_logs(logs: list[Path], media: Media) -> WriteLog:
    result = WriteLog()
    gens = media.by_generation
    for wid, path in enumerate(logs):
        for line in path.read_text().splitlines():
            seq, blk, c0, c1, code, same = map(int, line.split())
            if c0 == c1 and c0 % 2 == 0:
                medium = gens[c0 // 2]
                if medium is None:
                    assert code == errno.ENOMEDIUM, f"write {wid}/{seq} to an empty drive: {code}"
                    continue
                assert code == 0, f"write {wid}/{seq} failed with {code} on medium {medium}"
                assert same == 1, f"write {wid}/{seq} not read back from medium {medium}"
                result.unambiguous += 1
                result.read_back += 1
                result.possible[(wid, seq)] = {medium}
                key = (medium, blk)
                if result.last_certain.get(key, (-1, -1))[1] < seq:
                    result.last_certain[key] = (wid, seq)
            else:
                candidates = {gens[g] for g in range(c0 // 2, (c1 + 1) // 2 + 1)}
                if code:
                    assert code == errno.ENOMEDIUM and None in candidates, (
                        f"write {wid}/{seq} failed with {code} outside an eject"
                    )
                result.ambiguous += 1
                result.possible[(wid, seq)] = candidates - {None}
    return result


def check_final_image(data: bytes, index: int, image_id: int, writes: WriteLog) -> int:
    """Every block of an image after the run: intact, its own block number, and either the
    original or a write that may have gone there and is no older than the last write that
    certainly went there. Returns how many blocks hold a certain last write."""
    found = 0
    for blk in range(BLOCKS):
        block = data[blk * BLOCK : (blk + 1) * BLOCK]
        tag = block[:TAG]
        assert block == fill(tag), f"image {image_id} block {blk} torn: {tag!r}"
        kind, ident, number, seq = tag[:1], int(tag[1:4]), int(tag[5:12]), int(tag[13:22])
        assert number == blk, f"image {image_id} block {blk} holds block {number}"
        last = writes.last_certain.get((index, blk))
        if kind == b"I":
            assert ident == image_id and last is None, (
                f"image {image_id} block {blk}: write {last} is missing"
            )
            continue
        assert kind == b"W" and index in writes.possible.get((ident, seq), set()), (
            f"image {image_id} block {blk} holds write {ident}/{seq}, which never went there"
        )
        if last is not None:
            assert seq >= last[1], (
                f"image {image_id} block {blk}: write {last} was lost "
                f"(holds the older {ident}/{seq})"
            )
            found += seq == last[1]
    return found


def test_writes_land_in_the_medium_they_went_to(
    aio: str,
    mount_factory: Callable[..., Mount],
    images: Path,
    tmp_path: Path,
    workers: Workers,
    stress_seconds: Callable[[float], float],
    figures: dict[str, Any],
) -> None:
    paths = make_images(images, 3, qcow2=True)
    mount = mount_factory("--backend", f"disk={spelled_out(paths[0], aio)}")
    media = Media(mount, "disk", paths, tmp_path / "shared", force=True, aio=aio)
    nwriters = 2
    logs = [tmp_path / f"writer{w}.log" for w in range(nwriters)]
    try:
        base = {
            "path": str(mount / "disk"),
            "blocks": BLOCKS,
            "images": [1, 2, 3],
            "shared": str(tmp_path / "shared"),
        }
        for wid, log in enumerate(logs):
            workers.start(role="write", wid=wid, writers=nwriters, log=str(log), **base)
        workers.start(role="pread", **base)
        usage = swap_loop(
            media, mount.pid, stress_seconds(25), min_changes=300, eject_every=25, dwell=0.03
        )
        media.stop_workers()
        summaries = workers.finish()
    finally:
        media.close()
    errors = check_reader_summaries(summaries, media)
    writes = parse_write_logs(logs, media)
    mount.ctl("eject", "disk")  # flushed and closed: the image files are final
    found = sum(
        check_final_image(read_image(path, tmp_path), index, index + 1, writes)
        for index, path in enumerate(paths)
    )
    figures.update(
        changes=media.changes,
        ejects=media.ejects,
        writes=writes.unambiguous + writes.ambiguous,
        writes_verified=writes.read_back,
        writes_ambiguous=writes.ambiguous,
        final_blocks_verified=found,
        errors=errors or 0,
        reads=sum(s["reads"] for s in summaries),
        blocks_verified=sum(s["blocks"] for s in summaries),
        **usage,
    )
    assert media.changes >= 300 and writes.unambiguous > 0 and found > 0
    check_usage(usage)
