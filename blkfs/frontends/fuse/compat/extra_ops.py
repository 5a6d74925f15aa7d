"""FUSE ``fallocate`` and ``lseek`` for a pyfuse3 filesystem.

pyfuse3 3.x registers neither operation, so libfuse answers ENOSYS and the kernel turns them
off for the rest of the mount: ``fallocate -p``/``-z`` fail with EOPNOTSUPP, a loop device
over a FUSE file drops discard after its first attempt (``fstrim``: "the discard operation
is not supported"), and SEEK_DATA/SEEK_HOLE see the whole file as data.

:func:`install` adds them to the next ``pyfuse3.init``. pyfuse3's ``init`` fills its static
``struct fuse_lowlevel_ops`` and passes it to ``fuse_session_new``, which copies it into the
session. For the length of the ``with`` block, pyfuse3's GOT slot for ``fuse_session_new``
(found in the ELF relocations of pyfuse3's extension module) points at a ctypes function
that first puts the slot back, then copies the table, sets ``fallocate`` and ``lseek`` in
the copy and calls the real ``fuse_session_new`` with it. Leaving the block puts the slot
back in any case. If anything is not exactly as expected (no such relocation, a slot holding
an unknown address, an untested libfuse ABI), nothing is patched, a warning is logged and
the block gets False: pyfuse3 then runs as it always does.

The handlers are async and get pyfuse3's file handles (``fi->fh``, what ``open`` returned)::

    async def fallocate(fh: int, mode: int, offset: int, length: int) -> None
    async def lseek(fh: int, offset: int, whence: int) -> int   # SEEK_DATA or SEEK_HOLE

They fail by raising an exception with an integer ``errno`` attribute (``pyfuse3.FUSEError``,
``OSError``, ``BlockError``); any other exception is logged and answered with EIO. Answer
ENXIO when SEEK_DATA finds no data or the offset is at or past the end. Never answer ENOSYS
unless the operation should stay off for the rest of the mount: the kernel remembers it
(fallocate then fails with EOPNOTSUPP, lseek falls back to "all data"); answer EOPNOTSUPP
for a mode that is not served. Linux (checked on 6.18) passes only these ``mode`` values
and refuses all others itself: 0 (allocate), ``FALLOC_FL_KEEP_SIZE``,
``FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`` (``fallocate -p``, loop discard, fstrim) and
``FALLOC_FL_ZERO_RANGE`` with or without ``KEEP_SIZE`` (``fallocate -z``; loop write-zeroes
sends it with KEEP_SIZE). ``lseek`` is sent for files opened with ``direct_io`` too, but not
for ``nonseekable`` ones.

libfuse calls the C callbacks inside ``fuse_session_process_buf``, on the trio thread with
the GIL held, from one of pyfuse3's worker tasks; they cannot await. Each request is given to
``spawn`` as a task that replies exactly once: every path, cancellation included (EINTR),
ends in ``fuse_reply_*``, which also frees the request. A reply after ``pyfuse3.close()``
would touch a freed session, so ``spawn`` should be ``start_soon`` of a nursery around
``pyfuse3.main()`` that is closed before ``pyfuse3.close()``; it is looked up per request, so
it may close over a nursery opened after ``pyfuse3.init``. With ``cancel_on_interrupt``, a
FUSE_INTERRUPT (the caller got a signal) cancels the request's task, which answers EINTR;
without it the caller, even one killed by SIGKILL, waits for the handler to finish.

Usage::

    with fuseops.install(fallocate=ops.fallocate, lseek=ops.lseek,
                         spawn=lambda fn: nursery.start_soon(fn)) as served:
        pyfuse3.init(ops, mountpoint, options)

Checked with pyfuse3 3.5 and libfuse 3.14 on x86-64 (lazy and immediate binding, writable
and read-only GOT). The ELF reader handles ELF64 little-endian x86-64 and AArch64.
Fallback: as above, nothing patched and a warning logged; the mount then serves without
fallocate and SEEK_DATA/SEEK_HOLE (the kernel answers EOPNOTSUPP and "all data").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import os
import struct
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyfuse3
import trio

if TYPE_CHECKING:
    from _ctypes import CFuncPtr

__all__ = ["FallocateHandler", "LseekHandler", "Spawn", "install"]

log = logging.getLogger("blkfs.fuse")

FallocateHandler = Callable[[int, int, int, int], Awaitable[None]]
"""``(fh, mode, offset, length)``; returns once done, raises with an ``errno`` to fail."""
LseekHandler = Callable[[int, int, int], Awaitable[int]]
"""``(fh, offset, whence)`` for SEEK_DATA/SEEK_HOLE; returns the offset found."""
Spawn = Callable[[Callable[[], Awaitable[None]]], object]
"""Starts an async function in the trio run that serves the mount (``nursery.start_soon``)."""

# struct fuse_lowlevel_ops (fuse_lowlevel.h): 44 function pointers in 3.8 to 3.14, fallocate
# the 41st, lseek (new in 3.8) the 44th; later versions only append.
_PTR = ctypes.sizeof(ctypes.c_void_p)
_OPS_FALLOCATE = 40 * _PTR
_OPS_LSEEK = 43 * _PTR
_OPS_SIZE = 44 * _PTR
_FI_FH = 16  # struct fuse_file_info: int flags; 32 flag bits; 32 padding bits; uint64_t fh
_LIBFUSE_VERSIONS = range(308, 400)  # fuse_version() is 100 * major + minor

_SESSION_NEW = ctypes.CFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
)
_FALLOCATE = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_void_p,
)
_LSEEK = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
)
_INTERRUPT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)

_keep: list[object] = []
"""ctypes callbacks and tables libfuse may point at: kept for the life of the process."""


# --- ELF --------------------------------------------------------------------------------

_RELOCATIONS = {62: (7, 6), 183: (1026, 1025)}  # x86-64, AArch64: (JUMP_SLOT, GLOB_DAT)
_SHT_RELA, _SHT_DYNSYM, _SHT_VERNEED, _SHT_VERSYM = 4, 11, 0x6FFFFFFE, 0x6FFFFFFF


@dataclass(frozen=True)
class _Slot:
    vaddr: int  # r_offset: the slot's link-time address
    load_vaddr: int  # p_vaddr of the PT_LOAD mapped from file offset 0
    version: str | None  # the symbol version asked for ("FUSE_3.0")
    library: str | None  # the library that version is needed from ("libfuse3.so.3")


def _find_slot(path: str, symbol: bytes) -> _Slot | None:
    """The GOT slot through which the ELF64 object at ``path`` calls ``symbol``, or None."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":  # ELF64, little-endian
        return None
    machine, phoff, shoff, phentsize, phnum, shentsize, shnum = struct.unpack_from(
        "<18xH12xQQ6xHHHH", data
    )
    kinds = _RELOCATIONS.get(machine)
    load_vaddr = next(
        (
            vaddr
            for p_type, _, offset, vaddr in (
                struct.unpack_from("<IIQQ", data, phoff + i * phentsize) for i in range(phnum)
            )
            if p_type == 1 and offset == 0
        ),
        None,
    )  # PT_LOAD
    if kinds is None or load_vaddr is None:
        return None
    # (sh_type, sh_offset, sh_size, sh_link, sh_entsize) of each section
    sections = [
        (s[1], s[4], s[5], s[6], s[9])
        for s in (
            struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
        )
    ]

    def string(strtab: int, offset: int) -> str:
        start = sections[strtab][1] + offset
        return data[start : data.index(b"\0", start)].decode()

    for sh_type, offset, size, link, entsize in sections:
        if sh_type != _SHT_RELA or entsize != 24 or sections[link][0] != _SHT_DYNSYM:
            continue
        _, symtab, _, strtab, symsize = sections[link]
        for r_offset, r_info, _ in struct.iter_unpack("<QQq", data[offset : offset + size]):
            index = r_info >> 32
            if (
                r_info & 0xFFFFFFFF in kinds
                and string(strtab, struct.unpack_from("<I", data, symtab + index * symsize)[0])
                == symbol.decode()
            ):
                version, library = _version_needed(data, sections, index, string)
                return _Slot(r_offset, load_vaddr, version, library)
    return None


def _version_needed(
    data: bytes,
    sections: list[tuple[int, int, int, int, int]],
    index: int,
    string: Callable[[int, int], str],
) -> tuple[str | None, str | None]:
    """(version, library) that dynamic symbol ``index`` is bound to (.gnu.version{,_r})."""
    versym = next((s for s in sections if s[0] == _SHT_VERSYM), None)
    verneed = next((s for s in sections if s[0] == _SHT_VERNEED), None)
    if versym is None or verneed is None:
        return None, None
    wanted = struct.unpack_from("<H", data, versym[1] + 2 * index)[0] & 0x7FFF
    need = verneed[1]
    for _ in range(verneed[2] // 16 + 1):  # bounded walk of the Verneed list
        _, count, file, aux, next_need = struct.unpack_from("<HHIII", data, need)
        aux += need
        for _ in range(count):
            _, _, other, name, next_aux = struct.unpack_from("<IHHII", data, aux)
            if other == wanted:
                return string(verneed[3], name), string(verneed[3], file)
            aux += next_aux
        if not next_need:
            break
        need += next_need
    return None, None


def _mappings(path: str) -> list[tuple[int, int, str, int]]:
    """(start, end, permissions, file offset) of each mapping of ``path`` in this process."""
    inode = os.stat(path).st_ino
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if (
                len(fields) == 6
                and int(fields[4]) == inode
                and os.path.realpath(fields[5].rstrip("\n")) == path
            ):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                found.append((start, end, fields[1], int(fields[2], 16)))
    return found


# --- libc and libfuse --------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.dlsym.restype = ctypes.c_void_p
_libc.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_dlvsym = getattr(_libc, "dlvsym", None)
if _dlvsym is not None:
    _dlvsym.restype = ctypes.c_void_p
    _dlvsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]


class _Fuse:
    """The libfuse pyfuse3 is linked with, as far as this module calls it."""

    def __init__(self, library: str) -> None:
        lib = ctypes.CDLL(library)  # already loaded by pyfuse3: the same handle
        self.handle: int = lib._handle
        self.version = int(lib.fuse_version())
        self.reply_err = lib.fuse_reply_err
        self.reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.reply_lseek = lib.fuse_reply_lseek
        self.reply_lseek.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self.interrupt_func = lib.fuse_req_interrupt_func
        self.interrupt_func.argtypes = [ctypes.c_void_p, _INTERRUPT, ctypes.c_void_p]
        self.interrupt_func.restype = None

    def symbol(self, name: str, version: str | None) -> int | None:
        if version is not None and _dlvsym is not None:
            address = _dlvsym(self.handle, name.encode(), version.encode())
        else:
            address = _libc.dlsym(self.handle, name.encode())
        return int(address) if address else None


# --- the patch ---------------------------------------------------------------------------


class _GotSlot:
    """One GOT slot, written with its page made writable for the moment if it is not."""

    def __init__(self, address: int, permissions: str) -> None:
        self.address = address
        self.prot = (1 if "r" in permissions else 0) | (2 if "w" in permissions else 0)
        self.original = self.read()
        self.patched = False

    def read(self) -> int:
        return ctypes.c_void_p.from_address(self.address).value or 0

    def _write(self, value: int) -> None:
        page_size = os.sysconf("SC_PAGE_SIZE")
        page = self.address & ~(page_size - 1)
        if not self.prot & 2 and _libc.mprotect(page, page_size, self.prot | 2) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"mprotect: {os.strerror(code)}")
        try:
            ctypes.c_void_p.from_address(self.address).value = value
        finally:
            if not self.prot & 2:
                _libc.mprotect(page, page_size, self.prot)

    def patch(self, value: int) -> None:
        self._write(value)
        self.patched = True

    def restore(self) -> None:
        if self.patched:
            self.patched = False
            self._write(self.original)


def got_slot(
    path: str, symbol: bytes, who: str
) -> tuple[_Slot, _GotSlot, list[tuple[int, int, str, int]]] | None:
    """The GOT slot through which the loaded library at ``path`` calls ``symbol``: its
    relocation, the slot, and the library's mappings; None, with a warning logged under
    ``who``, if the library cannot be read or the slot is not mapped."""
    try:
        slot = _find_slot(path, symbol)
    except (OSError, struct.error, ValueError, IndexError) as exc:
        log.warning("%s: cannot read %s: %s", who, path, exc)
        return None
    if slot is None:
        log.warning("%s: no %s relocation in %s", who, symbol.decode(), path)
        return None
    maps = _mappings(path)
    base = next((start - slot.load_vaddr for start, _, _, offset in maps if offset == 0), None)
    address = None if base is None else base + slot.vaddr
    permissions = next(
        (p for start, end, p, _ in maps if address is not None and start <= address < end), None
    )
    if address is None or permissions is None:
        log.warning("%s: %s's GOT slot in %s is not mapped", who, symbol.decode(), path)
        return None
    return slot, _GotSlot(address, permissions), maps


def _locate() -> tuple[_GotSlot, _Fuse, int] | None:
    """pyfuse3's GOT slot for fuse_session_new, its libfuse and the real function's address;
    None (with a warning logged) if any of them is not as expected."""
    found = got_slot(os.path.realpath(pyfuse3.__file__ or ""), b"fuse_session_new", "fuseops")
    if found is None:
        return None
    slot, got, maps = found
    try:
        fuse = _Fuse(slot.library or "libfuse3.so.3")
    except (OSError, AttributeError) as exc:
        log.warning("fuseops: cannot load libfuse: %s", exc)
        return None
    if fuse.version not in _LIBFUSE_VERSIONS:
        log.warning("fuseops: libfuse version %d is not supported", fuse.version)
        return None
    real = fuse.symbol("fuse_session_new", slot.version)
    lazy = any(start <= got.original < end for start, end, _, _ in maps)  # PLT stub
    if real is None or (got.original != real and not lazy):
        log.warning(
            "fuseops: GOT slot %#x holds %#x, not fuse_session_new", got.address, got.original
        )
        return None
    return got, fuse, real


@contextlib.contextmanager
def install(
    *,
    fallocate: FallocateHandler | None = None,
    lseek: LseekHandler | None = None,
    spawn: Spawn,
    cancel_on_interrupt: bool = False,
) -> Iterator[bool]:
    """Register ``fallocate`` and/or ``lseek`` with the ``pyfuse3.init`` run in the block.

    Yields True if that call will register them, False (pyfuse3 untouched, the reason
    logged) if not. Whatever happens in the block, pyfuse3 is unpatched when it is left.
    """
    found = _locate() if fallocate is not None or lseek is not None else None
    if found is None:
        yield False
        return
    got, fuse, real_address = found
    real = _SESSION_NEW(real_address)
    requests = _Requests(fuse, spawn, cancel_on_interrupt)
    table: dict[int, CFuncPtr] = {}
    if fallocate is not None:
        table[_OPS_FALLOCATE] = requests.fallocate_callback(fallocate)
    if lseek is not None:
        table[_OPS_LSEEK] = requests.lseek_callback(lseek)

    def session_new(
        args: int | None, ops: int | None, op_size: int, userdata: int | None
    ) -> int | None:
        got.restore()
        table_size = max(op_size, _OPS_SIZE)
        extended = ctypes.create_string_buffer(table_size)
        try:
            if not ops:
                raise ValueError("no operations table")
            ctypes.memmove(extended, ops, op_size)
            for offset, callback in table.items():
                pointer = ctypes.cast(callback, ctypes.c_void_p).value
                ctypes.c_void_p.from_buffer(extended, offset).value = pointer
        except Exception:
            log.exception("fuseops: cannot extend pyfuse3's operations table")
            session: int | None = real(args, ops, op_size, userdata)
            return session
        _keep.append(extended)
        log.debug(
            "fuseops: registering %s",
            " and ".join(
                name for name, handler in (("fallocate", fallocate), ("lseek", lseek)) if handler
            ),
        )
        session = real(args, extended, table_size, userdata)
        return session

    hook = _SESSION_NEW(session_new)
    _keep.extend([hook, real, *table.values()])
    try:
        got.patch(ctypes.cast(hook, ctypes.c_void_p).value or 0)
    except OSError as exc:
        log.warning("fuseops: cannot patch the GOT slot at %#x: %s", got.address, exc)
        yield False
        return
    try:
        yield True
    finally:
        got.restore()


# --- requests ----------------------------------------------------------------------------


class _Requests:
    """Turns libfuse's synchronous callbacks into spawned tasks that reply exactly once."""

    def __init__(self, fuse: _Fuse, spawn: Spawn, cancel_on_interrupt: bool) -> None:
        self.fuse = fuse
        self.spawn = spawn
        self.scopes: dict[int, trio.CancelScope] = {}
        self.ids = itertools.count(1)
        self.on_interrupt = _INTERRUPT(self._interrupted) if cancel_on_interrupt else None
        _keep.append(self.on_interrupt)

    def fallocate_callback(self, handler: FallocateHandler) -> CFuncPtr:
        def callback(
            req: int, ino: int, mode: int, offset: int, length: int, fi: int | None
        ) -> None:
            fh = ctypes.c_uint64.from_address(fi + _FI_FH).value if fi else 0

            async def call() -> int | None:
                await handler(fh, mode, offset, length)
                return None

            self.dispatch(req, call, "fallocate")

        return _FALLOCATE(callback)

    def lseek_callback(self, handler: LseekHandler) -> CFuncPtr:
        def callback(req: int, ino: int, offset: int, whence: int, fi: int | None) -> None:
            fh = ctypes.c_uint64.from_address(fi + _FI_FH).value if fi else 0

            async def call() -> int | None:
                found = int(await handler(fh, offset, whence))
                if found < 0:
                    raise OSError(errno.EINVAL, f"lseek handler returned {found}")
                return found

            self.dispatch(req, call, "lseek")

        return _LSEEK(callback)

    def dispatch(self, req: int, call: Callable[[], Awaitable[int | None]], name: str) -> None:
        """Runs inside libfuse's callback, so it must not await, and nothing may escape it:
        ctypes would only print the exception, and the request would never be answered."""
        ident = next(self.ids)
        scope = trio.CancelScope()  # may be cancelled (interrupt) before the task enters it
        replied = False

        def reply(code: int, offset: int | None = None) -> None:
            nonlocal replied
            if replied:
                return
            replied = True
            self.scopes.pop(ident, None)
            if offset is None or code:
                ret = self.fuse.reply_err(req, code)
            else:
                ret = self.fuse.reply_lseek(req, offset)
            if ret:  # the kernel no longer waits (request aborted, connection gone)
                log.debug("fuseops: %s reply: %s", name, os.strerror(-ret))

        async def run() -> None:
            try:
                with scope:
                    reply(0, await call())
                if scope.cancelled_caught:
                    reply(errno.EINTR)
            except BaseException as exc:
                code = getattr(exc, "errno", None)
                if isinstance(code, int) and code > 0:
                    reply(code)
                elif isinstance(exc, Exception):
                    log.exception("fuseops: %s failed", name)
                    reply(errno.EIO)
                else:  # the nursery is cancelled, KeyboardInterrupt, ...
                    reply(errno.EINTR)
                    raise
            finally:
                reply(errno.EIO)  # no-op unless a path above failed to reply

        try:
            self.scopes[ident] = scope
            if self.on_interrupt is not None:
                self.fuse.interrupt_func(req, self.on_interrupt, ident)
            self.spawn(run)
        except BaseException:
            log.exception("fuseops: cannot start a task for %s", name)
            reply(errno.EIO)

    def _interrupted(self, req: int, ident: int | None) -> None:
        """libfuse's interrupt callback (trio thread, inside fuse_session_process_buf)."""
        scope = self.scopes.get(ident or 0)
        if scope is not None:
            scope.cancel()
