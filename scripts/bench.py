"""Benchmark blkfs against the host file, a C passthrough FUSE server (the limit),
qemu-storage-daemon (qsd) FUSE exports in three configurations, and nbdfuse.

Run through ``scripts/bench`` (which runs ``scripts/setup`` first). Needs root (drops the page
cache, mounts FUSE). One run measures, on the same images:

images    raw      random data, SIZE bytes
          qcow2    ``qemu-img convert -O qcow2`` of the raw image
          chain    base.qcow2 (the data) <- mid.qcow2 <- top.qcow2, each overlay with a few MiB
                   written by qemu-io
peers     blkfs         ``blkfs mount`` (one daemon per image, one backend per copy)
          blkfs-direct  the same with ``file.cache.direct=on`` (O_DIRECT on the image files)
          blkfs-passthrough  the same with ``passthrough=on`` (raw only): the kernel serves
                        the FUSE files' reads and writes from the image files (FUSE passthrough)
          qsd           ``qemu-storage-daemon --export type=fuse``, QEMU's defaults (aio=threads)
          qsd-uring     the same with aio=io_uring and an iothread
          qsd-direct    aio=io_uring, an iothread and cache.direct=on
                        (io_uring is probed first; where it fails: threads, resp. native)
          nbdfuse  nbdfuse (libnbd) over nbdkit's file plugin for raw; nbdkit 1.32 cannot
                   read qcow2, so over ``qemu-nbd -f qcow2`` for qcow2 and the chain
          limit    scripts/bench.d/fuse_passthrough.c, built here with gcc and pkg-config fuse3:
                   libfuse's low-level API, direct_io, multi-threaded loop, over the raw image;
                   what any userspace FUSE server can reach (raw only, shown on every row)
          host     the raw image file itself, no FUSE (raw only, shown on every row)
workloads seqread        dd if=F of=/dev/null bs=1M after drop_caches              -> MB/s
          seqread-warm   the same, image files in the host page cache              -> MB/s
          seqwrite       fio --rw=write --bs=1M --end_fsync=1, one full pass       -> MB/s
          randread       fio psync 4k QD1 1 job, time based, image files warm      -> IOPS
          randread4      same, --numjobs=4 --group_reporting                       -> IOPS
          randread-cold  randread right after drop_caches                          -> IOPS
          randread4-cold randread4 right after drop_caches                         -> IOPS
          randwrite      fio psync 4k QD1 1 job, time based                        -> IOPS

Every (peer, image) pair is measured --rounds times; each round runs all pairs in a new
shuffled order, each on fresh copies of the images with a fresh mount, so drift and neighbours
hit all peers alike. Rows report the median with min and max; ratios are of the medians of
this run. "qsd-best" is, per row, the qsd configuration with the best median. Random rows
run with a fio ramp time and report p50/p99 completion latency (medians over rounds).

Reads use one copy of the image; randwrite and seqwrite each get a fresh copy, so writes never
change what a later measurement sees. The page cache is dropped before seqread, seqwrite and
the -cold rows; before the others the image files are read once on the host, so those
measure each layer's own cost rather than the disk's. fio runs use --direct=0, but for the
reads of nbdfuse and qsd: neither serves its FUSE file with direct_io (QEMU 7.2's export
does not), so the kernel's page cache of that file would answer repeated reads (4-job random
reads at 500k IOPS, p50 1 us); they read with O_DIRECT (fio --direct=1, dd iflag=direct), so
every read reaches the server as it does in blkfs and the limit. For the daemons, peak RSS
(VmHWM) and CPU seconds (utime+stime) are read from /proc/PID.

``--sparse-rss`` (also run at the end of a normal run unless ``--no-sparse-rss``): a 1 TiB
sparse qcow2 made by ``blkfs image create``, mounted in blkfs, 4k random reads over the whole
1 TiB, then 4k random writes at spread offsets; reports the daemon's VmHWM (target < 150 MiB).
Then (unless ``--rss-backends 0``) one blkfs daemon with 1,000 backends (--quick: 100), each
a qcow2 overlay over one shared base, 64 KiB read from each: its VmHWM (target < 150 MiB).

``--nbd`` (also run at the end of a normal run unless ``--no-nbd``): NBD, on raw and qcow2
images of SIZE, every pair served by one qemu-nbd or read the same way. blkfs with a backend
``nbd+unix:///?socket=S`` versus nbdfuse on the same qemu-nbd socket (seqread-warm, randread,
randread4, randwrite through each FUSE file, nbdfuse reading with O_DIRECT); then blkfs's
NBD export of the image versus ``qemu-nbd -r`` serving it, each read whole by
``nbdcopy URI null:`` (image warm) -> MB/s.

``--throttle`` (also run at the end of a normal run unless ``--no-throttle``): a blkfs backend
``driver=throttle,limits.bps-read=N`` over a sparse raw image (N from ``--throttle-rate``,
default 50M, binary units as in blkfs options); ``dd bs=1M`` for about 5 s must read at N
within 10%. Then, while another dd runs, ``.ctl/reopen`` retunes the limit to N/2, and the rate
of the second half (from the backend's read_bytes in status.json) must be N/2 within 10%.

``--slow`` (also run at the end of a normal run unless ``--no-slow``): slow devices, one
round, blkfs and qsd (QEMU's defaults, aio=threads) measured alike. The devices are nbdfuse
files (4 connections) over ``nbdkit --filter=delay memory`` on a unix socket, whose reads
take 2 ms or 50 ms, opened with cache.direct=on. Neighbour row: 4k QD1 random reads of a
local raw image (warm) alone, then while two readers use a backend of the same daemon on the
50 ms device: p50 beside / p50 alone (target <= 2). Slow-device row: 4k random reads on each
device, 1 and 4 jobs: IOPS of 4 jobs / 1 job (target >= 3.5).

``--jobs`` (off by default): also the block-job table of scripts/bench_jobs.py (commit,
stream, mirror, convert against qemu-img and qsd), --rounds runs per side.

``--rbd`` (off by default): also the RBD table of scripts/bench_rbd.py (blkfs's rbd driver
against rbd-fuse and qemu-storage-daemon's rbd driver, on one image in the tests' throwaway
single-node cluster; sequential, 4 KiB random 1 and 4 jobs), --rounds rounds.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    BLKFS,
    REPO,
    GiB,
    MiB,
    blkfs_pid,
    blkfs_umount,
    drop_caches,
    fmt_size,
    is_mounted,
    lazy_unmount,
    log,
    machine_info,
    md_table,
    on_signal,
    parse_size,
    proc_stats,
    qcow2_overlay,
    run,
    stop_process,
)

Results = dict[str, Any]
"""JSON-shaped results, as written by --json."""

Sample = dict[str, float]
"""One measurement: value (MB/s or IOPS), and where measured p50_us, p99_us, cpu_s."""

Samples = dict[str, dict[str, dict[str, list[Sample]]]]
"""image -> workload -> peer -> one sample per round."""

WORKLOADS = [
    "seqread",
    "seqread-warm",
    "seqwrite",
    "randread",
    "randread4",
    "randread-cold",
    "randread4-cold",
    "randwrite",
]
UNITS = {wl: "MB/s" if wl.startswith("seq") else "IOPS" for wl in WORKLOADS}
RANDOM = [wl for wl in WORKLOADS if wl.startswith("rand")]
IMAGES = ["raw", "qcow2", "chain"]
PEERS = [
    "blkfs",
    "blkfs-direct",
    "blkfs-passthrough",
    "qsd",
    "qsd-uring",
    "qsd-direct",
    "nbdfuse",
    "limit",
    "host",
]
RAW_ONLY = ("limit", "host")
"""Peers measured on the raw image only; their figures stand in every image's rows."""
RAW_IMAGE_ONLY = ("blkfs-passthrough",)
"""Peers that serve the raw image only, shown on its rows alone."""

PAGE_CACHED = ("qsd", "qsd-uring", "qsd-direct", "nbdfuse")
"""Peers whose FUSE files the kernel caches (no direct_io: nbdfuse, and qsd's FUSE export in
QEMU 7.2): their reads use O_DIRECT, or the FUSE file's page cache would answer for them."""

LIMIT_SOURCE = REPO / "scripts" / "bench.d" / "fuse_passthrough.c"


@dataclass(frozen=True)
class QsdConfig:
    aio: str | None
    """The file nodes' aio option; None: QEMU's default (threads)."""
    iothread: bool
    direct: bool
    """cache.direct=on on the file nodes."""


QSD_CONFIGS = {
    "qsd": QsdConfig(None, False, False),
    "qsd-uring": QsdConfig("io_uring", True, False),
    "qsd-direct": QsdConfig("io_uring", True, True),
}


# -- cleanup ---------------------------------------------------------------------------------


class Cleanup:
    """Everything started is registered here and torn down in reverse order exactly once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []

    def add(self, kind: str, obj: Any) -> None:
        self.items.append((kind, obj))

    def new_dir(self, d: Path) -> Path:
        """Make scratch directory ``d``, removed at the end if not before."""
        d.mkdir(parents=True)
        self.add("dir", str(d))
        return d

    def remove(self, kind: str, obj: Any) -> None:
        try:
            self.items.remove((kind, obj))
        except ValueError:
            pass

    def stop(self, kind: str, obj: Any) -> None:
        """Tear down one thing added (stop a peer, remove a directory) now."""
        self.remove(kind, obj)
        _tear_down(kind, obj)

    def run(self) -> None:
        while self.items:
            kind, obj = self.items.pop()
            try:
                _tear_down(kind, obj)
            except BaseException as exc:  # keep cleaning the rest
                log(f"cleanup of {kind} {obj}: {exc}")

    def stop_under(self, d: Path) -> None:
        """Stop every peer living in ``d`` and remove ``d``."""
        for kind, obj in list(self.items):
            if kind in STOPS and peer_path(kind, obj).startswith(str(d)):
                try:
                    self.stop(kind, obj)
                except Exception as exc:
                    log(f"cleanup: {exc}")
        self.stop("dir", str(d))


def _tear_down(kind: str, obj: Any) -> None:
    if kind in STOPS:
        STOPS[kind](obj)
    elif kind == "dir":
        shutil.rmtree(obj, ignore_errors=True)


CLEANUP = Cleanup()


# -- images ----------------------------------------------------------------------------------


def copy_image(src: Path, dst: Path) -> None:
    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)])


def make_images(d: Path, size: int, which: list[str]) -> dict[str, Path]:
    """Returns image name -> its (top) image file; the raw image is always made."""
    src = d / "src"
    src.mkdir(parents=True, exist_ok=True)
    raw = src / "raw" / "disk.img"
    raw.parent.mkdir(exist_ok=True)
    t0 = time.monotonic()
    with open(raw, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    log(f"  raw {fmt_size(size)} of random data: {time.monotonic() - t0:.1f}s")
    out = {"raw": raw}
    if "qcow2" in which or "chain" in which:
        q = src / "qcow2" / "disk.qcow2"
        q.parent.mkdir(exist_ok=True)
        run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(q)])
        out["qcow2"] = q
    if "chain" in which:
        c = src / "chain"
        c.mkdir(exist_ok=True)
        copy_image(out["qcow2"], c / "base.qcow2")
        qcow2_overlay(c, "base.qcow2", "mid.qcow2")
        qcow2_overlay(c, "mid.qcow2", "top.qcow2")
        step = size // 8
        for name, pattern, offsets in (
            ("mid.qcow2", 0x11, (1, 3, 5)),
            ("top.qcow2", 0x22, (2, 5, 7)),
        ):
            cmds: list[str] = []
            for k in offsets:
                cmds += ["-c", f"write -q -P {pattern} {k * step} 1M"]
            run(["qemu-io", "-f", "qcow2", *cmds, str(c / name)])
        out["chain"] = c / "top.qcow2"
    return out


def copy_set(image: Path, dst_dir: Path) -> Path:
    """A fresh copy of IMAGE (with its backing chain, if it lives in the same directory)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in image.parent.iterdir():
        copy_image(f, dst_dir / f.name)
    return dst_dir / image.name


# -- peers -----------------------------------------------------------------------------------


def blkfs_mount(mnt: Path, backends: dict[str, Path | str], *extra: str) -> int:
    """Mount blkfs with backends given as image paths or option strings, and ``extra``
    mount arguments; the daemon's pid."""
    mnt.mkdir(parents=True, exist_ok=True)
    cmd = [BLKFS, "mount", str(mnt), *extra]
    for name, img in backends.items():
        cmd += ["--backend", f"{name}={img}"]
    CLEANUP.add("blkfs", str(mnt))
    run(cmd, timeout=600)
    pid = blkfs_pid(mnt)
    if pid is None:
        raise RuntimeError(f"blkfs mounted {mnt} but reports no pid")
    return pid


def blkfs_direct_options(image: Path, fmt: str) -> str:
    """IMAGE opened with cache.direct=on on its file node (backing files inherit it)."""
    return f"driver={fmt},file.driver=file,file.filename={image},file.cache.direct=on"


def blkfs_passthrough_options(image: Path) -> str:
    """IMAGE as raw over its file, served by the kernel's FUSE passthrough."""
    return f"driver=raw,file.driver=file,file.filename={image},werror=report,passthrough=on"


def drop_scratch_mount(mnt: Path, d: Path) -> None:
    """Unmount a check's own mount and remove its scratch directory."""
    CLEANUP.stop("blkfs", str(mnt))
    CLEANUP.stop("dir", str(d))


class Qsd:
    def __init__(self, proc: subprocess.Popen[bytes], files: list[str], logf: Path) -> None:
        self.proc, self.files, self.logf = proc, files, logf


def qsd_start(
    d: Path, exports: dict[str, Path], fmt: str, cfg: QsdConfig, direct: tuple[str, ...] = ()
) -> Qsd:
    """One qemu-storage-daemon exporting each image as the FUSE file ``d/NAME``; the exports
    named in ``direct`` with cache.direct=on whatever ``cfg`` says."""
    cmd = ["qemu-storage-daemon"]
    if cfg.iothread:
        cmd += ["--object", "iothread,id=io0"]
    files = []
    for i, (name, img) in enumerate(exports.items()):
        mp = d / name
        mp.touch()
        files.append(str(mp))
        fopts = (f",aio={cfg.aio}" if cfg.aio else "") + (
            ",cache.direct=on" if cfg.direct or name in direct else ""
        )
        cmd += [
            "--blockdev",
            f"driver=file,node-name=f{i},filename={img}{fopts}",
            "--blockdev",
            f"driver={fmt},node-name=n{i},file=f{i}",
            "--export",
            f"type=fuse,id=e{i},node-name=n{i},mountpoint={mp},writable=on"
            + (",iothread=io0" if cfg.iothread else ""),
        ]
    logf = d / "qsd.log"
    with open(logf, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    q = Qsd(proc, files, logf)
    CLEANUP.add("qsd", q)
    deadline = time.monotonic() + 60
    while not all(is_mounted(f) for f in files):
        if proc.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon exited: {logf.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("qemu-storage-daemon exports did not appear within 60s")
        time.sleep(0.05)
    return q


def qsd_stop(q: Qsd) -> None:
    stop_process(q.proc)
    for f in q.files:
        lazy_unmount(f)


def probe_qsd(work: Path, cfg: QsdConfig) -> str | None:
    """None if qsd exports a raw file over FUSE in configuration ``cfg`` here, else why not."""
    d = work / "probe"
    d.mkdir()
    try:
        img = d / "probe.img"
        with open(img, "wb") as f:
            f.truncate(MiB)
        q = qsd_start(d, {"p": img}, "raw", cfg)
        try:
            with open(d / "p", "rb") as f:
                f.read(4096)
        finally:
            CLEANUP.stop("qsd", q)
        return None
    except (OSError, RuntimeError) as exc:
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    finally:
        shutil.rmtree(d, ignore_errors=True)


class FuseServers:
    """FUSE servers (nbdfuse, or the limit) each serving one file as ``MNT/disk``, and the
    NBD servers behind them."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.files: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []


def nbd_start(d: Path, exports: dict[str, Path], fmt: str) -> FuseServers:
    """nbdfuse serving each image as ``d/nbd-NAME/disk``: raw through ``nbdkit -s file``
    (NBD on nbdfuse's stdin/stdout), qcow2 through a ``qemu-nbd`` unix socket."""
    nbd = FuseServers(d)
    CLEANUP.add("fuse", nbd)
    for name, img in exports.items():
        mnt = d / f"nbd-{name}"
        with open(d / f"nbd-{name}.log", "wb") as logf:  # the children keep their copies
            if fmt == "raw":
                cmd = ["nbdfuse", f"{mnt}/disk", "--command", "nbdkit", "-s", "file", str(img)]
            else:
                proc, sock = qemu_nbd_serve(d / f"nbd-{name}.sock", img, fmt, logf)
                nbd.procs.append(proc)
                cmd = ["nbdfuse", f"{mnt}/disk", "--unix", str(sock)]
        fuse_server_mount(nbd, mnt, cmd, d / f"nbd-{name}.log")
    return nbd


def build_limit(work: Path) -> Path:
    """scripts/bench.d/fuse_passthrough.c, compiled into ``work``."""
    flags = run(["pkg-config", "--cflags", "--libs", "fuse3"]).stdout.split()
    binary = work / "fuse_passthrough"
    run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(LIMIT_SOURCE), *flags])
    return binary


def limit_start(binary: Path, d: Path, exports: dict[str, Path]) -> FuseServers:
    """The C passthrough server serving each raw image as ``d/limit-NAME/disk``."""
    servers = FuseServers(d)
    CLEANUP.add("fuse", servers)
    for name, img in exports.items():
        mnt = d / f"limit-{name}"
        fuse_server_mount(servers, mnt, [str(binary), str(img), str(mnt)], d / f"limit-{name}.log")
    return servers


def qemu_nbd_serve(
    sock: Path, img: Path, fmt: str, logf: Any, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """qemu-nbd serving IMG as the default export on SOCK, to up to 8 clients at once."""
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", fmt, "-t", "-e", "8", "-k", str(sock), *extra, str(img)],
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"qemu-nbd did not listen on {sock} within 30s")
        time.sleep(0.05)
    return proc, sock


def fuse_server_mount(servers: FuseServers, mnt: Path, cmd: list[str], log_path: Path) -> None:
    """Start a FUSE server (CMD) on MNT, serving MNT/disk, and wait until it serves."""
    mnt.mkdir(exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    servers.procs.append(proc)
    servers.files.append(str(mnt / "disk"))
    deadline = time.monotonic() + 60
    while not is_mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{cmd[0]} did not mount {mnt}: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)


def fuse_stop(servers: FuseServers) -> None:
    for f in servers.files:
        lazy_unmount(os.path.dirname(f))
    for proc in servers.procs:
        stop_process(proc, timeout=30)


STOPS: dict[str, Any] = {"blkfs": blkfs_umount, "qsd": qsd_stop, "fuse": fuse_stop}
"""How to stop each kind of started peer (Cleanup uses it)."""


def peer_path(kind: str, obj: Any) -> str:
    """Where a started peer lives: its mountpoint, directory or first export."""
    if kind == "blkfs":
        return str(obj)
    if kind == "fuse":
        return str(obj.d)
    return obj.files[0] if obj.files else ""


# -- workloads -------------------------------------------------------------------------------


def fio(
    filename: str,
    size: int,
    rw: str,
    bs: str,
    runtime: float | None,
    numjobs: int = 1,
    extra: tuple[str, ...] = (),
    ramp: int = 0,
    direct: bool = False,
) -> Results:
    """One fio job (the group's figures with several); its JSON."""
    fd, name = tempfile.mkstemp(prefix="bench-fio-", suffix=".json")
    os.close(fd)
    out = Path(name)
    cmd = [
        "fio",
        "--name=bench",
        f"--filename={filename}",
        f"--size={size}",
        "--ioengine=psync",
        "--iodepth=1",
        f"--direct={int(direct)}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--numjobs={numjobs}",
        "--group_reporting",
        "--fallocate=none",
        "--randrepeat=0",
        "--invalidate=0",
        "--output-format=json",
        f"--output={out}",
        *extra,
    ]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    if ramp:
        cmd += [f"--ramp_time={ramp}"]
    try:
        run(cmd, timeout=(runtime or 0) + ramp + 600)
        text = out.read_text()
    finally:
        out.unlink(missing_ok=True)
    job: Results = json.loads(text[text.index("{") :])["jobs"][0]
    return job


def warm(host_dir: Path) -> None:
    """Read the image files of one copy into the host page cache."""
    for f in sorted(host_dir.iterdir()):
        run(["dd", f"if={f}", "of=/dev/null", "bs=4M"], timeout=3600)


def workload(
    name: str,
    f: str,
    size: int,
    runtime: float,
    host_dir: Path,
    ramp: int = 0,
    direct_reads: bool = False,
) -> Sample:
    """Run one workload on file F (whose image files are in HOST_DIR)."""
    if name in ("seqread", "seqwrite") or name.endswith("-cold"):
        drop_caches()
    else:
        warm(host_dir)
    if name in ("seqread", "seqread-warm"):
        t0 = time.monotonic()
        run(
            ["dd", f"if={f}", "of=/dev/null", "bs=1M", *(["iflag=direct"] * direct_reads)],
            timeout=3600,
        )
        return {"value": size / (time.monotonic() - t0) / 1e6}
    if name == "seqwrite":
        # one full pass; wall time includes fio's final fsync
        t0 = time.monotonic()
        fio(f, size, "write", "1M", None, extra=("--end_fsync=1",))
        return {"value": size / (time.monotonic() - t0) / 1e6}
    if name not in RANDOM:
        raise ValueError(name)
    rw = "randwrite" if name == "randwrite" else "randread"
    jobs = 4 if name.startswith("randread4") else 1
    job = fio(
        f,
        size,
        rw,
        "4k",
        runtime,
        numjobs=jobs,
        ramp=ramp,
        direct=direct_reads and rw == "randread",
    )
    side = job["write" if rw == "randwrite" else "read"]
    sample = {"value": float(side["iops"])}
    pct = side.get("clat_ns", {}).get("percentile", {})
    for key, q in (("p50_us", "50.000000"), ("p99_us", "99.000000")):
        if q in pct:
            sample[key] = pct[q] / 1000
    return sample


@dataclass
class Bench:
    """One run's settings, and the samples it gathers."""

    work: Path
    size: int
    runtime: float
    ramp: int
    limit_bin: Path | None
    qsd: dict[str, QsdConfig]
    samples: Samples
    daemons: dict[str, dict[str, list[dict[str, float]]]]
    """image -> peer -> per round: peak_rss_mib, cpu_s."""
    failures: list[str]

    def run_peer(self, peer: str, image: str, src: Path, rnd: int) -> None:
        """All workloads of one peer on one image, on fresh copies: one sample each."""
        d = CLEANUP.new_dir(self.work / f"{image}-{peer}-{rnd}")
        try:
            self._run_peer(peer, image, src, d)
        finally:
            CLEANUP.stop_under(d)

    def _run_peer(self, peer: str, image: str, src: Path, d: Path) -> None:
        # r: the reads; w1: randwrite; w2: seqwrite -- each on its own fresh copy
        imgs = {g: copy_set(src, d / f"img-{g}") for g in ("r", "w1", "w2")}
        order = [
            ("seqread", "r"),
            ("seqread-warm", "r"),
            ("randread", "r"),
            ("randread4", "r"),
            ("randread-cold", "r"),
            ("randread4-cold", "r"),
            ("randwrite", "w1"),
            ("seqwrite", "w2"),
        ]
        fmt = "raw" if image == "raw" else "qcow2"
        pid = None
        if peer == "host":
            files = {g: str(p) for g, p in imgs.items()}
        elif peer in ("blkfs", "blkfs-direct", "blkfs-passthrough"):
            mnt = d / "mnt"
            backends: dict[str, Path | str] = dict(imgs.items())
            if peer == "blkfs-direct":
                backends = {g: blkfs_direct_options(p, fmt) for g, p in imgs.items()}
            if peer == "blkfs-passthrough":
                assert image == "raw"
                backends = {g: blkfs_passthrough_options(p) for g, p in imgs.items()}
            pid = blkfs_mount(mnt, backends)
            files = {g: str(mnt / g) for g in imgs}
        elif peer in self.qsd:
            q = qsd_start(d, imgs, fmt, self.qsd[peer])
            pid = q.proc.pid
            files = {g: str(d / g) for g in imgs}
        elif peer == "nbdfuse":
            files = dict(zip(imgs, nbd_start(d, imgs, fmt).files, strict=True))
        elif peer == "limit":
            assert self.limit_bin is not None and image == "raw"
            files = dict(zip(imgs, limit_start(self.limit_bin, d, imgs).files, strict=True))
        else:
            raise ValueError(peer)
        res = self.samples.setdefault(image, {})
        for wl, g in order:
            before = proc_stats(pid) if pid else {}
            try:
                sample = workload(
                    wl,
                    files[g],
                    self.size,
                    self.runtime,
                    imgs[g].parent,
                    self.ramp,
                    direct_reads=peer in PAGE_CACHED,
                )
            except Exception as exc:
                log(f"  {image:6} {peer:12} {wl:14} FAILED: {exc}")
                res.setdefault(wl, {}).setdefault(peer, [])
                self.failures.append(f"{image} {peer} {wl}: {str(exc)[-300:]}")
                continue
            extra = ""
            if pid:
                after = proc_stats(pid)
                sample["cpu_s"] = round(after.get("cpu_s", 0) - before.get("cpu_s", 0), 2)
                extra = f"  cpu {sample['cpu_s']:6.2f}s  hwm {after.get('VmHWM', 0):6.1f} MiB"
            if "p99_us" in sample:
                extra += f"  p50 {sample.get('p50_us', 0):7.1f} p99 {sample['p99_us']:7.1f} us"
            res.setdefault(wl, {}).setdefault(peer, []).append(sample)
            log(f"  {image:6} {peer:12} {wl:14} {sample['value']:12.1f} {UNITS[wl]}{extra}")
        if pid:
            st = proc_stats(pid)
            self.daemons.setdefault(image, {}).setdefault(peer, []).append(
                {
                    "peak_rss_mib": round(st.get("VmHWM", 0), 1),
                    "cpu_s": round(st.get("cpu_s", 0), 2),
                }
            )


# -- memory ----------------------------------------------------------------------------------


def many_backends_rss(work: Path, count: int) -> Results:
    """One blkfs daemon with ``count`` backends, each a qcow2 overlay over one shared base
    (so every backend opens two qcow2 and two file nodes); 64 KiB read from each."""
    d = CLEANUP.new_dir(work / "many")
    out: Results = {"backends": count}
    mnt = d / "mnt"
    try:
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(d / "base.qcow2"), "64M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -q -P 0x5a 0 8M", str(d / "base.qcow2")])
        qcow2_overlay(d, "base.qcow2", "o0.qcow2")
        for i in range(1, count):
            shutil.copyfile(d / "o0.qcow2", d / f"o{i}.qcow2")
        t0 = time.monotonic()
        pid = blkfs_mount(mnt, {f"b{i}": d / f"o{i}.qcow2" for i in range(count)})
        out["mount_s"] = round(time.monotonic() - t0, 1)
        out["after_mount"] = proc_stats(pid)
        rng = random.Random(1)
        for i in range(count):
            with open(mnt / f"b{i}", "rb", buffering=0) as f:
                f.seek(rng.randrange(0, 8 * MiB, 64 * 1024))
                f.read(64 * 1024)
        out["after_reads"] = proc_stats(pid)
        log(
            f"  {count} backends: mount {out['mount_s']}s, hwm after mount "
            f"{out['after_mount'].get('VmHWM', 0):.1f} MiB, after a read from each "
            f"{out['after_reads'].get('VmHWM', 0):.1f} MiB"
        )
    except subprocess.TimeoutExpired as exc:
        out["error"] = f"blkfs mount with {count} backends did not finish in {exc.timeout:.0f}s"
        log(f"  {count} backends FAILED: {out['error']}")
    except Exception as exc:
        out["error"] = str(exc)[-1000:]
        log(f"  {count} backends FAILED: {out['error']}")
    finally:
        drop_scratch_mount(mnt, d)
    out["peak_rss_mib"] = round(
        max(out.get(k, {}).get("VmHWM", 0) for k in ("after_mount", "after_reads")), 1
    )
    out["ok"] = out["peak_rss_mib"] < 150 and "error" not in out
    return out


def sparse_rss(work: Path, runtime: float) -> Results:
    d = CLEANUP.new_dir(work / "sparse")
    size = 1 << 40
    img = d / "sparse.qcow2"
    run([BLKFS, "image", "create", "-f", "qcow2", str(img), "1T"])
    mnt = d / "mnt"
    pid = blkfs_mount(mnt, {"big": img})
    f = str(mnt / "big")
    out: Results = {"size": "1T", "after_mount": proc_stats(pid)}
    log(f"  sparse 1T  after mount:     hwm {out['after_mount'].get('VmHWM', 0):6.1f} MiB")
    try:
        job = fio(f, size, "randread", "4k", runtime)
        out["randread_iops"] = job["read"]["iops"]
        out["after_randread"] = proc_stats(pid)
        log(
            f"  sparse 1T  randread 4k:     {job['read']['iops']:10.0f} IOPS  "
            f"hwm {out['after_randread'].get('VmHWM', 0):6.1f} MiB"
        )
        job = fio(f, size, "randwrite", "4k", runtime, extra=("--end_fsync=1",))
        out["randwrite_iops"] = job["write"]["iops"]
        out["randwrite_ios"] = job["write"]["total_ios"]
        out["after_randwrite"] = proc_stats(pid)
        log(
            f"  sparse 1T  randwrite 4k:    {job['write']['iops']:10.0f} IOPS "
            f"({job['write']['total_ios']} writes)  "
            f"hwm {out['after_randwrite'].get('VmHWM', 0):6.1f} MiB"
        )
        out["host_file_mib"] = round(os.stat(img).st_blocks * 512 / MiB, 1)
    except Exception as exc:
        out["error"] = str(exc)[-1000:]
        log(f"  sparse 1T FAILED: {exc}")
    finally:
        drop_scratch_mount(mnt, d)
    out["peak_rss_mib"] = round(
        max(
            out.get(k, {}).get("VmHWM", 0)
            for k in ("after_mount", "after_randread", "after_randwrite")
        ),
        1,
    )
    out["target_mib"] = 150
    out["ok"] = out["peak_rss_mib"] < 150 and "error" not in out
    return out


THROTTLE_SECONDS = 5.0
THROTTLE_TOLERANCE = 0.10


def throttle_check(work: Path, rate: int) -> Results:
    """The throttle filter in real time: a first dd at ``rate``, then a retune to rate/2
    through .ctl/reopen while a second dd runs."""
    d = CLEANUP.new_dir(work / "throttle")
    img = d / "sparse.img"  # holes read at host speed: the filter is what is measured
    with open(img, "wb") as host_file:
        host_file.truncate(4 * rate * int(THROTTLE_SECONDS) + 64 * MiB)
    mnt = d / "mnt"
    blkfs_mount(
        mnt,
        {
            "thr": f"driver=throttle,node-name=thr,limits.bps-read={rate},"
            f"file.driver=file,file.filename={img}"
        },
    )
    f = str(mnt / "thr")
    out: Results = {"limit_bps": rate, "seconds": THROTTLE_SECONDS, "tolerance": THROTTLE_TOLERANCE}

    def read_bytes() -> int:
        with open(mnt / ".ctl" / "status.json") as st:
            return int(json.load(st)["backends"][0]["stats"]["read_bytes"])

    try:
        count = int(rate * THROTTLE_SECONDS) // MiB
        start = time.monotonic()
        run(["dd", f"if={f}", "of=/dev/null", "bs=1M", f"count={count}", "status=none"])
        out["first_bps"] = count * MiB / (time.monotonic() - start)
        log(
            f"  throttle {fmt_size(rate)}/s:  dd {count} MiB: "
            f"{out['first_bps'] / MiB:7.2f} MiB/s ({out['first_bps'] / rate:.3f} of the limit)"
        )

        # second dd: half the time at the limit, then (after the retune) long enough at the
        # half rate to measure a window and still be running at its end
        half = THROTTLE_SECONDS / 2
        count = int(rate * half + rate / 2 * (half + 2)) // MiB
        skip = int(rate * THROTTLE_SECONDS) // MiB + 1  # no page of the first pass reused
        dd = subprocess.Popen(
            [
                "dd",
                f"if={f}",
                "of=/dev/null",
                "bs=1M",
                f"count={count}",
                f"skip={skip}",
                "status=none",
            ]
        )
        try:
            time.sleep(half)
            with open(mnt / ".ctl" / "reopen", "w") as ctl:
                ctl.write(f"thr limits.bps-read={rate // 2}\n")
            time.sleep(0.2)  # the burst bucket empties at the new rate
            t0, b0 = time.monotonic(), read_bytes()
            time.sleep(half)
            t1, b1 = time.monotonic(), read_bytes()
            running = dd.poll() is None
        except BaseException:
            dd.kill()
            raise
        finally:
            dd.wait(timeout=60)
        if dd.returncode != 0:
            raise RuntimeError(f"dd through the throttled backend failed ({dd.returncode})")
        if not running:
            raise RuntimeError("the second dd ended before the measuring window did")
        out["retuned_bps"] = (b1 - b0) / (t1 - t0)
        log(
            f"  throttle retuned to {fmt_size(rate // 2)}/s while dd runs: second half "
            f"{out['retuned_bps'] / MiB:7.2f} MiB/s "
            f"({out['retuned_bps'] / (rate // 2):.3f} of the new limit)"
        )
        with open(mnt / ".ctl" / "status.json") as st:
            info = json.load(st)["backends"][0]["tree"]["info"]
        out["limits_after"] = info["limits"]
        out["throttled_s"] = round(info["throttled-ns"] / 1e9, 2)
    except Exception as exc:
        out["error"] = str(exc)[-1000:]
        log(f"  throttle FAILED: {exc}")
    finally:
        drop_scratch_mount(mnt, d)
    out["ok"] = (
        "error" not in out
        and abs(out["first_bps"] / rate - 1) <= THROTTLE_TOLERANCE
        and abs(out["retuned_bps"] / (rate // 2) - 1) <= THROTTLE_TOLERANCE
    )
    return out


NBD_WORKLOADS = ["seqread-warm", "randread", "randread4", "randwrite"]


def nbd_check(work: Path, size: int, runtime: float) -> Results:
    """blkfs's nbd driver against nbdfuse, both clients of one qemu-nbd; and blkfs's NBD
    export against qemu-nbd, both read whole by nbdcopy. On a raw and a qcow2 image."""
    d = CLEANUP.new_dir(work / "nbd")
    srcs = make_images(d, size, ["qcow2"])
    out: Results = {}
    try:
        for fmt in ("raw", "qcow2"):
            img = srcs[fmt]
            rows = out.setdefault(fmt, {})
            nbd = FuseServers(d)
            CLEANUP.add("fuse", nbd)
            with open(d / f"qemu-nbd-{fmt}.log", "wb") as logf:
                proc, sock = qemu_nbd_serve(d / f"{fmt}.sock", img, fmt, logf)
            nbd.procs.append(proc)  # stopped with nbdfuse, after it
            fuse_server_mount(
                nbd,
                d / f"nbdfuse-{fmt}",
                ["nbdfuse", str(d / f"nbdfuse-{fmt}/disk"), "--unix", str(sock)],
                d / f"nbdfuse-{fmt}.log",
            )
            mnt = d / f"blkfs-{fmt}"
            blkfs_mount(mnt, {"d": f"nbd+unix:///?socket={sock}"})
            for wl in NBD_WORKLOADS:
                for peer, f in (("blkfs", str(mnt / "d")), ("nbdfuse", nbd.files[0])):
                    sample = workload(
                        wl, f, size, runtime, img.parent, direct_reads=peer == "nbdfuse"
                    )
                    rows.setdefault(wl, {})[peer] = sample["value"]
                log(
                    f"  nbd {fmt:5} {wl:12} blkfs {rows[wl]['blkfs']:10.1f}  nbdfuse "
                    f"{rows[wl]['nbdfuse']:10.1f} {UNITS[wl]}"
                )
            CLEANUP.stop("blkfs", str(mnt))
            CLEANUP.stop("fuse", nbd)
            rows["nbdcopy"] = export_reads(d, img, fmt, size)
            log(
                f"  nbd {fmt:5} nbdcopy      blkfs {rows['nbdcopy']['blkfs']:10.1f}  qemu-nbd "
                f"{rows['nbdcopy']['qemu-nbd']:10.1f} MB/s"
            )
    except Exception as exc:
        out["error"] = str(exc)[-1000:]
        log(f"  nbd FAILED: {exc}")
    finally:
        CLEANUP.stop_under(d)
    return out


SLOW_DELAYS_MS = (2, 50)
SLOW_SIZE = 256 * MiB


def slow_check(work: Path, size: int, runtime: float) -> Results:
    """The neighbour and slow-device rows (see the module docstring), for blkfs and qsd."""
    d = CLEANUP.new_dir(work / "slow")
    local = make_images(d, size, [])["raw"]
    out: Results = {}
    devices = FuseServers(d)
    CLEANUP.add("fuse", devices)
    try:
        for ms in SLOW_DELAYS_MS:
            sock = d / f"dev{ms}.sock"
            with open(d / f"dev{ms}.log", "wb") as logf:
                devices.procs.append(
                    subprocess.Popen(
                        [
                            "nbdkit",
                            "-f",
                            "-U",
                            str(sock),
                            "--filter=delay",
                            "memory",
                            str(SLOW_SIZE),
                            f"delay-read={ms}ms",
                        ],
                        stdout=logf,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nbdkit did not listen on {sock} within 30s")
                time.sleep(0.05)
            # a socket, not --command: nbdfuse then opens 4 connections (multi-conn); on one
            # connection libnbd's synchronous calls serve one request at a time
            fuse_server_mount(
                devices,
                d / f"dev{ms}",
                ["nbdfuse", str(d / f"dev{ms}/disk"), "--unix", str(sock)],
                d / f"dev{ms}.log",
            )
        disks = dict(zip(SLOW_DELAYS_MS, map(Path, devices.files), strict=True))
        names = ("local", "dev2", "dev50")
        mnt = d / "blkfs"
        blkfs_mount(
            mnt,
            {
                "local": local,
                **{
                    f"dev{ms}": f"driver=raw,file.driver=file,file.filename={disk},"
                    "file.cache.direct=on"
                    for ms, disk in disks.items()
                },
            },
        )
        try:
            out["blkfs"] = slow_rows(
                "blkfs", {n: str(mnt / n) for n in names}, local, size, runtime
            )
        finally:
            CLEANUP.stop("blkfs", str(mnt))
        qd = d / "qsd"
        qd.mkdir()
        q = qsd_start(
            qd,
            {"local": local, "dev2": disks[2], "dev50": disks[50]},
            "raw",
            QSD_CONFIGS["qsd"],
            direct=("dev2", "dev50"),
        )
        try:
            out["qsd"] = slow_rows("qsd", {n: str(qd / n) for n in names}, local, size, runtime)
        finally:
            CLEANUP.stop("qsd", q)
    except Exception as exc:
        out["error"] = str(exc)[-1000:]
        log(f"  slow devices FAILED: {exc}")
    finally:
        CLEANUP.stop("fuse", devices)
        CLEANUP.stop_under(d)
    return out


def slow_rows(peer: str, files: dict[str, str], local: Path, size: int, runtime: float) -> Results:
    """One peer's figures: local p50 alone and beside two readers of the 50 ms device; IOPS
    of 1 and 4 jobs on each device. qsd's FUSE files are read with O_DIRECT (see
    PAGE_CACHED)."""
    direct = peer in PAGE_CACHED
    rows: Results = {}
    warm(local.parent)
    alone = fio(files["local"], size, "randread", "4k", runtime, ramp=1, direct=direct)
    busy = subprocess.Popen(
        [
            "fio",
            "--name=neighbour",
            f"--filename={files['dev50']}",
            f"--size={SLOW_SIZE}",
            "--ioengine=psync",
            "--rw=randread",
            "--bs=4k",
            "--numjobs=2",
            f"--direct={int(direct)}",
            "--time_based",
            f"--runtime={runtime + 30}",
            "--output=/dev/null",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        beside = fio(files["local"], size, "randread", "4k", runtime, ramp=1, direct=direct)
    finally:
        busy.terminate()
        busy.wait()
    p50 = [job["read"]["clat_ns"]["percentile"]["50.000000"] / 1000 for job in (alone, beside)]
    rows["neighbour"] = {"alone_p50_us": p50[0], "beside_p50_us": p50[1], "ratio": p50[1] / p50[0]}
    log(
        f"  slow {peer:5} neighbour: local p50 {p50[0]:.0f} us alone, {p50[1]:.0f} us beside "
        f"two readers of the 50 ms device ({p50[1] / p50[0]:.2f}x)"
    )
    for ms in SLOW_DELAYS_MS:
        iops = [
            fio(
                files[f"dev{ms}"], SLOW_SIZE, "randread", "4k", runtime, numjobs=jobs, direct=direct
            )["read"]["iops"]
            for jobs in (1, 4)
        ]
        rows[f"dev{ms}"] = {
            "jobs1_iops": iops[0],
            "jobs4_iops": iops[1],
            "ratio": iops[1] / iops[0],
        }
        log(
            f"  slow {peer:5} {ms} ms device: {iops[0]:.1f} IOPS with 1 job, {iops[1]:.1f} "
            f"with 4 ({iops[1] / iops[0]:.2f}x)"
        )
    return rows


def slow_table(slow: Results) -> str:
    rows = [["row", "blkfs", "qsd", "target"]]
    n = slow.get("blkfs", {}).get("neighbour", {})
    q = slow.get("qsd", {}).get("neighbour", {})
    rows.append(
        [
            "neighbour: local p50 alone (us)",
            num(n.get("alone_p50_us")),
            num(q.get("alone_p50_us")),
            "",
        ]
    )
    rows.append(
        [
            "neighbour: local p50 beside 50 ms (us)",
            num(n.get("beside_p50_us")),
            num(q.get("beside_p50_us")),
            "",
        ]
    )
    rows.append(["neighbour: beside / alone", num(n.get("ratio")), num(q.get("ratio")), "<= 2"])
    for ms in SLOW_DELAYS_MS:
        b = slow.get("blkfs", {}).get(f"dev{ms}", {})
        c = slow.get("qsd", {}).get(f"dev{ms}", {})
        rows.append(
            [f"{ms} ms device: IOPS 1 job", num(b.get("jobs1_iops")), num(c.get("jobs1_iops")), ""]
        )
        rows.append(
            [f"{ms} ms device: IOPS 4 jobs", num(b.get("jobs4_iops")), num(c.get("jobs4_iops")), ""]
        )
        rows.append(
            [f"{ms} ms device: 4 jobs / 1 job", num(b.get("ratio")), num(c.get("ratio")), ">= 3.5"]
        )
    return md_table(rows)


def export_reads(d: Path, img: Path, fmt: str, size: int) -> dict[str, float]:
    """MB/s of ``nbdcopy URI null:`` from blkfs's export of IMG and from qemu-nbd -r (both
    read-only, so that both may hold the image at once)."""
    rates = {}
    mnt, sock = d / f"export-{fmt}", d / f"export-{fmt}.sock"
    blkfs_mount(mnt, {"d": f"{img},read-only=on"}, "--nbd", f"unix:{sock}", "--export", "d")
    nbd = FuseServers(d)
    CLEANUP.add("fuse", nbd)
    with open(d / f"qemu-nbd-ro-{fmt}.log", "wb") as logf:
        nbd.procs.append(qemu_nbd_serve(d / f"ro-{fmt}.sock", img, fmt, logf, "-r")[0])
    for peer, uri in (
        ("blkfs", f"nbd+unix:///d?socket={sock}"),
        ("qemu-nbd", f"nbd+unix:///?socket={d / f'ro-{fmt}.sock'}"),
    ):
        warm(img.parent)
        t0 = time.monotonic()
        run(["nbdcopy", uri, "null:"], timeout=3600)
        rates[peer] = size / (time.monotonic() - t0) / 1e6
    CLEANUP.stop("blkfs", str(mnt))
    CLEANUP.stop("fuse", nbd)
    return rates


def nbd_table(nbd: Results) -> str:
    rows = [["image", "workload", "unit", "blkfs", "peer", "peer value", "blkfs/peer"]]
    for fmt in ("raw", "qcow2"):
        for wl in [*NBD_WORKLOADS, "nbdcopy"]:
            r = nbd.get(fmt, {}).get(wl, {})
            peer = "qemu-nbd" if wl == "nbdcopy" else "nbdfuse"
            rows.append(
                [
                    fmt,
                    "nbdcopy read" if wl == "nbdcopy" else wl,
                    UNITS.get(wl, "MB/s"),
                    num(r.get("blkfs")),
                    peer,
                    num(r.get(peer)),
                    ratio(r.get("blkfs"), r.get(peer)),
                ]
            )
    return md_table(rows, right_from=3)


# -- report ----------------------------------------------------------------------------------


def peer_samples(samples: Samples, image: str, wl: str, peer: str) -> list[Sample]:
    return samples.get("raw" if peer in RAW_ONLY else image, {}).get(wl, {}).get(peer, [])


def spread(
    samples: Samples, image: str, wl: str, peer: str, key: str = "value"
) -> tuple[float, float, float] | None:
    """Median, min and max over the rounds; None if never measured (or always failed)."""
    vals = [s[key] for s in peer_samples(samples, image, wl, peer) if key in s]
    return (statistics.median(vals), min(vals), max(vals)) if vals else None


def med(samples: Samples, image: str, wl: str, peer: str, key: str = "value") -> float | None:
    s = spread(samples, image, wl, peer, key)
    return s[0] if s else None


def qsd_best(samples: Samples, image: str, wl: str, peers: list[str]) -> tuple[str, float] | None:
    """The qsd configuration with the best median on this row, and that median."""
    found = [
        (v, p) for p in peers if p in QSD_CONFIGS if (v := med(samples, image, wl, p)) is not None
    ]
    if not found:
        return None
    v, p = max(found)
    return p, v


def div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def ratio(a: float | None, b: float | None) -> str:
    r = div(a, b)
    return f"{r:.2f}" if r is not None else "-"


def num(v: float | None) -> str:
    if v is None:
        return "FAIL"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def compact(v: float) -> str:
    if v >= 99_950:
        return f"{v / 1e3:.0f}k"
    if v >= 9_995:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def cell(s: tuple[float, float, float] | None) -> str:
    return f"{compact(s[0])} [{compact(s[1])}-{compact(s[2])}]" if s else "-"


def summarize(samples: Samples, images: list[str], peers: list[str]) -> list[Results]:
    """Per row: each peer's median, min, max; qsd-best; the ratios of medians."""
    rows = []
    for image in images:
        for wl in WORKLOADS:
            m = {p: med(samples, image, wl, p) for p in peers}
            best = qsd_best(samples, image, wl, peers)
            rows.append(
                {
                    "image": image,
                    "workload": wl,
                    "unit": UNITS[wl],
                    "peers": {p: spread(samples, image, wl, p) for p in peers},
                    "qsd_best": best[0] if best else None,
                    "blkfs/qsd-best": div(m.get("blkfs"), best[1] if best else None),
                    "blkfs/limit": div(m.get("blkfs"), m.get("limit")),
                    "blkfs-passthrough/limit": div(m.get("blkfs-passthrough"), m.get("limit")),
                    "blkfs/host": div(m.get("blkfs"), m.get("host")),
                    "blkfs-direct/qsd-direct": div(m.get("blkfs-direct"), m.get("qsd-direct")),
                }
            )
    return rows


def table(samples: Samples, images: list[str], peers: list[str]) -> str:
    shown = [p for p in PEERS if p in peers]
    pairs = [
        (a, b)
        for a, b in (
            ("blkfs", "limit"),
            ("blkfs-passthrough", "limit"),
            ("blkfs", "host"),
            ("blkfs", "nbdfuse"),
            ("blkfs-direct", "qsd-direct"),
        )
        if a in shown and b in shown
    ]
    rows = [
        [
            "image",
            "workload",
            "unit",
            *shown,
            "qsd-best",
            "blkfs/qsd-best",
            *(f"{a.replace('blkfs-', '')}/{b}" for a, b in pairs),
        ]
    ]
    for image in images:
        for wl in WORKLOADS:
            m = {p: med(samples, image, wl, p) for p in shown}
            best = qsd_best(samples, image, wl, shown)
            rows.append(
                [
                    image,
                    wl,
                    UNITS[wl],
                    *(cell(spread(samples, image, wl, p)) for p in shown),
                    best[0] if best else "-",
                    ratio(m.get("blkfs"), best[1] if best else None),
                    *(ratio(m.get(a), m.get(b)) for a, b in pairs),
                ]
            )
    return md_table(rows, right_from=3)


def latency_table(samples: Samples, images: list[str], peers: list[str], seconds: float) -> str:
    """p50/p99 completion latency of the random rows, and daemon CPU per I/O."""
    shown = [p for p in PEERS if p in peers and p != "host"]
    rows = [
        [
            "image",
            "workload",
            *(f"{p} p50/p99 us" for p in shown),
            "blkfs CPU us/IO",
            "qsd-best CPU us/IO",
        ]
    ]

    def cpu_per_io(image: str, wl: str, peer: str | None) -> str:
        if peer is None:
            return "-"
        cpu, iops = med(samples, image, wl, peer, "cpu_s"), med(samples, image, wl, peer)
        return f"{cpu / (iops * seconds) * 1e6:.0f}" if cpu and iops else "-"

    for image in images:
        for wl in RANDOM:
            best = qsd_best(samples, image, wl, shown)
            lat = []
            for p in shown:
                p50, p99 = (med(samples, image, wl, p, k) for k in ("p50_us", "p99_us"))
                lat.append(f"{p50:.0f}/{p99:.0f}" if p50 is not None and p99 is not None else "-")
            rows.append(
                [
                    image,
                    wl,
                    *lat,
                    cpu_per_io(image, wl, "blkfs"),
                    cpu_per_io(image, wl, best[0] if best else None),
                ]
            )
    return md_table(rows, right_from=2)


def chain_table(samples: Samples, peers: list[str]) -> str:
    shown = [p for p in ("blkfs", "blkfs-direct", "qsd", "qsd-uring", "qsd-direct") if p in peers]
    rows = [["workload", *(f"{p} chain/qcow2" for p in shown)]]
    rows += [
        [wl, *(ratio(med(samples, "chain", wl, p), med(samples, "qcow2", wl, p)) for p in shown)]
        for wl in WORKLOADS
    ]
    return md_table(rows, right_from=1)


def daemon_table(daemons: dict[str, dict[str, list[dict[str, float]]]], images: list[str]) -> str:
    rows = [["image", "daemon", "peak RSS MiB (max of rounds)", "CPU s per round (median)"]]
    for image in images:
        for peer in PEERS:
            rounds = daemons.get(image, {}).get(peer)
            if rounds:
                rows.append(
                    [
                        image,
                        peer,
                        f"{max(r['peak_rss_mib'] for r in rounds):.1f}",
                        f"{statistics.median(r['cpu_s'] for r in rounds):.1f}",
                    ]
                )
    return md_table(rows, right_from=2)


def targets(
    samples: Samples,
    images: list[str],
    peers: list[str],
    rss: list[tuple[str, float]],
    failed: list[str],
) -> list[str]:
    """Every figure below issue #26's targets (ratios of medians of this run), one line each:
    4 KiB random reads against the C limit and between images, qsd's best configuration on
    the QD1 and sequential rows, fsynced sequential writes, and kernel passthrough."""
    below = []

    def check(what: str, num: float | None, den: float | None, want: float) -> None:
        if num and den and num / den < want:
            below.append(f"{what}: {num / den:.2f} < {want}")

    def blkfs(image: str, wl: str, peer: str = "blkfs") -> float | None:
        return med(samples, image, wl, peer) if image in images else None

    def limit(wl: str) -> float | None:
        return med(samples, "raw", wl, "limit")

    check("blkfs qcow2/raw randread", blkfs("qcow2", "randread"), blkfs("raw", "randread"), 0.9)
    check("blkfs chain/qcow2 randread", blkfs("chain", "randread"), blkfs("qcow2", "randread"), 0.9)
    for image, qd1, jobs4 in (("raw", 0.6, 0.55), ("qcow2", 0.55, 0.45), ("chain", 0.55, 0.45)):
        for wl, want in (("randread", qd1), ("randread4", jobs4)):
            check(f"blkfs/limit {image} {wl}", blkfs(image, wl), limit(wl), want)
        for wl in ("randread", "seqread", "seqread-warm", "seqwrite"):
            best = qsd_best(samples, image, wl, peers)
            if best:
                check(f"blkfs/qsd-best ({best[0]}) {image} {wl}", blkfs(image, wl), best[1], 1.0)
    check("blkfs/limit raw seqwrite", blkfs("raw", "seqwrite"), limit("seqwrite"), 0.9)
    passthrough = blkfs("raw", "randread4", "blkfs-passthrough")
    check("blkfs-passthrough/limit raw randread4", passthrough, limit("randread4"), 2.0)
    below += [f"RSS {what}: {mib:.1f} MiB >= 150 MiB" for what, mib in rss if mib >= 150]
    return below + failed


# -- main ------------------------------------------------------------------------------------


def require(ap: argparse.ArgumentParser, *tools: str) -> None:
    """Stop with a usage error if one of ``tools`` is not installed."""
    for tool in tools:
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed (scripts/setup installs it)")


def main() -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[1],
    )
    ap.add_argument("--size", type=parse_size, help="image size (default 1G; --quick: 256M)")
    ap.add_argument(
        "--runtime",
        type=float,
        help="seconds per random fio run, after the ramp (default 10; --quick: 2)",
    )
    ap.add_argument(
        "--ramp", type=int, help="fio ramp seconds of the random rows (default 2; --quick: 1)"
    )
    ap.add_argument("--rounds", type=int, help="rounds over all peers (default 5; --quick: 2)")
    ap.add_argument("--seed", type=int, help="seed of the shuffled peer order (default: random)")
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run: 256 MiB, 2 rounds of 2 s fio runs"
    )
    ap.add_argument(
        "--only",
        default=",".join(IMAGES),
        help="images to measure, comma separated (raw,qcow2,chain)",
    )
    ap.add_argument(
        "--peers", default=",".join(PEERS), help=f"peers, comma separated ({','.join(PEERS)})"
    )
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--dir", help="scratch directory (default: a new temp dir in /var/tmp)")
    ap.add_argument(
        "--sparse-rss",
        action="store_true",
        help="only the memory checks (1 TiB sparse qcow2, many backends)",
    )
    ap.add_argument("--no-sparse-rss", action="store_true", help="skip the memory checks")
    ap.add_argument(
        "--rss-backends",
        type=int,
        help="backends of the many-backends memory check (default 1000, which "
        "takes minutes to open; --quick: 100; 0: skip)",
    )
    ap.add_argument(
        "--nbd",
        action="store_true",
        help="only the NBD rows (driver vs nbdfuse, export vs qemu-nbd)",
    )
    ap.add_argument("--no-nbd", action="store_true", help="skip the NBD rows")
    ap.add_argument(
        "--throttle",
        action="store_true",
        help="only the real-time throttle check (rate, then a live retune)",
    )
    ap.add_argument("--no-throttle", action="store_true", help="skip the throttle check")
    ap.add_argument(
        "--throttle-rate",
        type=parse_size,
        default=50 * MiB,
        help="the throttle check's limits.bps-read (default 50M)",
    )
    ap.add_argument(
        "--slow",
        action="store_true",
        help="only the slow-device rows (neighbour of a 50 ms device; 1 vs 4 jobs "
        "on 2 ms and 50 ms devices), blkfs and qsd",
    )
    ap.add_argument("--no-slow", action="store_true", help="skip the slow-device rows")
    ap.add_argument(
        "--jobs",
        action="store_true",
        help="also the block-job table (scripts/bench_jobs.py), --rounds runs each",
    )
    ap.add_argument(
        "--rbd",
        action="store_true",
        help="also the RBD table (scripts/bench_rbd.py: blkfs vs rbd-fuse and qsd on one "
        "image in a throwaway cluster), --rounds rounds",
    )
    args = ap.parse_args()

    size = args.size or (256 * MiB if args.quick else GiB)
    runtime = args.runtime or (2 if args.quick else 10)
    ramp = args.ramp if args.ramp is not None else (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 5)
    many = args.rss_backends if args.rss_backends is not None else (100 if args.quick else 1000)
    images = [i for i in args.only.split(",") if i]
    peers = [p for p in args.peers.split(",") if p]
    for i in images:
        if i not in IMAGES:
            ap.error(f"unknown image {i!r} (choose from {', '.join(IMAGES)})")
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r} (choose from {', '.join(PEERS)})")
    if rounds < 1:
        ap.error("--rounds must be at least 1")
    if os.geteuid() != 0:
        ap.error("must run as root (drops the page cache and mounts FUSE)")
    require(ap, "fio", "qemu-img", "qemu-io", "qemu-storage-daemon", "fusermount3")
    if "nbdfuse" in peers:
        require(ap, "nbdfuse", "nbdkit", "qemu-nbd")
    if "limit" in peers:
        require(ap, "gcc", "pkg-config")

    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (&)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(CLEANUP.run)

    base = Path(args.dir).resolve() if args.dir else Path("/var/tmp")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="blkfs-bench-", dir=base))
    CLEANUP.add("dir", str(work))
    free = shutil.disk_usage(work).free
    only_one = args.sparse_rss or args.throttle or args.nbd or args.slow

    def wanted(check: str) -> bool:
        """Whether a check after the table runs: if named (--nbd: only the checks named),
        or if none is named and it is not left out (--no-nbd)."""
        return bool(getattr(args, check)) or not (getattr(args, f"no_{check}") or only_one)

    need = size * (1 + 2 * len(images) + 3 * 3) if not only_one else 4 * GiB
    if free < need:
        log(
            f"warning: {work} has {free / GiB:.1f} GiB free, this run may need {need / GiB:.1f} GiB"
        )
    fstype = run(["findmnt", "-no", "FSTYPE", "-T", str(work)], check=False).stdout.strip()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)

    info = machine_info()
    load = os.getloadavg()
    results: Results = {
        "machine": info,
        "size": size,
        "runtime_s": runtime,
        "ramp_s": ramp,
        "rounds": rounds,
        "seed": seed,
        "scratch": f"{work} ({fstype})",
        "loadavg_start": load,
        "notes": [],
    }
    notes: list[str] = results["notes"]
    print("machine:")
    for k, v in info.items():
        print(f"  {k:8} {v}")
    print(f"  scratch  {work} ({fstype})")
    print(
        f"  load     {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start "
        "(other work on the machine makes wall-clock figures noisy)"
    )
    print(
        f"size {fmt_size(size)}, {rounds} round(s), fio {runtime:g}s after a {ramp}s ramp, "
        f"images {','.join(images)}, peers {','.join(peers)}, seed {seed}",
        flush=True,
    )

    t_start = time.monotonic()
    rss: list[tuple[str, float]] = []
    failed: list[str] = []
    try:
        if not only_one:
            qsd = {p: c for p, c in QSD_CONFIGS.items() if p in peers}
            if any(c.aio == "io_uring" for c in qsd.values()):
                why = probe_qsd(work, QsdConfig("io_uring", True, False))
                if why:
                    notes.append(
                        f"qsd aio=io_uring does not work here ({why}): qsd-uring runs "
                        "aio=threads, qsd-direct aio=native"
                    )
                    for p, c in qsd.items():
                        if c.aio == "io_uring":
                            qsd[p] = QsdConfig("native" if c.direct else None, c.iothread, c.direct)
            results["qsd_configs"] = {p: vars(c) for p, c in qsd.items()}
            limit_bin = None
            if "limit" in peers:
                log("building the limit (scripts/bench.d/fuse_passthrough.c)")
                limit_bin = build_limit(work)
            log("making images")
            srcs = make_images(work, size, images)
            bench = Bench(work, size, runtime, ramp, limit_bin, qsd, {}, {}, [])
            units = [
                (p, i)
                for i in images
                for p in peers
                if p not in RAW_ONLY and (p not in RAW_IMAGE_ONLY or i == "raw")
            ]
            units += [(p, "raw") for p in peers if p in RAW_ONLY]
            rng = random.Random(seed)
            for rnd in range(rounds):
                rng.shuffle(units)
                log(f"round {rnd + 1}/{rounds}: " + " ".join(f"{p}:{i}" for p, i in units))
                for peer, image in units:
                    bench.run_peer(peer, image, srcs[image], rnd)
            samples = bench.samples
            results["samples"] = samples
            results["daemons"] = bench.daemons
            results["rows"] = summarize(samples, images, peers)
            results["failures"] = bench.failures
            for image in images:
                for p in ("blkfs", "blkfs-direct"):
                    runs = bench.daemons.get(image, {}).get(p)
                    if runs:
                        rss.append(
                            (f"{p} {image} (3 backends)", max(r["peak_rss_mib"] for r in runs))
                        )
            print()
            print(
                f"throughput: MB/s (10^6 bytes/s) for seq*, IOPS for rand*; each cell is the "
                f"median [min-max] of {rounds} round(s); ratios are of medians, > 1 means "
                "blkfs is faster. limit and host are the raw image, shown on every row. "
                "qsd-best: the qsd configuration with the best median on that row. "
                "direct/qsd-direct: blkfs-direct over qsd-direct (both O_DIRECT on the image "
                "files). qsd* and nbdfuse read their FUSE files with O_DIRECT (no direct_io)."
            )
            for n in notes:
                print(f"note: {n}")
            print(table(samples, images, peers))
            for failure in bench.failures:
                print(f"FAILED (left out of the medians): {failure}")
            print()
            print(
                f"latency: fio completion latency p50/p99 in us (medians of the rounds); "
                f"CPU us/IO: the daemon's CPU during the run over the I/Os of its "
                f"{runtime:g}s (the {ramp}s ramp's CPU included, so slightly high)"
            )
            print(latency_table(samples, images, peers, runtime + ramp))
            if "chain" in images and "qcow2" in images:
                print()
                print(
                    "chain vs single qcow2 (ratio of medians; issue #26's target: >= 0.9 "
                    "for blkfs's QD1 random reads):"
                )
                print(chain_table(samples, peers))
            print()
            print(
                "daemons (one per image and round, 3 images open: reads, randwrite, "
                "seqwrite copies):"
            )
            print(daemon_table(bench.daemons, images))
        if wanted("nbd"):
            require(ap, "qemu-nbd", "nbdfuse", "nbdcopy")
            log("NBD: blkfs's driver vs nbdfuse, blkfs's export vs qemu-nbd")
            results["nbd"] = nbd_check(work, size, runtime)
            print()
            print(
                "NBD (one round): blkfs over the nbd driver vs nbdfuse (both clients of one "
                "qemu-nbd); blkfs's export vs qemu-nbd -r, both read by nbdcopy:"
            )
            print(nbd_table(results["nbd"]))
        if wanted("sparse_rss"):
            log("sparse 1 TiB qcow2 RSS check")
            sp = sparse_rss(work, runtime)
            results["sparse_rss"] = sp
            if "error" in sp:
                failed.append(f"RSS of the sparse 1 TiB qcow2: {sp['error']}")
            rss.append(("sparse 1 TiB qcow2", sp["peak_rss_mib"]))
            print()
            print(
                f"sparse 1 TiB qcow2 in blkfs: peak RSS {sp['peak_rss_mib']} MiB "
                f"(target < 150 MiB: {'OK' if sp['ok'] else 'FAILED'}); "
                f"randread {sp.get('randread_iops', 0):,.0f} IOPS, randwrite "
                f"{sp.get('randwrite_iops', 0):,.0f} IOPS ({sp.get('randwrite_ios', 0)} "
                f"writes, image grew to {sp.get('host_file_mib', '?')} MiB)"
                + (f"; error: {sp['error']}" if "error" in sp else "")
            )
            if many > 0:
                log(f"{many} backends RSS check")
                mb = many_backends_rss(work, many)
                results["many_backends_rss"] = mb
                if "error" in mb:
                    failed.append(f"RSS with {many} backends: not measured ({mb['error']})")
                else:
                    rss.append((f"{many} backends", mb["peak_rss_mib"]))
                print(
                    f"{many} backends (qcow2 overlays over one base) in one blkfs daemon: "
                    f"peak RSS {mb['peak_rss_mib']} MiB after a 64 KiB read from each "
                    f"(target < 150 MiB: {'OK' if mb['ok'] else 'FAILED'}); mount took "
                    f"{mb.get('mount_s', '?')}s"
                    + (f"; error: {mb['error']}" if "error" in mb else "")
                )
        if wanted("throttle"):
            log("throttle real-time check")
            th = throttle_check(work, args.throttle_rate)
            results["throttle"] = th
            print()
            rate = args.throttle_rate
            print(
                f"throttle limits.bps-read={fmt_size(rate)} in blkfs: dd "
                f"{th.get('first_bps', 0) / MiB:.2f} MiB/s ({th.get('first_bps', 0) / rate:.3f}"
                f" of the limit); retuned to {fmt_size(rate // 2)} while dd runs: "
                f"{th.get('retuned_bps', 0) / MiB:.2f} MiB/s "
                f"({th.get('retuned_bps', 0) / (rate // 2):.3f} of the new limit); target "
                f"within {THROTTLE_TOLERANCE:.0%}: {'OK' if th['ok'] else 'FAILED'}"
                + (f"; error: {th['error']}" if "error" in th else "")
            )
        if wanted("slow"):
            require(ap, "nbdfuse", "nbdkit")
            log("slow devices: a neighbour of a 50 ms device; 1 vs 4 jobs on slow devices")
            results["slow"] = slow_check(work, size, runtime)
            print()
            print(
                "slow devices (one round; 4k random reads, fio psync QD1; qsd with QEMU's "
                "defaults, aio=threads):"
            )
            print(slow_table(results["slow"]))
        if args.jobs:
            import bench_jobs  # scripts/ is on sys.path: this script's directory

            log("block jobs (scripts/bench_jobs.py)")
            jobs = bench_jobs.run_job_bench(work / "jobs", size // MiB * MiB, rounds)
            results["jobs"] = jobs
            print()
            print(bench_jobs.job_table(jobs))
        if args.rbd:
            import bench_rbd  # scripts/ is on sys.path: this script's directory

            log("RBD (scripts/bench_rbd.py)")
            results["rbd"] = bench_rbd.run_rbd_bench(work / "rbd", size, runtime, rounds)
            print()
            print(
                "RBD: blkfs's rbd driver vs rbd-fuse and qsd's rbd driver (FUSE export) on one "
                "image, medians of the rounds:"
            )
            print(bench_rbd.rbd_table(results["rbd"]))
        if "samples" in results or failed:
            below = targets(results.get("samples", {}), images, peers, rss, failed)
            results["below_target"] = below
            print()
            print(
                "below issue #26's targets:"
                if below
                else "every measured figure meets issue #26's targets"
            )
            for line in below:
                print(f"- {line}")
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'SIGINT'}); cleaning up")
        results["interrupted"] = True
        return 130
    finally:
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        results["loadavg_end"] = os.getloadavg()
        CLEANUP.run()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
            log(f"results written to {args.json}")
    end = results["loadavg_end"]
    print(
        f"\nelapsed {results['elapsed_s']}s; load average at the end {end[0]:.2f} "
        f"{end[1]:.2f} {end[2]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
