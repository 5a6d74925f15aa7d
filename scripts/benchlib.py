"""What scripts/bench.py, bench_jobs.py and bench_rbd.py share: running commands and
stopping them, sizes, qcow2 chains, the page cache, mounts, daemons' figures, the machine's
description and markdown tables.

Ground rules: one way to do each thing, here; a failed command raises ``Failed`` with the
command and the tail of its output; nothing here leaves a process or a mount behind it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BLKFS = str(REPO / ".venv" / "bin" / "blkfs")
MiB = 1 << 20
GiB = 1 << 30


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


class Failed(RuntimeError):
    """A command, a job or a verification failed; the message says which and why."""


def on_signal(signum: int, frame: object) -> None:
    """Turns SIGTERM, SIGHUP (and SIGINT when started in the background) into
    KeyboardInterrupt, so that the cleanup on the way out runs."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(
    cmd: list[str], timeout: float = 600, check: bool = True, cwd: Path | str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` to its end, its output captured; raises Failed if it fails and ``check``."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise Failed(f"{' '.join(cmd)}: exit {proc.returncode}: {out}")
    return proc


def parse_size(text: str) -> int:
    """``512M``, ``1G``, ``4096``: binary units, as blkfs's options have them."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def fmt_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def drop_caches() -> bool:
    """Sync, then drop the host page cache; False (and a warning) where that is not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        log(f"warning: cannot drop the page cache: {exc}")
        return False
    return True


def is_mounted(path: Path | str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def stop_pid(pid: int) -> None:
    """SIGTERM, up to 10 s to exit, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            time.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    """SIGTERM, up to ``timeout`` seconds to exit, then SIGKILL; one that has exited is
    only reaped."""
    proc.send_signal(signal.SIGTERM)  # nothing is sent to a process that has exited
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def qcow2_overlay(directory: Path, backing: str, name: str) -> None:
    """``qemu-img create`` qcow2 image ``name`` in ``directory`` over the qcow2 image
    ``backing`` beside it, both named relatively: a copy of the directory is a working
    chain."""
    run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", name],
        cwd=directory,
    )


def lazy_unmount(path: Path | str) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def blkfs_pid(mnt: Path | str) -> int | None:
    try:
        with open(os.path.join(mnt, ".ctl", "status.json")) as f:
            return int(json.load(f)["pid"])
    except (OSError, ValueError, KeyError):
        return None


def blkfs_umount(mnt: Path | str, pid: int | None = None) -> None:
    """``blkfs umount``; if that fails, the daemon is stopped and the mount lazily dropped."""
    pid = pid if pid is not None else blkfs_pid(mnt)
    try:
        proc = run([BLKFS, "umount", str(mnt)], check=False, timeout=180)
        if proc.returncode == 0 or not is_mounted(mnt):
            return
        log(f"blkfs umount {mnt}: {proc.stderr.strip()}; stopping the daemon")
    except subprocess.TimeoutExpired:
        log(f"blkfs umount {mnt}: timed out; stopping the daemon")
    if pid is not None:
        stop_pid(pid)
    lazy_unmount(mnt)


def log_tail(logf: Path, lines: int = 15) -> str:
    try:
        return "\n".join(logf.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def proc_stats(pid: int) -> dict[str, float]:
    """Peak and current RSS in MiB (VmHWM, VmRSS) and CPU seconds (cpu_s) of a live process;
    what cannot be read is left out."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    out[line.split(":")[0]] = int(line.split()[1]) / 1024
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    except (OSError, IndexError, ValueError):
        pass
    return out


def machine_info() -> dict[str, str]:
    """What a reader needs to compare figures: CPU, cores, memory, kernel, tool versions."""

    def first_line(path: str, prefix: str) -> str:
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(prefix):
                        return line.split(":" if ":" in line else "=", 1)[1].strip()
        except OSError:
            pass
        return "?"

    def version(cmd: list[str]) -> str:
        try:
            return run(cmd, check=False, timeout=20).stdout.splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not installed"

    mem = first_line("/proc/meminfo", "MemTotal").split()
    libs = run(
        [
            str(REPO / ".venv/bin/python"),
            "-c",
            "import pyfuse3, trio; print(pyfuse3.__version__, trio.__version__)",
        ],
        check=False,
    ).stdout.split()
    return {
        "cpu": first_line("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "memory": f"{int(mem[0]) / 1024 / 1024:.1f} GiB" if mem and mem[0].isdigit() else "?",
        "kernel": platform.release(),
        "os": first_line("/etc/os-release", "PRETTY_NAME=").strip('"'),
        "python": platform.python_version(),
        "pyfuse3": libs[0] if libs else "?",
        "trio": libs[1] if len(libs) > 1 else "?",
        "qemu": version(["qemu-storage-daemon", "--version"]),
        "fio": version(["fio", "--version"]),
        "blkfs": run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"], check=False
        ).stdout.strip()
        or "?",
    }


def md_table(rows: list[list[str]], right_from: int = 1) -> str:
    """A markdown table, columns from ``right_from`` on right-aligned (figures)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i >= right_from else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            + " |"
        )

    sep = (
        "| "
        + " | ".join(
            ("-" * (w - 1) + ":") if i >= right_from else "-" * w for i, w in enumerate(widths)
        )
        + " |"
    )
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])
