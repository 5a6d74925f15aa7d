"""librados and librbd through ctypes: the few C calls the ``rbd`` driver makes.

Why ctypes over ``librbd.so.1`` rather than Debian's ``python3-rbd``: that module is built
for the system Python only, and reaching it would mean a ``--system-site-packages`` venv that
sees every other system package too; it also copies each read into a new ``bytes``. Through
the C API the driver reads straight into the layer's buffer, needs no build step, and loads
the library only when an rbd node opens, so blkfs runs unchanged where Ceph is absent.

Ground rules: a call that may wait on the cluster (connect, open, close, resize, snapshot
listing, diff_iterate, lock acquisition) is a plain blocking function, for the caller to run on
a worker thread. Data requests use librbd's asynchronous API: :func:`aio` starts one and
returns when librbd's completion callback, on librbd's own thread, hands the result back to
the loop (:func:`blkfs.block.workers.completion`). Every failure is a BlockError whose errno
is librbd's.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import os
from collections.abc import Callable
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_char,
    c_char_p,
    c_int,
    c_int64,
    c_size_t,
    c_ssize_t,
    c_uint8,
    c_uint64,
    c_void_p,
)
from typing import Any

import outcome

from blkfs.block.workers import completion
from blkfs.errors import BlockError

LOCK_MODE_EXCLUSIVE = 0
FEATURE_EXCLUSIVE_LOCK = 1 << 2
FEATURE_FAST_DIFF = 1 << 4

_CALLBACK = CFUNCTYPE(None, c_void_p, c_void_p)
"""rbd_callback_t: (completion, arg)."""
_DIFF_CALLBACK = CFUNCTYPE(c_int, c_uint64, c_size_t, c_int, c_void_p)
"""diff_iterate's callback: (offset, length, exists, arg) -> 0 to go on."""
_STOP = -9000
"""What the diff callback returns to stop at the first extent (any negative value does)."""


class ImageInfo(Structure):
    """rbd_image_info_t."""

    _fields_ = [
        ("size", c_uint64),
        ("obj_size", c_uint64),
        ("num_objs", c_uint64),
        ("order", c_int),
        ("block_name_prefix", c_char * 24),
        ("parent_pool", c_int64),
        ("parent_name", c_char * 96),
    ]


class SnapInfo(Structure):
    """rbd_snap_info_t."""

    _fields_ = [("id", c_uint64), ("size", c_uint64), ("name", c_char_p)]


def check(result: int, what: str) -> int:
    """``result`` if it is not a negative errno; BlockError saying ``what`` failed otherwise."""
    if result < 0:
        raise BlockError(-result, f"{what}: {os.strerror(-result)}")
    return result


@functools.cache
def libraries() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """librados and librbd with their prototypes; loaded at the first rbd node."""
    try:
        rados = ctypes.CDLL("librados.so.2")
        rbd = ctypes.CDLL("librbd.so.1")
    except OSError as exc:
        raise BlockError(
            errno.ENOTSUP, f"rbd: librbd is not installed (Debian: librbd1): {exc}"
        ) from None
    p = POINTER
    for lib, name, args, result in [
        (rados, "rados_create", [p(c_void_p), c_char_p], c_int),
        (rados, "rados_conf_read_file", [c_void_p, c_char_p], c_int),
        (rados, "rados_conf_set", [c_void_p, c_char_p, c_char_p], c_int),
        (rados, "rados_connect", [c_void_p], c_int),
        (rados, "rados_shutdown", [c_void_p], None),
        (rados, "rados_ioctx_create", [c_void_p, c_char_p, p(c_void_p)], c_int),
        (rados, "rados_ioctx_set_namespace", [c_void_p, c_char_p], None),
        (rados, "rados_ioctx_destroy", [c_void_p], None),
        (rbd, "rbd_create", [c_void_p, c_char_p, c_uint64, p(c_int)], c_int),
        (rbd, "rbd_open", [c_void_p, c_char_p, p(c_void_p), c_char_p], c_int),
        (rbd, "rbd_open_read_only", [c_void_p, c_char_p, p(c_void_p), c_char_p], c_int),
        (rbd, "rbd_close", [c_void_p], c_int),
        (rbd, "rbd_get_size", [c_void_p, p(c_uint64)], c_int),
        (rbd, "rbd_get_features", [c_void_p, p(c_uint64)], c_int),
        (rbd, "rbd_stat", [c_void_p, p(ImageInfo), c_size_t], c_int),
        (rbd, "rbd_resize", [c_void_p, c_uint64], c_int),
        (rbd, "rbd_snap_list", [c_void_p, p(SnapInfo), p(c_int)], c_int),
        (rbd, "rbd_snap_list_end", [p(SnapInfo)], None),
        (rbd, "rbd_lock_acquire", [c_void_p, c_int], c_int),
        (rbd, "rbd_lock_get_owners", [c_void_p, p(c_int), p(c_char_p), p(c_size_t)], c_int),
        (rbd, "rbd_lock_get_owners_cleanup", [p(c_char_p), c_size_t], None),
        (
            rbd,
            "rbd_diff_iterate2",
            [c_void_p, c_char_p, c_uint64, c_uint64, c_uint8, c_uint8, _DIFF_CALLBACK, c_void_p],
            c_int,
        ),
        (rbd, "rbd_aio_create_completion", [c_void_p, _CALLBACK, p(c_void_p)], c_int),
        (rbd, "rbd_aio_get_return_value", [c_void_p], c_ssize_t),
        (rbd, "rbd_aio_release", [c_void_p], None),
        (rbd, "rbd_aio_read", [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p], c_int),
        (rbd, "rbd_aio_write", [c_void_p, c_uint64, c_size_t, c_void_p, c_void_p], c_int),
        (rbd, "rbd_aio_flush", [c_void_p, c_void_p], c_int),
        (rbd, "rbd_aio_discard", [c_void_p, c_uint64, c_uint64, c_void_p], c_int),
        (
            rbd,
            "rbd_aio_write_zeroes",
            [c_void_p, c_uint64, c_size_t, c_void_p, c_int, c_int],
            c_int,
        ),
    ]:
        function = getattr(lib, name)
        function.argtypes, function.restype = args, result
    return rados, rbd


# -- completions -------------------------------------------------------------------------

_waiting: dict[int, Callable[[outcome.Outcome[Any]], None]] = {}
"""Each started request's ``done``, by the key its completion carries as its argument."""
_keys = itertools.count(1)


def _on_completion(c: int, arg: int) -> None:
    """librbd's thread: the request is done; its result goes to the waiting task."""
    _, rbd = libraries()
    result = rbd.rbd_aio_get_return_value(c)
    rbd.rbd_aio_release(c)
    _waiting.pop(arg)(outcome.Value(result))


_completed = _CALLBACK(_on_completion)
"""The C callback every completion carries (kept alive here for the life of the process)."""


async def aio(start: Callable[[c_void_p], int], what: str) -> int:
    """Run ``start(completion)`` (an ``rbd_aio_*`` call given the completion) and wait for
    the completion; its non-negative result, or BlockError with librbd's errno."""
    _, rbd = libraries()

    def begin(done: Callable[[outcome.Outcome[Any]], None]) -> None:
        key = next(_keys)
        c = c_void_p()
        check(rbd.rbd_aio_create_completion(key, _completed, byref(c)), what)
        _waiting[key] = done
        try:
            check(start(c), what)
        except BaseException:
            del _waiting[key]
            rbd.rbd_aio_release(c)
            raise

    result: int = await completion(begin)
    return check(result, what)


def address(buf: memoryview) -> tuple[int, Any]:
    """A C pointer to ``buf``'s bytes and the object that keeps them alive: the buffer
    itself where it is writable, a copy where it is not (ctypes has no read-only view)."""
    holder = (c_char * buf.nbytes).from_buffer(buf) if not buf.readonly else None
    if holder is None:
        holder = (c_char * buf.nbytes).from_buffer_copy(buf)
    return ctypes.addressof(holder), holder


# -- the cluster and its images (blocking calls: run them on a worker) ----------------------


class Cluster:
    """A connection to a cluster (``rados_t``) and one pool's I/O context in it."""

    def __init__(
        self,
        conf: str | None,
        user: str | None,
        pool: str,
        namespace: str | None,
        settings: dict[str, str],
    ) -> None:
        rados, _ = libraries()
        self.handle = c_void_p()
        self.ioctx = c_void_p()
        check(rados.rados_create(byref(self.handle), _c(user)), "rbd: rados_create")
        try:
            if conf is not None:
                check(rados.rados_conf_read_file(self.handle, _c(conf)), f"rbd: reading {conf}")
            else:
                rados.rados_conf_read_file(self.handle, None)  # the default places, if any
            for key, value in settings.items():
                check(
                    rados.rados_conf_set(self.handle, _c(key), _c(value)),
                    f"rbd: setting {key}={value}",
                )
            check(rados.rados_connect(self.handle), "rbd: cannot connect to the cluster")
            check(
                rados.rados_ioctx_create(self.handle, _c(pool), byref(self.ioctx)),
                f"rbd: pool '{pool}'",
            )
            if namespace:
                rados.rados_ioctx_set_namespace(self.ioctx, _c(namespace))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        rados, _ = libraries()
        if self.ioctx:
            rados.rados_ioctx_destroy(self.ioctx)
            self.ioctx = c_void_p()
        if self.handle:
            rados.rados_shutdown(self.handle)
            self.handle = c_void_p()

    def create(self, name: str, size: int) -> None:
        """A new image with the cluster's default format and features."""
        _, rbd = libraries()
        order = c_int(0)
        check(rbd.rbd_create(self.ioctx, _c(name), size, byref(order)), f"rbd: creating '{name}'")

    def open(self, name: str, snapshot: str | None, read_only: bool) -> c_void_p:
        _, rbd = libraries()
        image = c_void_p()
        call = rbd.rbd_open_read_only if read_only else rbd.rbd_open
        check(call(self.ioctx, _c(name), byref(image), _c(snapshot)), f"rbd: image '{name}'")
        return image


def close_image(image: c_void_p) -> None:
    _, rbd = libraries()
    check(rbd.rbd_close(image), "rbd: close")


def size(image: c_void_p) -> int:
    _, rbd = libraries()
    value = c_uint64()
    check(rbd.rbd_get_size(image, byref(value)), "rbd: get_size")
    return value.value


def features(image: c_void_p) -> int:
    _, rbd = libraries()
    value = c_uint64()
    check(rbd.rbd_get_features(image, byref(value)), "rbd: get_features")
    return value.value


def object_size(image: c_void_p) -> int:
    _, rbd = libraries()
    info = ImageInfo()
    check(rbd.rbd_stat(image, byref(info), ctypes.sizeof(info)), "rbd: stat")
    return int(info.obj_size)


def resize(image: c_void_p, length: int) -> None:
    _, rbd = libraries()
    check(rbd.rbd_resize(image, length), f"rbd: resize to {length}")


def snapshots(image: c_void_p) -> list[tuple[str, int]]:
    """``(name, size)`` of each snapshot of the image."""
    _, rbd = libraries()
    count = c_int(16)
    while True:
        snaps = (SnapInfo * count.value)()
        result = rbd.rbd_snap_list(image, snaps, byref(count))
        if result != -errno.ERANGE:
            break
    check(result, "rbd: snap_list")
    try:
        return [(snaps[i].name.decode(), snaps[i].size) for i in range(result)]
    finally:
        rbd.rbd_snap_list_end(snaps)


def acquire_exclusive_lock(image: c_void_p) -> None:
    """Take the image's exclusive lock and keep it: librbd then refuses to hand it to a peer
    that asks (which it would do for an automatic lock), so no other client writes."""
    _, rbd = libraries()
    check(rbd.rbd_lock_acquire(image, LOCK_MODE_EXCLUSIVE), "rbd: lock_acquire")


def lock_owners(image: c_void_p) -> list[str]:
    _, rbd = libraries()
    mode = c_int()
    owners = (c_char_p * 8)()
    count = c_size_t(8)
    result = rbd.rbd_lock_get_owners(image, byref(mode), owners, byref(count))
    if result == -errno.ENOENT:
        return []
    check(result, "rbd: lock_get_owners")
    try:
        return [(owners[i] or b"").decode() for i in range(count.value)]
    finally:
        rbd.rbd_lock_get_owners_cleanup(owners, count)


def first_extent(image: c_void_p, offset: int, length: int, whole_object: bool) -> tuple[int, int]:
    """``(start, length)`` of the first allocated extent in the range (the image's own or its
    parent's), clipped to it; ``(offset + length, 0)`` if there is none."""
    _, rbd = libraries()
    found: list[tuple[int, int]] = []

    def extent(start: int, count: int, exists: int, _: int) -> int:
        if not exists:
            return 0
        found.append((start, count))
        return _STOP

    result = rbd.rbd_diff_iterate2(
        image, None, offset, length, 1, int(whole_object), _DIFF_CALLBACK(extent), None
    )
    if result != _STOP:
        check(result, "rbd: diff_iterate")
    if not found:
        return offset + length, 0
    start, count = found[0]
    begin, end = max(start, offset), min(start + count, offset + length)
    return begin, max(end - begin, 0)


def _c(text: str | None) -> bytes | None:
    return None if text is None else text.encode()
