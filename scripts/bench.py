"""Benchmark blkfs against the host file and qemu-storage-daemon (qsd) FUSE exports.

Run through ``scripts/bench`` (which runs ``scripts/setup`` first). Needs root (drops the page
cache, mounts FUSE). One run measures, on the same images:

images    raw      random data, SIZE bytes
          qcow2    ``qemu-img convert -O qcow2`` of the raw image
          chain    base.qcow2 (the data) <- mid.qcow2 <- top.qcow2, each overlay with a few MiB
                   written by qemu-io
peers     host     the raw image file itself, no FUSE (the limit; measured once, shown per row)
          blkfs    ``blkfs mount`` (one daemon per image, one backend per workload group)
          qsd      ``qemu-storage-daemon --export type=fuse`` (one daemon per image)
          nbdfuse  nbdfuse (libnbd) over nbdkit's file plugin for raw; nbdkit 1.32 cannot
                   read qcow2, so over ``qemu-nbd -f qcow2`` for qcow2 and the chain
workloads seqread  dd if=F of=/dev/null bs=1M after drop_caches          -> MB/s
          seqread-warm  the same, image files in the host page cache      -> MB/s
          seqwrite fio --rw=write --bs=1M --end_fsync=1, one full pass     -> MB/s (incl. fsync)
          randread fio psync 4k QD1 1 job, time based                     -> IOPS
          randread4 same, --numjobs=4 --group_reporting                   -> IOPS
          randwrite fio psync 4k QD1 1 job, time based                    -> IOPS

Reads use one copy of the image; randwrite and seqwrite each get a fresh copy, so writes never
change what a later measurement sees. The page cache is dropped before seqread and seqwrite
(they include the disk); before the others the image files are read once on the host, so
those measure each layer's own cost rather than the disk's. All fio runs use
--direct=0 (FUSE files). For the daemons, peak RSS (VmHWM) and CPU seconds (utime+stime) are
read from /proc/PID.

``--sparse-rss`` (also run at the end of a normal run unless ``--no-sparse-rss``): a 1 TiB
sparse qcow2 made by ``blkfs image create``, mounted in blkfs, 4k random reads over the whole
1 TiB, then 4k random writes at spread offsets; reports the daemon's VmHWM (target < 150 MiB).

``--nbd`` (also run at the end of a normal run unless ``--no-nbd``): NBD, on raw and qcow2
images of SIZE, every pair served by one qemu-nbd or read the same way. blkfs with a backend
``nbd+unix:///?socket=S`` versus nbdfuse on the same qemu-nbd socket (seqread-warm, randread,
randread4, randwrite through each FUSE file); then blkfs's NBD export of the image versus
``qemu-nbd -r`` serving it, each read whole by ``nbdcopy URI null:`` (image warm) -> MB/s.

``--throttle`` (also run at the end of a normal run unless ``--no-throttle``): a blkfs backend
``driver=throttle,limits.bps-read=N`` over a sparse raw image (N from ``--throttle-rate``,
default 50M, binary units as in blkfs options); ``dd bs=1M`` for about 5 s must read at N
within 10%. Then, while another dd runs, ``.ctl/reopen`` retunes the limit to N/2, and the rate
of the second half (from the backend's read_bytes in status.json) must be N/2 within 10%.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BLKFS = str(REPO / ".venv" / "bin" / "blkfs")
MiB = 1 << 20
GiB = 1 << 30

WORKLOADS = ["seqread", "seqread-warm", "seqwrite", "randread", "randread4", "randwrite"]
UNITS = {"seqread": "MB/s", "seqread-warm": "MB/s", "seqwrite": "MB/s", "randread": "IOPS",
         "randread4": "IOPS", "randwrite": "IOPS"}
IMAGES = ["raw", "qcow2", "chain"]
PEERS = ["host", "blkfs", "qsd", "nbdfuse"]


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


# -- cleanup ---------------------------------------------------------------------------------

class Cleanup:
    """Everything started is registered here and torn down in reverse order exactly once."""

    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []

    def add(self, kind: str, obj: object) -> None:
        self.items.append((kind, obj))

    def remove(self, kind: str, obj: object) -> None:
        try:
            self.items.remove((kind, obj))
        except ValueError:
            pass

    def run(self) -> None:
        while self.items:
            kind, obj = self.items.pop()
            try:
                if kind in STOPS:
                    STOPS[kind](obj)
                elif kind == "dir":
                    shutil.rmtree(obj, ignore_errors=True)  # type: ignore[arg-type]
            except BaseException as exc:  # keep cleaning the rest
                log(f"cleanup of {kind} {obj}: {exc}")


CLEANUP = Cleanup()


def on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


# -- helpers ---------------------------------------------------------------------------------

def run(cmd: list[str], timeout: float = 600, check: bool = True,
        **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]


def fmt_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        log(f"warning: cannot drop caches: {exc}")


def proc_stats(pid: int) -> dict[str, float]:
    """Peak/current RSS in MiB and CPU seconds of a live process."""
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


def copy_image(src: Path, dst: Path) -> None:
    run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dst)])


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def machine_info() -> dict[str, str]:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass

    def version(cmd: list[str]) -> str:
        try:
            return run(cmd, check=False, timeout=20).stdout.splitlines()[0].strip()
        except Exception:
            return "not installed"

    pyfuse3 = run([str(REPO / ".venv/bin/python"), "-c",
                   "import pyfuse3, trio; print(pyfuse3.__version__, trio.__version__)"],
                  check=False).stdout.split()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3[0] if pyfuse3 else "?",
        "trio": pyfuse3[1] if len(pyfuse3) > 1 else "?",
        "qemu": version(["qemu-storage-daemon", "--version"]),
        "fio": version(["fio", "--version"]),
        "blkfs": run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                     check=False).stdout.strip() or "?",
    }


def _os_release() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "?"


# -- images ----------------------------------------------------------------------------------

def make_images(d: Path, size: int, which: list[str]) -> dict[str, Path]:
    """Returns image name -> directory holding that image's files (img or top.qcow2)."""
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
        # relative backing names, so a copy of the directory is a working chain
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             "mid.qcow2"], cwd=str(c))
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             "top.qcow2"], cwd=str(c))
        step = size // 8
        for name, pattern, offsets in (("mid.qcow2", 0x11, (1, 3, 5)),
                                       ("top.qcow2", 0x22, (2, 5, 7))):
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
    run(cmd, timeout=120)
    with open(mnt / ".ctl" / "status.json") as f:
        return int(json.load(f)["pid"])


def drop_scratch_mount(mnt: Path, d: Path) -> None:
    """Unmount a check's own mount and remove its scratch directory."""
    CLEANUP.remove("blkfs", str(mnt))
    blkfs_umount(str(mnt))
    CLEANUP.remove("dir", str(d))
    shutil.rmtree(d, ignore_errors=True)


def blkfs_umount(mnt: str) -> None:
    pid = None
    try:
        with open(os.path.join(mnt, ".ctl", "status.json")) as f:
            pid = int(json.load(f)["pid"])
    except (OSError, ValueError, KeyError):
        pass
    proc = subprocess.run([BLKFS, "umount", mnt], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        log(f"blkfs umount {mnt}: {proc.stderr.strip()}; killing the daemon")
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.1)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


class Qsd:
    def __init__(self, proc: subprocess.Popen[bytes], files: list[str], logf: Path) -> None:
        self.proc, self.files, self.logf = proc, files, logf


def qsd_start(d: Path, exports: dict[str, Path], fmt: str) -> Qsd:
    cmd = ["qemu-storage-daemon"]
    files = []
    for i, (name, img) in enumerate(exports.items()):
        mp = d / name
        mp.touch()
        files.append(str(mp))
        cmd += ["--blockdev", f"driver=file,node-name=f{i},filename={img}",
                "--blockdev", f"driver={fmt},node-name=n{i},file=f{i}",
                "--export", f"type=fuse,id=e{i},node-name=n{i},mountpoint={mp},writable=on"]
    logf = d / "qsd.log"
    proc = subprocess.Popen(cmd, stdout=open(logf, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
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
    if q.proc.poll() is None:
        q.proc.send_signal(signal.SIGTERM)
        try:
            q.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            q.proc.kill()
            q.proc.wait()
    for f in q.files:
        if is_mounted(f):
            subprocess.run(["fusermount3", "-u", "-z", f], capture_output=True)


class Nbd:
    """nbdfuse mounts (one per image), each with its NBD server."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.files: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []


def nbd_start(d: Path, exports: dict[str, Path], fmt: str) -> Nbd:
    """nbdfuse serving each image as ``d/nbd-NAME/disk``: raw through ``nbdkit -s file``
    (NBD on nbdfuse's stdin/stdout), qcow2 through a ``qemu-nbd`` unix socket."""
    nbd = Nbd(d)
    CLEANUP.add("nbdfuse", nbd)
    for name, img in exports.items():
        mnt = d / f"nbd-{name}"
        with open(d / f"nbd-{name}.log", "wb") as logf:  # the children keep their copies
            if fmt == "raw":
                cmd = ["nbdfuse", f"{mnt}/disk", "--command", "nbdkit", "-s", "file", str(img)]
            else:
                proc, sock = qemu_nbd_serve(d / f"nbd-{name}.sock", img, fmt, logf)
                nbd.procs.append(proc)
                cmd = ["nbdfuse", f"{mnt}/disk", "--unix", str(sock)]
        nbdfuse_mount(nbd, mnt, cmd, d / f"nbd-{name}.log")
    return nbd


def qemu_nbd_serve(sock: Path, img: Path, fmt: str, logf: Any,
                   *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    """qemu-nbd serving IMG as the default export on SOCK, to up to 8 clients at once."""
    proc = subprocess.Popen(["qemu-nbd", "-f", fmt, "-t", "-e", "8", "-k", str(sock), *extra,
                             str(img)], stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"qemu-nbd did not listen on {sock} within 30s")
        time.sleep(0.05)
    return proc, sock


def nbdfuse_mount(nbd: Nbd, mnt: Path, cmd: list[str], log_path: Path) -> None:
    """Start nbdfuse (CMD) on MNT/disk and wait until it serves."""
    mnt.mkdir(exist_ok=True)
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    nbd.procs.append(proc)
    nbd.files.append(str(mnt / "disk"))
    deadline = time.monotonic() + 60
    while not is_mounted(str(mnt)):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nbdfuse did not mount {mnt}: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)


def nbd_stop(nbd: Nbd) -> None:
    for f in nbd.files:
        mnt = os.path.dirname(f)
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    for proc in nbd.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


STOPS: dict[str, Any] = {"blkfs": blkfs_umount, "qsd": qsd_stop, "nbdfuse": nbd_stop}
"""How to stop each started peer, by peer name (Cleanup and run_peer use it)."""


def peer_path(kind: str, obj: Any) -> str:
    """Where a started peer lives: its mountpoint, directory or first export."""
    if kind == "blkfs":
        return str(obj)
    if kind == "nbdfuse":
        return str(obj.d)
    return obj.files[0] if obj.files else ""


# -- workloads -------------------------------------------------------------------------------

def fio(filename: str, size: int, rw: str, bs: str, runtime: float | None,
        numjobs: int = 1, extra: list[str] = ()) -> dict:  # type: ignore[assignment]
    out = Path(tempfile.mktemp(prefix="bench-fio-", suffix=".json"))
    cmd = ["fio", "--name=bench", f"--filename={filename}", f"--size={size}",
           "--ioengine=psync", "--iodepth=1", "--direct=0", f"--rw={rw}", f"--bs={bs}",
           f"--numjobs={numjobs}", "--group_reporting", "--fallocate=none",
           "--randrepeat=0", "--invalidate=0", "--output-format=json", f"--output={out}", *extra]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    try:
        run(cmd, timeout=(runtime or 0) + 600)
        text = out.read_text()
    finally:
        out.unlink(missing_ok=True)
    job = json.loads(text[text.index("{"):])["jobs"][0]
    return job


def warm(host_dir: Path) -> None:
    """Read the image files of one copy into the host page cache."""
    for f in sorted(host_dir.iterdir()):
        run(["dd", f"if={f}", "of=/dev/null", "bs=4M"], timeout=3600)


def workload(name: str, f: str, size: int, runtime: float, host_dir: Path) -> float:
    if name in ("seqread", "seqwrite"):
        drop_caches()
    else:
        warm(host_dir)
    if name in ("seqread", "seqread-warm"):
        t0 = time.monotonic()
        run(["dd", f"if={f}", "of=/dev/null", "bs=1M"], timeout=3600)
        return size / (time.monotonic() - t0) / 1e6
    if name == "seqwrite":
        # one full pass; wall time includes fio's final fsync
        t0 = time.monotonic()
        fio(f, size, "write", "1M", None, extra=["--end_fsync=1"])
        return size / (time.monotonic() - t0) / 1e6
    if name == "randread":
        return fio(f, size, "randread", "4k", runtime)["read"]["iops"]
    if name == "randread4":
        return fio(f, size, "randread", "4k", runtime, numjobs=4)["read"]["iops"]
    if name == "randwrite":
        return fio(f, size, "randwrite", "4k", runtime)["write"]["iops"]
    raise ValueError(name)


def run_peer(peer: str, image: str, src: Path, work: Path, size: int, runtime: float,
             results: dict) -> None:
    """All workloads of one peer on one image; fills results[image][workload][peer]."""
    d = work / f"{image}-{peer}"
    d.mkdir(parents=True)
    CLEANUP.add("dir", str(d))
    try:
        # r: the reads; w1: randwrite; w2: seqwrite -- each on its own fresh copy
        imgs = {g: copy_set(src, d / f"img-{g}") for g in ("r", "w1", "w2")}
        order = [("seqread", "r"), ("seqread-warm", "r"), ("randread", "r"), ("randread4", "r"),
                 ("randwrite", "w1"), ("seqwrite", "w2")]
        pid = None
        handle: object = None
        if peer == "host":
            files = {g: str(p) for g, p in imgs.items()}
        elif peer == "blkfs":
            mnt = d / "mnt"
            pid = blkfs_mount(mnt, imgs)
            handle = str(mnt)
            files = {g: str(mnt / g) for g in imgs}
        elif peer == "qsd":
            fmt = "raw" if image == "raw" else "qcow2"
            q = qsd_start(d, imgs, fmt)
            pid, handle = q.proc.pid, q
            files = {g: str(d / g) for g in imgs}
        elif peer == "nbdfuse":
            handle = nbd_start(d, imgs, "raw" if image == "raw" else "qcow2")
            files = dict(zip(imgs, handle.files, strict=False))  # type: ignore[attr-defined]
        else:
            raise ValueError(peer)
        res = results.setdefault(image, {})
        daemon: dict = {}
        for wl, g in order:
            before = proc_stats(pid) if pid else {}
            try:
                value = workload(wl, files[g], size, runtime, imgs[g].parent)
            except Exception as exc:
                log(f"  {image:6} {peer:6} {wl:12} FAILED: {exc}")
                res.setdefault(wl, {})[peer] = None
                res[wl].setdefault("errors", {})[peer] = str(exc)[-500:]
                continue
            res.setdefault(wl, {})[peer] = value
            extra = ""
            if pid:
                after = proc_stats(pid)
                cpu = after.get("cpu_s", 0) - before.get("cpu_s", 0)
                res[wl].setdefault("cpu_s", {})[peer] = round(cpu, 2)
                extra = f"  cpu {cpu:6.2f}s  hwm {after.get('VmHWM', 0):6.1f} MiB"
            log(f"  {image:6} {peer:6} {wl:12} {value:12.1f} {UNITS[wl]}{extra}")
        if pid:
            st = proc_stats(pid)
            daemon = {"peak_rss_mib": round(st.get("VmHWM", 0), 1),
                      "rss_mib": round(st.get("VmRSS", 0), 1),
                      "cpu_s": round(st.get("cpu_s", 0), 2)}
            results.setdefault("_daemons", {}).setdefault(image, {})[peer] = daemon
        if handle is not None:  # every peer but host: stop it, errors included
            CLEANUP.remove(peer, handle)
            STOPS[peer](handle)
    finally:
        for kind, obj in list(CLEANUP.items):
            if kind in STOPS and peer_path(kind, obj).startswith(str(d)):
                CLEANUP.remove(kind, obj)
                try:
                    STOPS[kind](obj)
                except Exception as exc:
                    log(f"cleanup: {exc}")
        CLEANUP.remove("dir", str(d))
        shutil.rmtree(d, ignore_errors=True)


def sparse_rss(work: Path, runtime: float) -> dict:
    d = work / "sparse"
    d.mkdir(parents=True)
    CLEANUP.add("dir", str(d))
    size = 1 << 40
    img = d / "sparse.qcow2"
    run([BLKFS, "image", "create", "-f", "qcow2", str(img), "1T"])
    mnt = d / "mnt"
    pid = blkfs_mount(mnt, {"big": img})
    f = str(mnt / "big")
    out: dict = {"size": "1T", "after_mount": proc_stats(pid)}
    log(f"  sparse 1T  after mount:     hwm {out['after_mount'].get('VmHWM', 0):6.1f} MiB")
    try:
        job = fio(f, size, "randread", "4k", runtime)
        out["randread_iops"] = job["read"]["iops"]
        out["after_randread"] = proc_stats(pid)
        log(f"  sparse 1T  randread 4k:     {job['read']['iops']:10.0f} IOPS  "
            f"hwm {out['after_randread'].get('VmHWM', 0):6.1f} MiB")
        job = fio(f, size, "randwrite", "4k", runtime, extra=["--end_fsync=1"])
        out["randwrite_iops"] = job["write"]["iops"]
        out["randwrite_ios"] = job["write"]["total_ios"]
        out["after_randwrite"] = proc_stats(pid)
        log(f"  sparse 1T  randwrite 4k:    {job['write']['iops']:10.0f} IOPS "
            f"({job['write']['total_ios']} writes)  "
            f"hwm {out['after_randwrite'].get('VmHWM', 0):6.1f} MiB")
        out["host_file_mib"] = round(os.stat(img).st_blocks * 512 / MiB, 1)
    except Exception as exc:
        out["error"] = str(exc)[-1000:]
        log(f"  sparse 1T FAILED: {exc}")
    finally:
        drop_scratch_mount(mnt, d)
    out["peak_rss_mib"] = round(max(out.get(k, {}).get("VmHWM", 0) for k in
                                    ("after_mount", "after_randread", "after_randwrite")), 1)
    out["target_mib"] = 150
    out["ok"] = out["peak_rss_mib"] < 150 and "error" not in out
    return out


THROTTLE_SECONDS = 5.0
THROTTLE_TOLERANCE = 0.10


def throttle_check(work: Path, rate: int) -> dict:
    """The throttle filter in real time: a first dd at ``rate``, then a retune to rate/2
    through .ctl/reopen while a second dd runs."""
    d = work / "throttle"
    d.mkdir(parents=True)
    CLEANUP.add("dir", str(d))
    img = d / "sparse.img"  # holes read at host speed: the filter is what is measured
    with open(img, "wb") as f:
        f.truncate(4 * rate * int(THROTTLE_SECONDS) + 64 * MiB)
    mnt = d / "mnt"
    blkfs_mount(mnt, {"thr": f"driver=throttle,node-name=thr,limits.bps-read={rate},"
                             f"file.driver=file,file.filename={img}"})
    f = str(mnt / "thr")
    out: dict = {"limit_bps": rate, "seconds": THROTTLE_SECONDS,
                 "tolerance": THROTTLE_TOLERANCE}

    def read_bytes() -> int:
        with open(mnt / ".ctl" / "status.json") as st:
            return int(json.load(st)["backends"][0]["stats"]["read_bytes"])

    try:
        count = int(rate * THROTTLE_SECONDS) // MiB
        start = time.monotonic()
        run(["dd", f"if={f}", "of=/dev/null", "bs=1M", f"count={count}", "status=none"])
        out["first_bps"] = count * MiB / (time.monotonic() - start)
        log(f"  throttle {fmt_size(rate)}/s:  dd {count} MiB: "
            f"{out['first_bps'] / MiB:7.2f} MiB/s ({out['first_bps'] / rate:.3f} of the limit)")

        # second dd: half the time at the limit, then (after the retune) long enough at the
        # half rate to measure a window and still be running at its end
        half = THROTTLE_SECONDS / 2
        count = int(rate * half + rate / 2 * (half + 2)) // MiB
        skip = int(rate * THROTTLE_SECONDS) // MiB + 1  # no page of the first pass reused
        dd = subprocess.Popen(["dd", f"if={f}", "of=/dev/null", "bs=1M", f"count={count}",
                               f"skip={skip}", "status=none"])
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
        log(f"  throttle retuned to {fmt_size(rate // 2)}/s while dd runs: second half "
            f"{out['retuned_bps'] / MiB:7.2f} MiB/s "
            f"({out['retuned_bps'] / (rate // 2):.3f} of the new limit)")
        with open(mnt / ".ctl" / "status.json") as st:
            info = json.load(st)["backends"][0]["tree"]["info"]
        out["limits_after"] = info["limits"]
        out["throttled_s"] = round(info["throttled-ns"] / 1e9, 2)
    except Exception as exc:
        out["error"] = str(exc)[-1000:]
        log(f"  throttle FAILED: {exc}")
    finally:
        drop_scratch_mount(mnt, d)
    out["ok"] = ("error" not in out
                 and abs(out["first_bps"] / rate - 1) <= THROTTLE_TOLERANCE
                 and abs(out["retuned_bps"] / (rate // 2) - 1) <= THROTTLE_TOLERANCE)
    return out


NBD_WORKLOADS = ["seqread-warm", "randread", "randread4", "randwrite"]


def nbd_check(work: Path, size: int, runtime: float) -> dict:
    """blkfs's nbd driver against nbdfuse, both clients of one qemu-nbd; and blkfs's NBD
    export against qemu-nbd, both read whole by nbdcopy. On a raw and a qcow2 image."""
    d = work / "nbd"
    d.mkdir(parents=True)
    CLEANUP.add("dir", str(d))
    srcs = make_images(d, size, ["qcow2"])
    out: dict = {}
    try:
        for fmt in ("raw", "qcow2"):
            img = srcs[fmt]
            rows = out.setdefault(fmt, {})
            nbd = Nbd(d)
            CLEANUP.add("nbdfuse", nbd)
            with open(d / f"qemu-nbd-{fmt}.log", "wb") as logf:
                proc, sock = qemu_nbd_serve(d / f"{fmt}.sock", img, fmt, logf)
            nbd.procs.append(proc)  # stopped with nbdfuse, after it
            nbdfuse_mount(nbd, d / f"nbdfuse-{fmt}", ["nbdfuse", str(d / f"nbdfuse-{fmt}/disk"),
                                                       "--unix", str(sock)],
                          d / f"nbdfuse-{fmt}.log")
            mnt = d / f"blkfs-{fmt}"
            blkfs_mount(mnt, {"d": f"nbd+unix:///?socket={sock}"})
            for wl in NBD_WORKLOADS:
                for peer, f in (("blkfs", str(mnt / "d")), ("nbdfuse", nbd.files[0])):
                    rows.setdefault(wl, {})[peer] = workload(wl, f, size, runtime, img.parent)
                log(f"  nbd {fmt:5} {wl:12} blkfs {rows[wl]['blkfs']:10.1f}  nbdfuse "
                    f"{rows[wl]['nbdfuse']:10.1f} {UNITS[wl]}")
            CLEANUP.remove("blkfs", str(mnt))
            blkfs_umount(str(mnt))
            CLEANUP.remove("nbdfuse", nbd)
            nbd_stop(nbd)
            rows["nbdcopy"] = export_reads(d, img, fmt, size)
            log(f"  nbd {fmt:5} nbdcopy      blkfs {rows['nbdcopy']['blkfs']:10.1f}  qemu-nbd "
                f"{rows['nbdcopy']['qemu-nbd']:10.1f} MB/s")
    except Exception as exc:
        out["error"] = str(exc)[-1000:]
        log(f"  nbd FAILED: {exc}")
    finally:
        for kind, obj in list(CLEANUP.items):
            if kind in STOPS and peer_path(kind, obj).startswith(str(d)):
                CLEANUP.remove(kind, obj)
                STOPS[kind](obj)
        CLEANUP.remove("dir", str(d))
        shutil.rmtree(d, ignore_errors=True)
    return out


def export_reads(d: Path, img: Path, fmt: str, size: int) -> dict[str, float]:
    """MB/s of ``nbdcopy URI null:`` from blkfs's export of IMG and from qemu-nbd -r (both
    read-only, so that both may hold the image at once)."""
    rates = {}
    mnt, sock = d / f"export-{fmt}", d / f"export-{fmt}.sock"
    blkfs_mount(mnt, {"d": f"{img},read-only=on"}, "--nbd", f"unix:{sock}", "--export", "d")
    nbd = Nbd(d)
    CLEANUP.add("nbdfuse", nbd)
    with open(d / f"qemu-nbd-ro-{fmt}.log", "wb") as logf:
        nbd.procs.append(qemu_nbd_serve(d / f"ro-{fmt}.sock", img, fmt, logf, "-r")[0])
    for peer, uri in (("blkfs", f"nbd+unix:///d?socket={sock}"),
                      ("qemu-nbd", f"nbd+unix:///?socket={d / f'ro-{fmt}.sock'}")):
        warm(img.parent)
        t0 = time.monotonic()
        run(["nbdcopy", uri, "null:"], timeout=3600)
        rates[peer] = size / (time.monotonic() - t0) / 1e6
    CLEANUP.remove("blkfs", str(mnt))
    blkfs_umount(str(mnt))
    CLEANUP.remove("nbdfuse", nbd)
    nbd_stop(nbd)
    return rates


def nbd_table(nbd: dict) -> str:
    rows = [["image", "workload", "unit", "blkfs", "peer", "peer value", "blkfs/peer"]]
    for fmt in ("raw", "qcow2"):
        for wl in [*NBD_WORKLOADS, "nbdcopy"]:
            r = nbd.get(fmt, {}).get(wl, {})
            peer = "qemu-nbd" if wl == "nbdcopy" else "nbdfuse"
            rows.append([fmt, "nbdcopy read" if wl == "nbdcopy" else wl,
                         UNITS.get(wl, "MB/s"), num(r.get("blkfs")), peer, num(r.get(peer)),
                         ratio(r.get("blkfs"), r.get(peer))])
    return md_table(rows, right_from=3)


# -- report ----------------------------------------------------------------------------------

def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def num(v: float | None) -> str:
    if v is None:
        return "FAIL"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def table(results: dict, images: list[str], peers: list[str]) -> str:
    shown = [p for p in PEERS if p in peers]
    others = [p for p in shown if p not in ("host", "blkfs")]
    rows = [["image", "workload", "unit", *shown, *(f"blkfs/{p}" for p in others),
             "blkfs/host", "blkfs cpu s", "qsd cpu s"]]
    for image in images:
        for wl in WORKLOADS:
            r = results.get(image, {}).get(wl, {})
            cpu = r.get("cpu_s", {})
            rows.append([image, wl, UNITS[wl], *(num(r.get(p)) for p in shown),
                         *(ratio(r.get("blkfs"), r.get(p)) for p in others),
                         ratio(r.get("blkfs"), r.get("host")),
                         f"{cpu['blkfs']:.1f}" if "blkfs" in cpu else "-",
                         f"{cpu['qsd']:.1f}" if "qsd" in cpu else "-"])
    return md_table(rows, right_from=3)


def daemon_table(results: dict, images: list[str]) -> str:
    rows = [["image", "blkfs peak RSS MiB", "blkfs CPU s", "qsd peak RSS MiB", "qsd CPU s"]]
    for image in images:
        d = results.get("_daemons", {}).get(image, {})
        b, q = d.get("blkfs", {}), d.get("qsd", {})
        rows.append([image, str(b.get("peak_rss_mib", "-")), str(b.get("cpu_s", "-")),
                     str(q.get("peak_rss_mib", "-")), str(q.get("cpu_s", "-"))])
    return md_table(rows, right_from=1)


def md_table(rows: list[list[str]], right_from: int) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i >= right_from else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(r, widths, strict=False))) + " |"
    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i >= right_from else "-" * w
                            for i, w in enumerate(widths)) + " |"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


# -- main ------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--size", type=parse_size, help="image size (default 1G; --quick: 256M)")
    ap.add_argument("--runtime", type=float, help="seconds per random fio run (default 10; "
                    "--quick: 3)")
    ap.add_argument("--quick", action="store_true", help="256 MiB, 3 s fio runs: a smoke run")
    ap.add_argument("--only", default=",".join(IMAGES),
                    help="images to measure, comma separated (raw,qcow2,chain)")
    ap.add_argument("--peers", default=",".join(PEERS),
                    help=f"peers, comma separated ({','.join(PEERS)})")
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--dir", help="scratch directory (default: a new temp dir in /var/tmp)")
    ap.add_argument("--sparse-rss", action="store_true",
                    help="only the 1 TiB sparse qcow2 RSS check")
    ap.add_argument("--no-sparse-rss", action="store_true", help="skip the sparse RSS check")
    ap.add_argument("--nbd", action="store_true",
                    help="only the NBD rows (driver vs nbdfuse, export vs qemu-nbd)")
    ap.add_argument("--no-nbd", action="store_true", help="skip the NBD rows")
    ap.add_argument("--throttle", action="store_true",
                    help="only the real-time throttle check (rate, then a live retune)")
    ap.add_argument("--no-throttle", action="store_true", help="skip the throttle check")
    ap.add_argument("--throttle-rate", type=parse_size, default=50 * MiB,
                    help="the throttle check's limits.bps-read (default 50M)")
    args = ap.parse_args()

    size = args.size or (256 * MiB if args.quick else GiB)
    runtime = args.runtime or (3 if args.quick else 10)
    images = [i for i in args.only.split(",") if i]
    peers = [p for p in args.peers.split(",") if p]
    for i in images:
        if i not in IMAGES:
            ap.error(f"unknown image {i!r} (choose from {', '.join(IMAGES)})")
    for p in peers:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r} (choose from {', '.join(PEERS)})")
    if os.geteuid() != 0:
        ap.error("must run as root (drops the page cache and mounts FUSE)")
    for tool in ("fio", "qemu-img", "qemu-io", "qemu-storage-daemon", "fusermount3"):
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed (scripts/setup installs it)")

    signal.signal(signal.SIGINT, on_signal)  # also when started with SIGINT ignored (&)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    atexit.register(CLEANUP.run)

    if args.dir:
        work = Path(args.dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="blkfs-bench-", dir=work))
    else:
        work = Path(tempfile.mkdtemp(prefix="blkfs-bench-", dir="/var/tmp"))
    CLEANUP.add("dir", str(work))
    free = shutil.disk_usage(work).free
    only_one = args.sparse_rss or args.throttle or args.nbd
    need = size * (1 + 2 * len(images) + 3 * 3) if not only_one else 4 * GiB
    if free < need:
        log(f"warning: {work} has {free / GiB:.1f} GiB free, this run may need "
            f"{need / GiB:.1f} GiB")
    fstype = run(["findmnt", "-no", "FSTYPE", "-T", str(work)], check=False).stdout.strip()

    info = machine_info()
    results: dict = {"machine": info, "size": size, "runtime_s": runtime,
                     "scratch": f"{work} ({fstype})"}
    print("machine:", file=sys.stdout)
    for k, v in info.items():
        print(f"  {k:8} {v}")
    print(f"  scratch  {work} ({fstype})")
    print(f"size {fmt_size(size)}, fio runtime {runtime:g}s, images {','.join(images)}, "
          f"peers {','.join(peers)}", flush=True)
    if "nbdfuse" in peers:
        for tool in ("nbdfuse", "nbdkit", "qemu-nbd"):
            if not shutil.which(tool):
                ap.error(f"{tool} is not installed (scripts/bench installs it)")

    t_start = time.monotonic()
    try:
        if not only_one:
            log("making images")
            srcs = make_images(work, size, images)
            log("measuring")
            host_done: dict = {}
            for image in images:
                for peer in peers:
                    if peer == "host":
                        # the host column is the raw file for every image: measure it once
                        if not host_done:
                            run_peer("host", "raw", srcs["raw"], work, size, runtime, host_done)
                        for wl, v in host_done.get("raw", {}).items():
                            results.setdefault(image, {}).setdefault(wl, {})["host"] = v.get("host")
                        continue
                    run_peer(peer, image, srcs[image], work, size, runtime, results)
            print()
            print("throughput: MB/s (10^6 bytes/s) for seq*, IOPS for rand*; ratios > 1 "
                  "mean blkfs is faster.")
            print("host = the raw image file read/written directly (no FUSE), same for all "
                  "rows; cpu s = daemon CPU during that workload.")
            print("seq*: page cache dropped first; rand*: image files warm in the host page "
                  "cache (measures the layer, not the disk).")
            print(table(results, images, peers))
            print()
            print("daemons (one per image, 3 images open: reads, randwrite, seqwrite copies):")
            print(daemon_table(results, images))
        if args.nbd or not (args.no_nbd or args.sparse_rss or args.throttle):
            for tool in ("qemu-nbd", "nbdfuse", "nbdcopy"):
                if not shutil.which(tool):
                    ap.error(f"{tool} is not installed (scripts/bench installs it)")
            log("NBD: blkfs's driver vs nbdfuse, blkfs's export vs qemu-nbd")
            results["nbd"] = nbd_check(work, size, runtime)
            print()
            print("NBD: blkfs over the nbd driver vs nbdfuse (both clients of one qemu-nbd); "
                  "blkfs's export vs qemu-nbd -r, both read by nbdcopy:")
            print(nbd_table(results["nbd"]))
        if args.sparse_rss or not (args.no_sparse_rss or args.throttle or args.nbd):
            log("sparse 1 TiB qcow2 RSS check")
            sp = sparse_rss(work, runtime)
            results["sparse_rss"] = sp
            print()
            print(f"sparse 1 TiB qcow2 in blkfs: peak RSS {sp['peak_rss_mib']} MiB "
                  f"(target < 150 MiB: {'OK' if sp['ok'] else 'FAILED'}); "
                  f"randread {sp.get('randread_iops', 0):,.0f} IOPS, randwrite "
                  f"{sp.get('randwrite_iops', 0):,.0f} IOPS ({sp.get('randwrite_ios', 0)} "
                  f"writes, image grew to {sp.get('host_file_mib', '?')} MiB)"
                  + (f"; error: {sp['error']}" if "error" in sp else ""))
        if args.throttle or not (args.no_throttle or args.sparse_rss or args.nbd):
            log("throttle real-time check")
            th = throttle_check(work, args.throttle_rate)
            results["throttle"] = th
            print()
            rate = args.throttle_rate
            print(f"throttle limits.bps-read={fmt_size(rate)} in blkfs: dd "
                  f"{th.get('first_bps', 0) / MiB:.2f} MiB/s ({th.get('first_bps', 0) / rate:.3f}"
                  f" of the limit); retuned to {fmt_size(rate // 2)} while dd runs: "
                  f"{th.get('retuned_bps', 0) / MiB:.2f} MiB/s "
                  f"({th.get('retuned_bps', 0) / (rate // 2):.3f} of the new limit); target "
                  f"within {THROTTLE_TOLERANCE:.0%}: {'OK' if th['ok'] else 'FAILED'}"
                  + (f"; error: {th['error']}" if "error" in th else ""))
    except KeyboardInterrupt as exc:
        log(f"interrupted ({exc or 'SIGINT'}); cleaning up")
        results["interrupted"] = True
        return 130
    finally:
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        CLEANUP.run()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2, default=str)
            log(f"results written to {args.json}")
    print(f"\nelapsed {results['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
