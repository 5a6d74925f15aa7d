"""What the block job tests share: a writer with a model of what it wrote, waiting for
jobs through ``.ctl/jobs.json``, and the backing chain as ``.ctl/status`` and qemu-img show
it."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.helpers import Mount

MiB = 1 << 20


class ModelWriter:
    """Writes random blocks to a backend file from a thread, the whole time, and keeps a
    model of the content: what a backend that received the same writes must hold.

    :meth:`paused` stops it between two writes (each written and fsynced), for a moment
    where backend and model must agree, or for a command that must see no write in flight
    (a snapshot, as a frozen filesystem would)."""

    def __init__(self, path: Path, size: int, seed: int = 7) -> None:
        self.path = path
        self.model = bytearray(path.read_bytes())
        assert len(self.model) == size
        self.size = size
        self.random = random.Random(seed)
        self.writes = 0
        self.error: BaseException | None = None
        self._go = threading.Event()
        self._go.set()
        self._idle = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            while not self._stop:
                if not self._go.is_set():
                    os.fsync(fd)
                    self._idle.set()
                    self._go.wait()
                    self._idle.clear()
                    continue
                length = self.random.choice((512, 4096, 65536, 200_000))
                offset = self.random.randrange(0, self.size - length)
                offset -= offset % 512
                data = self.random.randbytes(length)
                if os.pwrite(fd, data, offset) != length:
                    raise AssertionError("short write")
                self.model[offset : offset + length] = data
                self.writes += 1
                time.sleep(0.002)
        except BaseException as exc:  # reported by check()
            self.error = exc
            self._idle.set()
        finally:
            os.close(fd)

    def __enter__(self) -> ModelWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._go.set()
        self._thread.join(60)

    @contextmanager
    def paused(self) -> Iterator[None]:
        self._go.clear()
        assert self._idle.wait(60), "the writer did not pause"
        self.check()
        try:
            yield
        finally:
            self._go.set()

    def wrote_more(self, count: int = 20) -> None:
        """Let at least ``count`` more writes happen."""
        target = self.writes + count
        deadline = time.monotonic() + 60
        while self.writes < target:
            self.check()
            assert time.monotonic() < deadline, "the writer is stuck"
            time.sleep(0.01)

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}")

    def agrees(self) -> None:
        """Backend and model hold the same bytes (the writer paused)."""
        with self.paused():
            content = self.path.read_bytes()
            if content != self.model:
                bad = next(i for i in range(self.size) if content[i] != self.model[i])
                raise AssertionError(f"{self.path.name} differs from the model at byte {bad}")


def jobs(mount: Mount) -> dict[str, dict[str, Any]]:
    return {job["id"]: job for job in json.loads((mount / ".ctl" / "jobs.json").read_text())}


def wait_job(mount: Mount, job_id: str, *statuses: str, seconds: float = 120) -> dict[str, Any]:
    """Poll until the job reaches one of ``statuses``; its entry then."""
    deadline = time.monotonic() + seconds
    while True:
        job = jobs(mount)[job_id]
        if job["status"] in statuses:
            return job
        assert job["status"] != "concluded", f"job {job_id} concluded early: {job}"
        assert time.monotonic() < deadline, f"job {job_id} stuck: {job}"
        time.sleep(0.05)


def status_chain(mount: Mount, backend: str) -> list[str]:
    """The image files of the backend's backing chain, as ``.ctl/status`` shows them."""
    node = mount.backends()[backend]["tree"]
    files = []
    while node is not None:
        children = node["children"]
        if node["driver"] in ("qcow2", "raw"):
            files.append(children["file"]["options"]["filename"])
            node = children.get("backing")
        else:  # a filter
            node = children.get("file")
    return files


def qemu_chain(image: str) -> list[str]:
    """The image files of ``image``'s backing chain as ``qemu-img info`` shows them."""
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--backing-chain", "--output=json", image],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return [layer["filename"] for layer in json.loads(out)]


def qemu_check_clean(image: str) -> None:
    """``qemu-img check`` finds neither corruption nor leaks (-U: the image is in use)."""
    result = subprocess.run(["qemu-img", "check", "-U", image], capture_output=True, text=True)
    assert result.returncode == 0, f"qemu-img check {image}:\n{result.stdout}{result.stderr}"


class FsWriter:
    """``tests.fs_writer`` (1 MiB files with fsync, read back) on a mounted filesystem, as
    a container would write its volume; stopped when the block ends, where it must have
    seen no error."""

    def __init__(self, fs: Path, stop: Path) -> None:
        self.stop_file = stop
        stop.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fs_writer", str(fs), str(stop)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )

    def __enter__(self) -> FsWriter:
        return self

    def __exit__(self, failed: object, *exc: object) -> None:
        self.stop_file.touch()
        with self.proc:
            try:
                rest, _ = self.proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        if not failed:
            assert self.proc.returncode == 0, rest

    def written(self, count: int = 3) -> None:
        """Wait for ``count`` more files, each safely written."""
        assert self.proc.stdout is not None
        for _ in range(count):
            line = self.proc.stdout.readline()
            assert line and not line.startswith("error"), line


@contextmanager
def frozen(fs: Path) -> Iterator[None]:
    """The filesystem frozen (``fsfreeze``) for the body: consistent on its disk."""
    subprocess.run(["fsfreeze", "-f", str(fs)], check=True)
    try:
        yield
    finally:
        subprocess.run(["fsfreeze", "-u", str(fs)], check=True)
