"""QEMU's own tools as the reference peer, and the matrix of images they make.

Every image here is made by ``qemu-img create/convert`` and ``qemu-io -c "write ..."``, so
the compatibility tests read what QEMU writes, not what blkfs thinks QEMU writes.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

KiB, MiB = 1 << 10, 1 << 20
SIZE = 4 * MiB


def run(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a peer's tool (qemu-img, nbdinfo, ...); with ``check``, an AssertionError carrying
    what it printed if it fails."""
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{args[0]} failed: {result.stdout}{result.stderr}"
    return result


def qemu(*args: str | Path) -> str:
    """Run a QEMU tool; its stdout, or an AssertionError carrying what it printed."""
    return run(*args).stdout


def qemu_io(image: Path, fmt: str, *commands: str) -> None:
    qemu("qemu-io", "-f", fmt, *[arg for command in commands for arg in ("-c", command)], image)


def to_raw(image: Path) -> bytes:
    """The image's guest-visible contents as QEMU reads them, backing chain included."""
    out = image.with_name(image.name + ".qemu.raw")
    qemu("qemu-img", "convert", "-O", "raw", image, out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def check(image: Path) -> str:
    """``qemu-img check`` output; fails the test on corruption or any error (leaks pass)."""
    result = subprocess.run(
        ["qemu-img", "check", str(image)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode in (0, 3), f"qemu-img check {image}:\n{result.stdout}{result.stderr}"
    return result.stdout


def source(path: Path, size: int = SIZE, seed: int = 1) -> Path:
    """A raw file with random data, compressible text, runs of zeros written out, and holes,
    so a convert exercises allocated, compressed, zero and unallocated clusters."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for start in range(0, size, 256 * KiB):
            kind = rng.choice(("random", "text", "text", "zeros", "hole"))
            length = min(256 * KiB, size - start)
            f.seek(start)
            if kind == "random":
                f.write(rng.randbytes(length))
            elif kind == "text":
                words = [rng.randbytes(rng.randrange(1, 12)).hex().encode() for _ in range(64)]
                f.write(b" ".join(rng.choice(words) for _ in range(length))[:length])
            elif kind == "zeros":
                f.write(bytes(length))
    return path


def convert(
    directory: Path, name: str, options: str = "", compress: bool = False, size: int = SIZE
) -> Path:
    src = source(directory / f"{name}.src", size)
    image = directory / f"{name}.qcow2"
    args = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"]
    if compress:
        args.append("-c")
    if options:
        args += ["-o", options]
    qemu(*args, src, image)
    src.unlink()
    return image


def create(
    directory: Path,
    name: str,
    options: str = "",
    size: int = SIZE,
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> Path:
    image = directory / name
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if options:
        args += ["-o", options]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "qcow2"]
    qemu(*args, image, str(size))
    return image


def _zero_kinds(d: Path, name: str, options: str) -> Path:
    """Zero clusters with a host cluster (write -z over data), without (write -z -u), and
    unaligned data around them."""
    image = create(d, f"{name}.qcow2", options)
    qemu_io(
        image,
        "qcow2",
        "write -P 0xaa 0 2M",
        "write -z 256k 128k",
        "write -z -u 1M 256k",
        "write -P 0x55 100000 5000",
        "write -z 3M 64k",
    )
    return image


def _subclusters(d: Path, name: str) -> Path:
    """Extended L2 over a backing file: allocated, zero and unallocated subclusters of one
    cluster, so some parts come from the backing file."""
    base = convert(d, f"{name}-base")
    image = create(d, f"{name}.qcow2", "extended_l2=on", backing=base.name)
    qemu_io(
        image,
        "qcow2",
        "write -P 0x11 4096 2048",
        "write -z 8192 4096",
        "write -P 0x22 65536 1000",
        "write -z -u 131072 2048",
        "write -P 0x33 3M 70000",
    )
    return image


def _chain(d: Path, name: str) -> Path:
    """raw <- qcow2 <- qcow2, each overlay naming its backing relative to itself, from
    another directory, with backing-format extensions."""
    (d / "base").mkdir(exist_ok=True)
    base = source(d / "base" / f"{name}.raw", seed=7)
    mid = create(d / "base", f"{name}-mid.qcow2", backing=base.name, backing_fmt="raw")
    qemu_io(mid, "qcow2", "write -P 0x41 0 100k", "write -z 1M 64k", "write -P 0x42 2M 3000")
    top = create(d, f"{name}.qcow2", backing=f"base/{mid.name}", backing_fmt="qcow2")
    qemu_io(
        top, "qcow2", "write -P 0x61 50k 100k", "write -z -u 2M 64k", "write -P 0x62 4000000 10000"
    )
    return top


def _short_backing(d: Path, name: str) -> Path:
    """A backing file shorter than the overlay: past its end the overlay reads zeros."""
    base = source(d / f"{name}-base.raw", size=MiB + 512, seed=3)
    image = create(d, f"{name}.qcow2", backing=base.name, backing_fmt="raw")
    qemu_io(image, "qcow2", "write -P 0x71 1M 64k", "write -P 0x72 3M 1000")
    return image


def _probed_backing(d: Path, name: str) -> Path:
    """No backing-format extension: the backing file's format is probed. The extension is
    renamed to an unknown one, which a reader must skip."""
    base = convert(d, f"{name}-base")
    image = create(d, f"{name}.qcow2", backing=base.name, backing_fmt="qcow2")
    qemu_io(image, "qcow2", "write -P 0x81 1M 64k")
    _rename_extension(image, 0xE2792ACA, 0x0B1C0FF5)
    return image


def _rename_extension(image: Path, magic: int, new_magic: int) -> None:
    with open(image, "r+b") as f:
        head = f.read(4096)
        offset = struct.unpack(">I", head[100:104])[0]  # header_length (v3)
        while offset + 8 <= len(head):
            found, length = struct.unpack(">II", head[offset : offset + 8])
            if found == 0:
                break
            if found == magic:
                f.seek(offset)
                f.write(struct.pack(">I", new_magic))
                return
            offset += 8 + (length + 7) // 8 * 8
    raise AssertionError(f"no extension {magic:#x} in {image}")


def _v2_overlay(d: Path, name: str) -> Path:
    base = convert(d, f"{name}-base", "compat=0.10")
    image = create(d, f"{name}.qcow2", "compat=0.10", backing=base.name)
    qemu_io(image, "qcow2", "write -P 0x91 0 70000", "write -z 1M 128k", "write -P 0x92 2M 1")
    return image


def _zero_over_backing(d: Path, name: str) -> Path:
    base = convert(d, f"{name}-base")
    image = create(d, f"{name}.qcow2", backing=base.name)
    qemu_io(image, "qcow2", "write -z 0 64k", "write -z -u 1M 128k", "write -z 2M 1000")
    return image


def _deep_chain(d: Path, name: str, depth: int = 8) -> Path:
    previous = source(d / f"{name}-0.raw", seed=11)
    fmt = "raw"
    for level in range(1, depth + 1):
        image = create(d, f"{name}-{level}.qcow2", backing=previous.name, backing_fmt=fmt)
        qemu_io(image, "qcow2", f"write -P {level} {level * 300}k 100k")
        previous, fmt = image, "qcow2"
    return previous


MATRIX: dict[str, Callable[[Path, str], Path]] = {
    "v3-64k": convert,
    "v2": lambda d, n: convert(d, n, "compat=0.10"),
    "c512": lambda d, n: convert(d, n, "cluster_size=512"),
    "c4k-refcount1": lambda d, n: convert(d, n, "cluster_size=4k,refcount_bits=1"),
    "refcount2": lambda d, n: convert(d, n, "refcount_bits=2"),
    "refcount8": lambda d, n: convert(d, n, "refcount_bits=8"),
    "refcount64": lambda d, n: convert(d, n, "refcount_bits=64"),
    "c2m": lambda d, n: convert(d, n, "cluster_size=2M", size=8 * MiB),
    "extl2": lambda d, n: convert(d, n, "extended_l2=on"),
    "extl2-c2m": lambda d, n: convert(d, n, "extended_l2=on,cluster_size=2M", size=8 * MiB),
    "zlib": lambda d, n: convert(d, n, compress=True),
    "zlib-c4k": lambda d, n: convert(d, n, "cluster_size=4k", compress=True),
    "zlib-v2": lambda d, n: convert(d, n, "compat=0.10", compress=True),
    "zstd": lambda d, n: convert(d, n, "compression_type=zstd", compress=True),
    "zstd-c2m": lambda d, n: convert(
        d, n, "compression_type=zstd,cluster_size=2M", compress=True, size=8 * MiB
    ),
    "zero-kinds": lambda d, n: _zero_kinds(d, n, ""),
    "zero-kinds-v2": lambda d, n: _zero_kinds(d, n, "compat=0.10"),
    "zero-kinds-extl2": lambda d, n: _zero_kinds(d, n, "extended_l2=on"),
    "subclusters-over-backing": _subclusters,
    "chain-relative": _chain,
    "short-backing": _short_backing,
    "probed-backing": _probed_backing,
    "v2-overlay": _v2_overlay,
    "zero-over-backing": _zero_over_backing,
    "deep-chain": _deep_chain,
}
"""Each entry makes one image (named after it) covering a read feature qemu-img writes."""


def make_matrix(directory: Path) -> dict[str, Path]:
    os.makedirs(directory, exist_ok=True)
    return {name: make(directory, name) for name, make in MATRIX.items()}
