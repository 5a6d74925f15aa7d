"""RBD: blkfs over its ``rbd`` driver against rbd-fuse and qemu-storage-daemon's ``rbd``
driver (FUSE export), on one image in a throwaway single-node cluster (tests/ceph.py).

Why: the three are clients of the same cluster through the same librbd, so the ratios show
what each FUSE server and block layer adds. Every peer serves the same image in turn (a
writable blkfs holds the image's exclusive lock, so they never run at once), in a shuffled
order each round; reported are medians over the rounds and blkfs's ratio to each peer.

Workloads (fio, psync): sequential read and write of the whole image (1 MiB, MB/s; the
write ends with an fsync), and 4 KiB random reads and writes, 1 job and 4 jobs (IOPS) for
RUNTIME seconds each. blkfs serves its files with direct_io; rbd-fuse and qsd's FUSE export
use the page cache, so they are read and written with O_DIRECT (fio --direct=1) and every
request reaches the server, as in blkfs. qsd runs with cache.direct=on, which turns librbd's
write-back cache off as blkfs does (a write is answered when the OSDs have it). The cluster
keeps objects in memory (memstore), so the figures are of the clients, not of a disk.

Usage: .venv/bin/python scripts/bench_rbd.py [--size 256M] [--runtime 5] [--rounds 3]
                                             [--json FILE]
Needs root (FUSE mounts). scripts/bench --rbd imports it: run_rbd_bench(work, size, runtime,
rounds) and rbd_table(results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib import (
    BLKFS,
    REPO,
    Failed,
    MiB,
    blkfs_umount,
    is_mounted,
    lazy_unmount,
    log,
    md_table,
    stop_process,
)
from benchlib import parse_size as size_arg
from benchlib import run as run_cmd

PEERS = ["blkfs", "rbd-fuse", "qsd"]
WORKLOADS = {
    "seqread": ("read", "1M", 1),
    "seqwrite": ("write", "1M", 1),
    "randread": ("randread", "4k", 1),
    "randread4": ("randread", "4k", 4),
    "randwrite": ("randwrite", "4k", 1),
    "randwrite4": ("randwrite", "4k", 4),
}
"""name: (fio rw, block size, jobs)."""
IMAGE = "bench"


@contextlib.contextmanager
def test_cluster(d: Path) -> Iterator[Path]:
    """The tests' throwaway cluster (``python -m tests.ceph``) for the body; its conf."""
    d.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ceph", str(d / "cluster")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=open(d / "cluster.log", "wb"),
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            raise Failed(f"the test cluster did not start: {(d / 'cluster.log').read_text()}")
        yield Path(line)
    finally:
        stop_process(proc)


@contextlib.contextmanager
def serving(peer: str, d: Path, conf: Path) -> Iterator[str]:
    """One peer serving the image as a FUSE file for the body; the file's path."""
    mnt = d / peer
    if peer == "blkfs":
        mnt.mkdir(exist_ok=True)
        run_cmd(
            [BLKFS, "mount", str(mnt), "--backend", f"d=rbd:rbd/{IMAGE}:conf={conf}"],
            timeout=120,
        )
        try:
            yield str(mnt / "d")
        finally:
            blkfs_umount(mnt)
        return
    if peer == "rbd-fuse":
        mnt.mkdir(exist_ok=True)
        cmd = ["rbd-fuse", "-f", "-c", str(conf), "-p", "rbd", str(mnt)]
        path = mnt / IMAGE
    else:
        mnt.touch()
        cmd = [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=rbd,node-name=n,pool=rbd,image={IMAGE},conf={conf},cache.direct=on",
            "--export",
            f"type=fuse,id=e,node-name=n,mountpoint={mnt},writable=on",
        ]
        path = mnt
    log_path = d / f"{peer}.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Failed(f"{cmd[0]} did not mount {mnt}: {log_path.read_text()[-1500:]}")
            time.sleep(0.05)
        yield str(path)
    finally:
        stop_process(proc)
        lazy_unmount(mnt)


def fio(path: str, name: str, size: int, runtime: float, direct: bool) -> float:
    """One workload on ``path``: MB/s for the sequential ones, IOPS for the others."""
    rw, bs, jobs = WORKLOADS[name]
    sequential = not rw.startswith("rand")
    cmd = [
        "fio",
        "--name=w",
        f"--filename={path}",
        f"--rw={rw}",
        f"--bs={bs}",
        f"--size={size}",
        f"--numjobs={jobs}",
        "--ioengine=psync",
        f"--direct={int(direct)}",
        "--group_reporting",
        "--output-format=json",
    ]
    if sequential:
        cmd += ["--end_fsync=1"] if rw == "write" else []
    else:
        cmd += ["--time_based", f"--runtime={runtime}", "--randrepeat=0"]
    text = run_cmd(cmd, timeout=3600, check=False).stdout
    try:
        out = json.loads(text[text.index("{") :])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise Failed(f"fio {name} on {path}: no report: {text[-300:]}") from None
    if out["error"]:
        raise Failed(f"fio {name} on {path}: {os.strerror(out['error'])}")
    side = out["write" if "write" in rw else "read"]
    if sequential:
        return float(side["bw_bytes"]) / 1e6
    return float(side["iops"])


def run_rbd_bench(work: Path, size: int, runtime: float, rounds: int) -> dict[str, Any]:
    """``{workload: {peer: [one value per round]}}``, or ``{"error": ...}`` with what was
    measured before it."""
    samples: dict[str, dict[str, list[float]]] = {w: {p: [] for p in PEERS} for w in WORKLOADS}
    failures: dict[str, str] = {}
    """The first failure of each peer's workload (its figure is then left out)."""
    results: dict[str, Any] = {
        "size": size,
        "runtime": runtime,
        "samples": samples,
        "failures": failures,
    }
    try:
        with test_cluster(work) as conf:
            base = ["rbd", "--conf", str(conf)]
            run_cmd([*base, "create", "--size", f"{size // MiB}M", f"rbd/{IMAGE}"])
            fill = ["--io-type", "write", "--io-size", "4M", "--io-pattern", "seq"]
            run_cmd([*base, "bench", *fill, "--io-total", str(size), f"rbd/{IMAGE}"], timeout=600)
            order = list(PEERS)
            for round_ in range(rounds):
                random.shuffle(order)
                for peer in order:
                    with serving(peer, work, conf) as path:
                        for name in WORKLOADS:
                            try:
                                value = fio(path, name, size, runtime, direct=peer != "blkfs")
                            except Failed as exc:  # rbd-fuse: ENOENT opening a busy image
                                failures.setdefault(f"{peer} {name}", str(exc))
                                log(f"  rbd round {round_ + 1} {peer:8} {name:10} failed")
                                continue
                            samples[name][peer].append(value)
                            log(f"  rbd round {round_ + 1} {peer:8} {name:10} {value:10.1f}")
    except (Failed, OSError, subprocess.SubprocessError) as exc:
        results["error"] = str(exc)[-1500:]
        log(f"  rbd FAILED: {exc}")
    return results


def rbd_table(results: dict[str, Any]) -> str:
    samples = results["samples"]
    rows = [["workload", "unit", *PEERS, "blkfs/rbd-fuse", "blkfs/qsd"]]
    for name in WORKLOADS:
        meds = {p: statistics.median(v) if v else None for p, v in samples[name].items()}
        rows.append(
            [
                name,
                "MB/s" if name.startswith("seq") else "IOPS",
                *(f"{meds[p]:.1f}" if meds[p] is not None else "-" for p in PEERS),
                *(ratio(meds["blkfs"], meds[p]) for p in ("rbd-fuse", "qsd")),
            ]
        )
    lines = [md_table(rows, right_from=2)]
    lines += [f"{what} failed: {why}" for what, why in results["failures"].items()]
    if "error" in results:
        lines.append(f"error: {results['error']}")
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=size_arg, default=256 * MiB, help="image size (default 256M)")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per random workload")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the samples to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="blkfs-bench-rbd-", dir="/var/tmp") as work:
        results = run_rbd_bench(Path(work), args.size, args.runtime, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(rbd_table(results))
    return 1 if "error" in results else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
