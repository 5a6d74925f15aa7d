"""Which host files, NBD servers and Ceph clusters the graph may open: the ``--image-dir``
allowlist, and with it the ``--allow-nbd`` one.

The check runs on the opened descriptor (``/proc/self/fd``), not only on the name, so a
symlink or ``..`` swapped in between check and open cannot lead outside the allowlist. A hard
link cannot be told from its other names, so with an allowlist a regular file with more than
one link is refused. Every host file goes through here: those the user names and those an
image names (backing files).

A mount confined to image directories must not reach any server either: with them, an nbd
node connects only to a unix socket inside an allowed socket directory or to an allowed
``HOST:PORT`` (as written: ``localhost`` is not ``127.0.0.1``), and an rbd node not at all.
Without image directories nothing is restricted.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable

from blkfs.errors import BlockError, from_oserror


class HostPolicy:
    """Opens host image files, refusing any outside ``image_dirs`` (None: no restriction),
    and with ``image_dirs`` refuses NBD servers ``nbd_servers`` does not name."""

    def __init__(
        self, image_dirs: Iterable[str] | None = None, nbd_servers: Iterable[str] = ()
    ) -> None:
        self.image_dirs = (
            None if image_dirs is None else tuple(os.path.realpath(d) for d in image_dirs)
        )
        self.nbd_servers = tuple(nbd_servers)
        if self.nbd_servers and self.image_dirs is None:
            raise BlockError(
                errno.EINVAL,
                "--allow-nbd limits NBD servers only together with "
                "--image-dir (without it, any server may be used)",
            )
        self._socket_dirs = tuple(
            os.path.realpath(s) for s in self.nbd_servers if s.startswith("/")
        )
        self._tcp = {_host_port(s) for s in self.nbd_servers if not s.startswith("/")}

    def check_nbd_server(self, path: str | None, host: str | None, port: int) -> None:
        """EACCES unless a node may connect to the NBD server on unix socket ``path`` (or
        at ``host``:``port``)."""
        if self.image_dirs is None:
            return
        if path is not None:
            real = os.path.realpath(path)
            if any(_within(real, d) for d in self._socket_dirs):
                return
            where, allow = f"unix socket '{path}'", os.path.dirname(real)
        else:
            if (str(host).lower(), port) in self._tcp:
                return
            where = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
            allow = where
        raise BlockError(
            errno.EACCES,
            f"NBD server {where} is not allowed with image "
            f"directories; allow it with --allow-nbd {allow}",
        )

    def check_rbd_image(self, image: str) -> None:
        """EACCES if a node may not reach a Ceph cluster: a mount confined to image
        directories reaches none (an rbd name may stand in an image's header)."""
        if self.image_dirs is not None:
            raise BlockError(
                errno.EACCES,
                f"rbd image {image} is not allowed with image directories "
                "(a confined mount reaches no Ceph cluster)",
            )

    def _inside(self, real: str) -> bool:
        """Whether an already resolved path lies inside the allowlist."""
        assert self.image_dirs is not None
        return any(real == d or _within(real, d) for d in self.image_dirs)

    def _refuse(self, path: str) -> BlockError:
        dirs = ", ".join(self.image_dirs or ())
        return BlockError(errno.EACCES, f"'{path}' is outside the image directories ({dirs})")

    def open(self, path: str, writable: bool) -> int:
        """A descriptor for the image at ``path``; BlockError with a fitting errno if not."""
        if self.image_dirs is not None:
            try:
                named = os.path.realpath(path)
            except OSError:  # swapped while being resolved: the descriptor check decides
                named = None
            if named is not None and not self._inside(named):
                raise self._refuse(path)  # before opening: no hint whether it exists
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags)
        except IsADirectoryError:
            raise BlockError(errno.EINVAL, f"'{path}' is a directory, not an image") from None
        except OSError as exc:
            raise from_oserror(exc, f"cannot open '{path}'") from None
        try:
            # the kernel's name of the file actually opened; resolving it again would
            # follow whatever symlink was swapped in since
            if self.image_dirs is not None and not self._inside(os.readlink(f"/proc/self/fd/{fd}")):
                raise self._refuse(path)
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise BlockError(errno.EINVAL, f"'{path}' is not a regular file or block device")
            if self.image_dirs is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                raise BlockError(
                    errno.EACCES,
                    f"'{path}' has {st.st_nlink} hard links; with "
                    "image directories, only files with one link "
                    "are opened (another link may lie outside)",
                )
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _within(real: str, directory: str) -> bool:
    return real.startswith(directory.rstrip("/") + "/")


def _host_port(item: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) of ``--allow-nbd``; EINVAL if it is not one."""
    host, sep, port = item.rpartition(":")
    host = host.removeprefix("[").removesuffix("]").lower()
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BlockError(
            errno.EINVAL,
            f"--allow-nbd {item}: expected HOST:PORT or the absolute path of a socket directory",
        )
    return host, int(port)
