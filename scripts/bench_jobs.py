"""Block-job throughput: blkfs's jobs side by side with qemu-img and qemu-storage-daemon (qsd).

Why: blkfs runs QEMU's block jobs (commit, stream, mirror, and convert as a backup job) in
Python; this measures what that costs against QEMU's own C implementation, on the same images,
in one run, reported as ratios (blkfs MiB/s / peer MiB/s).

Images (made once per run of this script, copied fresh for every measured run):
    base.qcow2  SIZE, every byte written (a non-zero pattern per 64 MiB, qemu-io write -P)
    top.qcow2   over base.qcow2, every other MiB written (half of SIZE, a different pattern)

Jobs (median seconds over --runs; MiB/s counts the bytes the job has to copy):
    offline commit   blkfs image commit top.qcow2         vs qemu-img commit top.qcow2
    offline convert  blkfs image convert -O qcow2 top out vs qemu-img convert -t writeback ...
    convert unsafe   blkfs image convert -t unsafe ...     vs qemu-img convert -O qcow2 top out
    live mirror      blkfs mirror MNT vol m.qcow2          vs qsd blockdev-mirror sync=full
    live stream      blkfs stream MNT vol                  vs qsd block-stream
    live commit      blkfs commit MNT vol (active commit)  vs qsd block-commit + job-complete
Live jobs time the job only (mount or daemon start excluded): for blkfs the whole `blkfs
mirror|stream|commit` command (its start-up included, shown in a note), for qsd from the QMP
command to the job's conclusion event. blkfs's times without the command's start-up are
reported beside them: a live job's from the mount's log (start to conclusion), an offline
job's in-process (the CLI's ``main`` timed after its imports, as ``IN_PROCESS`` runs it).
qsd runs with the default aio and, where it accepts it, with aio=io_uring on its file nodes.
Every blkfs result is verified (qemu-img check, and qemu-img compare with the source's data); a
failed check replaces its figure. The page cache is dropped before every measured run of either
side, when that is possible. Both sides of a
convert row use the same target cache mode: writeback (blkfs's default: the target is flushed
at the end) and unsafe (qemu-img's default: never flushed).

Usage: .venv/bin/python scripts/bench_jobs.py [--size 512M] [--runs 3] [--dir SCRATCH]
                                              [--json FILE] [--keep]
Needs root (FUSE mounts, drop_caches). scripts/bench --jobs imports it:
run_job_bench(work, size, runs) and job_table(results).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchlib import (
    BLKFS,
    Failed,
    MiB,
    blkfs_umount,
    drop_caches,
    fmt_size,
    log,
    log_tail,
    machine_info,
    md_table,
    on_signal,
    parse_size,
    qcow2_overlay,
    run,
)

CHUNK = 64 * MiB
"""base.qcow2 is written in pieces of this size, each with its own pattern."""

PEERS = ("blkfs", "peer", "io_uring")
"""The columns of a row: blkfs, qemu-img or qsd with its default aio, qsd with io_uring."""


IN_PROCESS = (
    "import sys, time\n"
    "from blkfs.cli import image_jobs, main\n"
    "start = time.perf_counter()\n"
    "status = main.main(sys.argv[1:])\n"
    "print(f'job seconds: {time.perf_counter() - start:.6f}', file=sys.stderr)\n"
    "sys.exit(status)\n"
)
"""``python -c IN_PROCESS ARGS`` runs ``blkfs ARGS`` and prints the seconds it took after
its imports (the command's start-up): what an offline job costs where start-up dominates."""

# -- helpers ---------------------------------------------------------------------------------


def timed(cmd: list[str], timeout: float) -> float:
    """Seconds ``cmd`` took (it must succeed)."""
    start = time.perf_counter()
    run(cmd, timeout=timeout)
    return time.perf_counter() - start


def can_drop_caches() -> bool:
    """Dropping the page cache is done only if it works and is cheap (a few seconds)."""
    start = time.monotonic()
    return drop_caches() and time.monotonic() - start < 5


def mib_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0 or size % MiB:
        raise argparse.ArgumentTypeError("the size must be a positive multiple of 1 MiB")
    return size


# -- images ----------------------------------------------------------------------------------


def make_images(d: Path, size: int) -> int:
    """base.qcow2 fully written and top.qcow2 over it with every other MiB written, in ``d``;
    the bytes top.qcow2 holds."""
    base, top = d / "base.qcow2", d / "top.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)])
    writes = [
        f"write -P {0x40 + i % 0x40:#x} {off} {min(CHUNK, size - off)}"
        for i, off in enumerate(range(0, size, CHUNK))
    ]
    run(
        ["qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)), str(base)], timeout=1800
    )
    qcow2_overlay(d, base.name, top.name)
    offsets = range(0, size, 2 * MiB)
    writes = [f"write -P 0xc3 {off} {MiB}" for off in offsets]
    run(["qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)), str(top)], timeout=1800)
    return len(offsets) * MiB


def fresh_copy(master: Path, d: Path) -> None:
    """Copies of base.qcow2 and top.qcow2 in ``d`` (top names its backing file relatively)."""
    d.mkdir(parents=True)
    for name in ("base.qcow2", "top.qcow2"):
        run(["cp", "--sparse=always", "--reflink=auto", str(master / name), str(d / name)])


def check(*images: Path) -> None:
    for image in images:
        proc = run(["qemu-img", "check", "-q", str(image)], check=False)
        if proc.returncode != 0:
            raise Failed(
                f"qemu-img check {image.name}: exit {proc.returncode}: "
                f"{(proc.stderr + proc.stdout).strip()[-800:]}"
            )


def compare(a: Path, b: Path) -> None:
    """``a`` must read as ``b`` (its whole chain) does."""
    proc = run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(a), str(b)], check=False)
    if proc.returncode != 0:
        raise Failed(
            f"qemu-img compare {a.name} {b}: exit {proc.returncode}: "
            f"{(proc.stdout + proc.stderr).strip()[-400:]}"
        )


def backing_of(image: Path) -> str | None:
    info = json.loads(run(["qemu-img", "info", "--output=json", "-U", str(image)]).stdout)
    backing = info.get("backing-filename")
    return str(backing) if backing is not None else None


# -- blkfs mounts ----------------------------------------------------------------------------


@contextlib.contextmanager
def blkfs_mount(mnt: Path, image: Path, logf: Path) -> Iterator[Path]:
    """``vol`` = ``image`` mounted at ``mnt``; unmounted on the way out, whatever happens."""
    mnt.mkdir(parents=True)
    pid: int | None = None
    try:
        run(
            [
                BLKFS,
                "mount",
                str(mnt),
                "--backend",
                f"vol={image.resolve()}",
                "--log-file",
                str(logf),
                "--log-level",
                "info",
            ],
            timeout=120,
        )
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads((mnt / ".ctl" / "status.json").read_text())["pid"])
        yield mnt
    finally:
        blkfs_umount(mnt, pid)


# -- qemu-storage-daemon and QMP -------------------------------------------------------------


class Qmp:
    """A minimal QMP client: JSON lines over the daemon's unix socket. Events that arrive
    while a command waits for its answer are kept for ``wait_event``."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
        deadline = time.monotonic() + 30
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise Failed("qemu-storage-daemon did not open its QMP socket") from None
                time.sleep(0.05)
        self.timeout = timeout
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        if "QMP" not in self._read(time.monotonic() + 10):
            raise Failed("no QMP greeting")
        self.cmd("qmp_capabilities")

    def _read(self, deadline: float) -> dict[str, Any]:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            line = self.reader.readline()
        except TimeoutError:
            raise Failed("QMP: timed out waiting for qemu-storage-daemon") from None
        if not line:
            raise Failed("QMP: qemu-storage-daemon closed the connection")
        return dict(json.loads(line))

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read(deadline)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise Failed(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for i, event in enumerate(self.events):
                if match(event):
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@contextlib.contextmanager
def qsd(d: Path, image: Path, aio: str | None, timeout: float) -> Iterator[Qmp]:
    """qemu-storage-daemon with ``vol`` = qcow2 ``image`` and a QMP monitor; killed on the way
    out, whatever happens."""
    sock, logf = d / "qmp.sock", d / "qsd.log"
    aio_opt = f"aio={aio}," if aio else ""
    cmd = [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,{aio_opt}node-name=f,filename={image}",
        "--blockdev",
        "driver=qcow2,node-name=vol,file=f",
        "--chardev",
        f"socket,path={sock},server=on,wait=off,id=qmp0",
        "--monitor",
        "chardev=qmp0",
    ]
    with open(logf, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    qmp: Qmp | None = None
    try:
        try:
            qmp = Qmp(sock, proc, timeout)
        except Failed as exc:
            raise Failed(f"{exc}: {log_tail(logf, 5)}") from None
        yield qmp
    finally:
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.cmd("quit")
            qmp.close()
        for stop, wait in ((None, 10 if qmp else 0), (proc.terminate, 10), (proc.kill, None)):
            if stop is not None:
                stop()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                break


def qsd_job(qmp: Qmp, verb: str, args: dict[str, Any], completes: bool) -> float:
    """Run a job (``job-id`` j) to its end, completing it once ready if ``completes``; seconds
    from its command to its BLOCK_JOB_COMPLETED event."""

    def about_j(*kinds: str) -> Callable[[dict[str, Any]], bool]:
        return lambda e: e["event"] in kinds and e.get("data", {}).get("device") == "j"

    ended = about_j("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
    qmp.events.clear()
    start = time.perf_counter()
    qmp.cmd(verb, {"job-id": "j", **args})
    end = qmp.wait_event(
        about_j("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
        if completes
        else ended
    )
    if end["event"] == "BLOCK_JOB_READY":
        qmp.cmd("job-complete", {"id": "j"})
        end = qmp.wait_event(ended)
    elapsed = time.perf_counter() - start
    if end["event"] != "BLOCK_JOB_COMPLETED" or end["data"].get("error"):
        raise Failed(f"qsd {verb}: {end}")
    return elapsed


def io_uring_works(work: Path) -> str | None:
    """None if qsd opens a file node with aio=io_uring here, else why not."""
    d = work / "probe"
    d.mkdir()
    image = d / "probe.qcow2"
    try:
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"])
        with qsd(d, image, "io_uring", 10) as qmp:
            qmp.cmd("query-named-block-nodes")
        return None
    except Failed as exc:
        return str(exc)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- the measurements ------------------------------------------------------------------------


CONVERT_ROWS = {"writeback": "offline convert", "unsafe": "convert unsafe"}
"""The convert rows, by the target cache mode both sides use."""


class Bench:
    """One benchmark's settings and images; each ``*_blkfs``, ``*_qemu`` and ``live_qsd``
    method measures one run of one side on fresh copies in ``d`` and returns its seconds."""

    def __init__(self, work: Path, size: int, drop: bool) -> None:
        self.work, self.size, self.drop = work, size, drop
        self.master = work / "master"
        self.timeout = max(600.0, 4 * size / MiB)
        self.job_times: dict[str, list[float]] = {}
        """Per row, each blkfs run's job time without the command's start-up."""

    def before(self) -> None:
        if self.drop:
            drop_caches()

    # offline ------------------------------------------------------------------------------

    def blkfs_offline(self, row: str, *args: str) -> float:
        """Seconds ``blkfs ARGS`` took; its time after start-up goes to ``job_times``."""
        start = time.perf_counter()
        proc = run([sys.executable, "-c", IN_PROCESS, *args], self.timeout)
        took = time.perf_counter() - start
        job = re.search(r"job seconds: (\S+)", proc.stderr)
        if job is not None:
            self.job_times.setdefault(row, []).append(float(job.group(1)))
        return took

    def commit_blkfs(self, d: Path) -> float:
        self.before()
        took = self.blkfs_offline("offline commit", "image", "commit", str(d / "top.qcow2"))
        check(d / "base.qcow2", d / "top.qcow2")
        compare(d / "base.qcow2", self.master / "top.qcow2")
        compare(d / "top.qcow2", self.master / "top.qcow2")
        return took

    def commit_qemu(self, d: Path) -> float:
        self.before()
        return timed(["qemu-img", "commit", "-q", str(d / "top.qcow2")], self.timeout)

    def convert_blkfs(self, d: Path, cache: str) -> float:
        self.before()
        out = d / "out.qcow2"
        took = self.blkfs_offline(
            CONVERT_ROWS[cache],
            *("image", "convert", "-t", cache, "-O", "qcow2", str(d / "top.qcow2"), str(out)),
        )
        check(out)
        compare(out, self.master / "top.qcow2")
        if backing_of(out) is not None:
            raise Failed(f"{out.name} has a backing file: {backing_of(out)}")
        return took

    def convert_qemu(self, d: Path, cache: str) -> float:
        self.before()
        top, out = str(d / "top.qcow2"), str(d / "out.qcow2")
        return timed(["qemu-img", "convert", "-t", cache, "-O", "qcow2", top, out], self.timeout)

    # live ---------------------------------------------------------------------------------

    def live_blkfs(self, d: Path, verb: str, *args: str) -> float:
        """Mount top.qcow2 as ``vol`` and time ``blkfs VERB MNT vol ARGS`` (the mount's log
        goes to d/blkfs.log, which ``measure`` quotes if anything fails)."""
        with blkfs_mount(d / "mnt", d / "top.qcow2", d / "blkfs.log") as mnt:
            self.before()
            took = timed([BLKFS, verb, str(mnt), "vol", *args], self.timeout)
        job = logged_job_time(d / "blkfs.log")
        if job is not None:
            self.job_times.setdefault(f"live {verb}", []).append(job)
        return took

    def mirror_blkfs(self, d: Path) -> float:
        target = d / "m.qcow2"
        took = self.live_blkfs(d, "mirror", str(target))
        check(d / "top.qcow2", target)
        compare(target, d / "top.qcow2")
        compare(target, self.master / "top.qcow2")
        return took

    def stream_blkfs(self, d: Path) -> float:
        took = self.live_blkfs(d, "stream")
        check(d / "top.qcow2", d / "base.qcow2")
        compare(d / "top.qcow2", self.master / "top.qcow2")
        if backing_of(d / "top.qcow2") is not None:
            raise Failed(f"top.qcow2 still has a backing file: {backing_of(d / 'top.qcow2')}")
        return took

    def active_commit_blkfs(self, d: Path) -> float:
        took = self.live_blkfs(d, "commit")
        check(d / "top.qcow2", d / "base.qcow2")
        compare(d / "base.qcow2", self.master / "top.qcow2")
        return took

    def live_qsd(self, d: Path, aio: str | None, verb: str) -> float:
        with qsd(d, d / "top.qcow2", aio, self.timeout) as qmp:
            args: dict[str, Any] = {"device": "vol"}
            if verb == "blockdev-mirror":
                target = d / "m.qcow2"
                run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(self.size)])
                qmp.cmd(
                    "blockdev-add",
                    {
                        "driver": "file",
                        "node-name": "tf",
                        "filename": str(target),
                        **({"aio": aio} if aio else {}),
                    },
                )
                qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": "tnode", "file": "tf"})
                args |= {"target": "tnode", "sync": "full"}
            self.before()
            return qsd_job(qmp, verb, args, completes=verb != "block-stream")


def logged_job_time(logf: Path) -> float | None:
    """Seconds from the job's start to its conclusion, from the mount's log lines."""
    stamps: dict[str, datetime.datetime] = {}
    for line in logf.read_text(errors="replace").splitlines():
        m = re.match(r"(\S+ \S+) .*blkfs\.jobs: job vol\b.*\b(started|concluded)$", line)
        if m:
            stamps[m.group(2)] = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
    if len(stamps) < 2:
        return None
    return (stamps["concluded"] - stamps["started"]).total_seconds()


def measure(
    bench: Bench, row: str, sides: dict[str, Callable[[Path], float]], runs: int
) -> dict[str, dict[str, Any]]:
    """``runs`` runs of each side, interleaved (so drift hits both alike), each on fresh copies
    of the images; a side that fails once is not run again."""
    out: dict[str, dict[str, Any]] = {s: {"times": [], "error": None} for s in sides}
    for i in range(runs):
        for side, fn in sides.items():
            if out[side]["error"]:
                continue
            d = bench.work / f"{row.replace(' ', '-')}-{side}-{i}"
            fresh_copy(bench.master, d)
            try:
                took = fn(d)
            except Exception as exc:  # recorded in place of the figure
                error = f"run {i + 1}: {exc}"
                if (d / "blkfs.log").exists():
                    error += f"\n  mount log {d / 'blkfs.log'} (tail):\n{log_tail(d / 'blkfs.log')}"
                out[side]["error"] = error
                log(f"  {row:16} {side:9} FAILED {error}")
                continue  # its directory stays for a look (with --keep)
            out[side]["times"].append(took)
            log(f"  {row:16} {side:9} run {i + 1}: {took:7.2f} s")
            shutil.rmtree(d, ignore_errors=True)
    return out


def run_job_bench(work: Path, size: int, runs: int) -> dict[str, Any]:
    """Measure every job in ``work`` (a scratch directory, which this fills and leaves for the
    caller to remove) on images of ``size`` bytes; the results, raw timings included."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "master").mkdir()
    notes: list[str] = []
    log(f"making images of {fmt_size(size)} in {work} ...")
    top_bytes = make_images(work / "master", size)
    drop = can_drop_caches()
    notes.append(
        "page cache dropped before every measured run"
        if drop
        else "page cache NOT dropped (drop_caches unavailable or slow)"
    )
    uring_error = io_uring_works(work)
    if uring_error:
        notes.append(f"qsd aio=io_uring skipped: {uring_error}")
    startup = timed([BLKFS, "image", "info", str(work / "master" / "top.qcow2")], 60)
    notes.append(f"blkfs CLI start-up (blkfs image info): {startup:.2f} s, inside blkfs's times")
    bench = Bench(work, size, drop)

    def qsd_sides(verb: str) -> dict[str, Callable[[Path], float]]:
        sides = {"peer": lambda d: bench.live_qsd(d, None, verb)}
        if not uring_error:
            sides["io_uring"] = lambda d: bench.live_qsd(d, "io_uring", verb)
        return sides

    def convert_sides(cache: str) -> dict[str, Callable[[Path], float]]:
        return {
            "blkfs": functools.partial(bench.convert_blkfs, cache=cache),
            "peer": functools.partial(bench.convert_qemu, cache=cache),
        }

    plan: list[tuple[str, str, int, dict[str, Callable[[Path], float]]]] = [
        (
            "offline commit",
            "qemu-img",
            top_bytes,
            {"blkfs": bench.commit_blkfs, "peer": bench.commit_qemu},
        ),
        *((row, "qemu-img", size, convert_sides(cache)) for cache, row in CONVERT_ROWS.items()),
        ("live mirror", "qsd", size, {"blkfs": bench.mirror_blkfs, **qsd_sides("blockdev-mirror")}),
        (
            "live stream",
            "qsd",
            size - top_bytes,
            {"blkfs": bench.stream_blkfs, **qsd_sides("block-stream")},
        ),
        (
            "live commit",
            "qsd",
            top_bytes,
            {"blkfs": bench.active_commit_blkfs, **qsd_sides("block-commit")},
        ),
    ]
    rows = []
    for job, peer, nbytes, sides in plan:
        log(f"{job}: {fmt_size(nbytes)} to copy, {runs} run(s) per side")
        result = measure(bench, job, sides, runs)
        alone = bench.job_times.get(job, [])
        if alone and not result["blkfs"]["error"]:
            result["blkfs"]["job_s"] = alone
            result["blkfs"]["job_mib_s"] = nbytes / MiB / statistics.median(alone)
        for r in result.values():
            if r["times"] and not r["error"]:
                r["median_s"] = statistics.median(r["times"])
                r["mib_s"] = nbytes / MiB / r["median_s"]
        rows.append({"job": job, "peer": peer, "bytes": nbytes, "sides": result})
    return {
        "machine": machine_info(),
        "size": size,
        "runs": runs,
        "top_bytes": top_bytes,
        "rows": rows,
        "notes": notes,
    }


# -- report ----------------------------------------------------------------------------------


def job_table(results: dict[str, Any]) -> str:
    """The results as a markdown table, a header line with the machine before it and the
    notes (failures in full) after it."""
    m = results["machine"]
    lines = [
        f"Block jobs, {fmt_size(results['size'])} images, median of {results['runs']} "
        f"run(s); {m['cores']} cores, kernel {m['kernel']}, {m['qemu']}",
        "",
    ]
    rows = [
        [
            "job",
            "size",
            "blkfs MiB/s",
            "qemu-img or qsd MiB/s",
            "qsd aio=io_uring MiB/s",
            "blkfs ÷ peer",
        ]
    ]
    failures = []
    for row in results["rows"]:
        cells = []
        for side in PEERS:
            r = row["sides"].get(side)
            if r is None:
                cells.append("-")
            elif r["error"]:
                cells.append("FAIL")
                failures.append(f"{row['job']}, {side}: {r['error']}")
            else:
                cells.append(f"{r['mib_s']:.0f}")
        blkfs, peer = (row["sides"].get(s, {}).get("mib_s") for s in ("blkfs", "peer"))
        rows.append(
            [
                row["job"],
                fmt_size(row["bytes"]),
                *cells,
                f"{blkfs / peer:.2f}" if blkfs and peer else "-",
            ]
        )
    lines.append(md_table(rows))
    lines += [
        "",
        "size: the bytes the job copies (commit: top's data, stream: base's data "
        "top lacks). blkfs ÷ peer is against qemu-img or qsd's default aio.",
    ]
    alone = [
        f"{row['job']} {blkfs['job_mib_s']:.0f} MiB/s"
        + (f" ({blkfs['job_mib_s'] / peer['mib_s']:.2f} of the peer)" if "mib_s" in peer else "")
        for row in results["rows"]
        for blkfs, peer in [(row["sides"]["blkfs"], row["sides"].get("peer", {}))]
        if "job_mib_s" in blkfs
    ]
    if alone:
        lines.append(
            "blkfs's jobs without the command's start-up (live: the mount's log, job start "
            f"to conclusion; offline: in-process): {', '.join(alone)}."
        )
    lines += [f"note: {n}" for n in results["notes"]]
    lines += [f"FAILED {f}" for f in failures]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--size", type=mib_size, default=512 * MiB, help="image size (512M)")
    ap.add_argument("--runs", type=int, default=3, help="measured runs per side (3)")
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the scratch directory goes (/var/tmp)",
    )
    ap.add_argument("--json", type=Path, help="also write the results, raw timings included")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_jobs.", dir=args.dir))
    try:
        results = run_job_bench(work, args.size, args.runs)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if args.keep:
            log(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(job_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
