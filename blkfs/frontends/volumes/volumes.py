"""The volume operations: Docker's (create, remove, mount, unmount, path, get, list) and
blkfs's own (snapshot, rollback, commit, clone, inspect).

Ground rules: each operation holds the locks of the volumes it touches, so two ``Mount``s
of one volume racing make one filesystem mount and two references; an operation that fails
undoes what it did before it reports; state is saved after the host has changed, and a
plugin started over ``STATE`` (:meth:`Volumes.recover`) brings the host back in line with it:
backends the blkfs mount lacks are created again, filesystems of volumes in use are mounted,
those of unused volumes unmounted, a filesystem left frozen is thawed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from blkfs.errors import BlockError

from . import host
from .host import BlkfsMount
from .options import Creation, creation
from .store import Store, Volume, key_of, write_atomically

log = logging.getLogger("blkfs.volumes")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Volumes:
    """The volumes kept in ``state`` (a directory), served by a blkfs mount: ``mount`` if
    given, otherwise one the plugin starts at ``STATE/blkfs``."""

    def __init__(
        self, state: Path, mount: Path | None = None, image_dirs: list[Path] | None = None
    ) -> None:
        self.state = state = state.resolve()
        self.images = state / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.mountpoints = state / "mnt"
        self.store = Store(state / "volumes")
        self.released = state / "released.json"
        self.owns_mount = mount is None
        self.blkfs = BlkfsMount(mount or state / "blkfs")
        self.image_dirs = [self.images, *(image_dirs or [])]
        self._table = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    # -- start -----------------------------------------------------------------------------

    def recover(self) -> None:
        """Make the host match the saved state (see the module's rules); a volume that
        cannot be brought back is logged and left as it is."""
        if not self.blkfs.alive():
            if not self.owns_mount:
                raise BlockError(errno.ENOENT, f"{self.blkfs.path} is not a blkfs mount")
            self.blkfs.start(self.image_dirs, self.state / "blkfs.log")
            log.info("blkfs mounted on %s", self.blkfs.path)
        for volume in self.store.all():
            with self._locked(volume.key):
                try:
                    self._recover(volume)
                except BlockError as exc:
                    log.error("volume %s: not recovered: %s", volume.name, exc)

    def _recover(self, volume: Volume) -> None:
        if volume.pending:
            self._undo_create(volume)
            log.info("volume %s: its creation was cut short, undone", volume.name)
            return
        if self.blkfs.backend(volume.key) is None:
            self.blkfs.send("create", f"{volume.key} {self._medium_spec(volume)}")
            log.info("volume %s: backend %s created again", volume.name, volume.key)
        where = self.mountpoint(volume)
        if host.mounted(where):
            with suppress(BlockError):
                host.thaw(where)  # a plugin killed during a snapshot left it frozen
            if not volume.mounts:
                self._unmount_fs(volume)
                log.info("volume %s: unused, unmounted", volume.name)
        elif volume.mounts:
            self._mount_fs(volume)
            log.info("volume %s: mounted again for %d users", volume.name, len(volume.mounts))
        self._refresh(volume)
        self.store.save(volume)

    # -- Docker's operations ---------------------------------------------------------------

    def create(self, name: str, opts: Mapping[str, str]) -> None:
        """A new volume: its image, its backend; its filesystem comes with its first mount.
        A name that exists already is fine when no options are given (dockerd creates the
        volumes of ``docker run -v NAME:...`` so)."""
        if not name:
            raise BlockError(errno.EINVAL, "a volume needs a name")
        if not opts and self.store.find(name):
            return
        made = creation(opts)
        base = self.store.find(made.base) if made.base else None
        if made.base and base is None and not os.path.isabs(made.base):
            raise BlockError(
                errno.ENOENT,
                f"base={made.base}: no volume of that name (an image is named by its full path)",
            )
        with self._locked(key_of(name), *([base.key] if base else [])):
            if self.store.find(name):
                raise BlockError(errno.EEXIST, f"volume {name!r} exists already")
            key = key_of(name)
            if self.store.exists(key):
                raise BlockError(errno.EEXIST, f"volume {name!r}: its key {key} is taken")
            if base is not None:
                base = self.store.load(base.name)  # as it is now, under its lock
            self._create(Volume(name, key, now(), made.fs, made.keep, made.throttle), made, base)

    def _create(self, volume: Volume, made: Creation, base: Volume | None) -> None:
        image = self.images / f"{volume.key}.{made.format}"
        if image.exists():
            raise BlockError(
                errno.EEXIST, f"volume {volume.name!r}: {image} exists (kept by a removal?)"
            )
        args = ["image", "create", "-f", made.format]
        if base is not None:
            kept = self._snapshot(base)
            args += ["-b", kept, "-F", _format_of(kept)]
        elif made.base is not None:
            args += ["-b", made.base]
        args += [str(image), *([made.size] if made.size else [])]
        volume.chain, volume.pending = [str(image)], True
        try:
            self.store.save(volume)
            self.blkfs.blkfs(*args, what=f"volume {volume.name}: image")
            self.blkfs.send("create", f"{volume.key} {self._medium_spec(volume)}")
            self._refresh(volume)
            volume.pending = False
            self.store.save(volume)
        except (BlockError, OSError) as exc:
            self._undo_create(volume)
            raise BlockError(
                getattr(exc, "errno", None) or errno.EIO, f"volume {volume.name}: {exc}"
            ) from None
        log.info("volume %s: created (%s)", volume.name, " <- ".join(volume.chain))

    def _undo_create(self, volume: Volume) -> None:
        """Whatever a creation made, unmade: the backend, the image, the state."""
        if self.blkfs.backend(volume.key) is not None:
            self.blkfs.send("delete", volume.key)
        Path(volume.active).unlink(missing_ok=True)
        self.store.delete(volume)

    def remove(self, name: str) -> None:
        """Refused while a container uses the volume. Its backend goes, then its image
        files (those no other volume has in its chain; none with keep=on), then its state."""
        with self._locked(key_of(name)):
            volume = self.store.load(name)
            if volume.mounts:
                raise BlockError(
                    errno.EBUSY,
                    f"volume {name!r} is in use by {len(volume.mounts)} container(s)",
                )
            if self.blkfs.backend(volume.key) is not None:
                self.blkfs.send("delete", volume.key)
            with suppress(OSError):
                self.mountpoint(volume).rmdir()
            self.store.delete(volume)
            if not volume.keep:
                self._release([f for f in volume.chain if self._owns(volume, f)])
            log.info("volume %s: removed", name)

    def mount(self, name: str, mount_id: str) -> str:
        """The volume's filesystem, mounted for one more user (the first mounts it)."""
        with self._locked(key_of(name)):
            volume = self.store.load(name)
            where = self.mountpoint(volume)
            if mount_id in volume.mounts and host.mounted(where):
                return str(where)
            if not host.mounted(where):
                self._mount_fs(volume)
            if mount_id not in volume.mounts:
                volume.mounts.append(mount_id)
            self.store.save(volume)
            log.info("volume %s: mounted for %s (%d users)", name, mount_id, len(volume.mounts))
            return str(where)

    def unmount(self, name: str, mount_id: str) -> None:
        """One user fewer; the last one's going unmounts the filesystem."""
        with self._locked(key_of(name)):
            volume = self.store.load(name)
            if mount_id not in volume.mounts:
                log.info("volume %s: %s was not mounting it", name, mount_id)
                return
            rest = [m for m in volume.mounts if m != mount_id]
            if not rest and host.mounted(self.mountpoint(volume)):
                self._unmount_fs(volume)
            volume.mounts = rest
            self.store.save(volume)
            log.info("volume %s: unmounted for %s (%d users)", name, mount_id, len(rest))

    def path(self, name: str) -> str:
        """Where the volume is mounted, or "" while it is not."""
        volume = self.store.load(name)
        where = self.mountpoint(volume)
        return str(where) if host.mounted(where) else ""

    def get(self, name: str) -> dict[str, Any]:
        """The volume as Docker shows it, with blkfs's facts in ``Status``."""
        with self._locked(key_of(name)):
            volume = self.store.load(name)
            return {
                "Name": volume.name,
                "Mountpoint": self.path(name),
                "CreatedAt": volume.created,
                "Status": self._status(volume),
            }

    def listed(self) -> list[dict[str, str]]:
        return [
            {"Name": v.name, "Mountpoint": self.path(v.name), "CreatedAt": v.created}
            for v in self.store.all()
            if not v.pending
        ]

    # -- blkfs's verbs ---------------------------------------------------------------------

    def snapshot(self, name: str) -> dict[str, str]:
        """A live snapshot, the filesystem frozen for its moment: the image in use keeps the
        data of this moment, read-only, under a new overlay."""
        with self._locked(key_of(name)):
            volume = self.store.load(name)
            self._snapshot(volume)
            return volume.snapshots[-1]

    def _snapshot(self, volume: Volume) -> str:
        """Snapshot ``volume`` (locked by the caller); the image that now keeps its data."""
        number = len(volume.snapshots) + 1
        while (overlay := self.images / f"{volume.key}.s{number}.qcow2").exists():
            number += 1
        kept = volume.active
        where = self.mountpoint(volume)
        frozen = host.mounted(where)
        if frozen:
            host.freeze(where)
        try:
            self.blkfs.send("snapshot", f"{volume.key} {overlay}")
        finally:
            if frozen:
                host.thaw(where)
        volume.snapshots.append({"time": now(), "image": kept, "overlay": str(overlay)})
        self._refresh(volume)
        self.store.save(volume)
        log.info("volume %s: snapshot, %s kept under %s", volume.name, kept, overlay)
        return kept

    def rollback(self, name: str, remount: bool = False) -> None:
        """Drop what was written since the last snapshot. A mounted volume is refused unless
        ``remount``: then its filesystem is unmounted, rolled back and mounted again, which
        succeeds only when no container holds it (a running container's mount keeps the
        loop device open, and blkfs refuses the rollback with EBUSY)."""
        with self._locked(key_of(name)):
            volume = self.store.load(name)
            where = self.mountpoint(volume)
            if not host.mounted(where):
                self.blkfs.send("rollback", volume.key)
            elif not remount:
                raise BlockError(
                    errno.EBUSY,
                    f"volume {name!r} is mounted ({len(volume.mounts)} user(s)): stop its "
                    "containers first, or --remount",
                )
            else:
                self._unmount_fs(volume)
                try:
                    if host.loop_of(self.blkfs.file(volume.key)):
                        raise BlockError(
                            errno.EBUSY,
                            f"volume {name!r}: a container still holds its filesystem "
                            "(stop it first)",
                        )
                    self.blkfs.send("rollback", volume.key)
                finally:
                    self._mount_fs(volume)
            self.store.save(volume)
            log.info("volume %s: rolled back to its last snapshot", name)

    def commit(self, name: str) -> None:
        """Keep what was written since the last snapshot: the active overlay is merged down
        into the image below it, which becomes the active image again (live)."""
        with self._locked(key_of(name)):
            volume = self.store.load(name)
            if len(volume.chain) < 2:
                raise BlockError(errno.EINVAL, f"volume {name!r} has no image to commit into")
            top, base = volume.chain[0], volume.chain[1]
            self.blkfs.blkfs(
                "commit",
                str(self.blkfs.path),
                volume.key,
                "--base",
                base,
                what=f"volume {name}: commit",
            )
            self._refresh(volume)
            self.store.save(volume)
            if top not in volume.chain and self._owns(volume, top):
                self._release([top])
            log.info("volume %s: %s committed into %s", name, top, base)

    def clone(self, source: str, name: str, opts: Mapping[str, str]) -> None:
        """A thin clone of ``source``: a snapshot of it, shared read-only as the base."""
        self.store.load(source)
        self.create(name, {**opts, "base": source})

    def inspect(self, name: str) -> dict[str, Any]:
        volume = self.store.load(name)
        return {**self.get(name), "Mounts": volume.mounts, "Snapshots": volume.snapshots}

    # -- helpers ---------------------------------------------------------------------------

    def mountpoint(self, volume: Volume) -> Path:
        return self.mountpoints / volume.key

    def _mount_fs(self, volume: Volume) -> None:
        """Attach a loop device (or take the one still attached: a container may hold the
        filesystem), make the filesystem if the volume has none, mount it."""
        backing = self.blkfs.file(volume.key)
        device = host.loop_of(backing)
        attached = device is None
        device = device or host.attach(backing)
        try:
            host.make_filesystem(device, volume.fs)
            host.mount(device, self.mountpoint(volume))
        except BlockError:
            if attached:
                host.detach(device)
            raise
        volume.loop = device

    def _unmount_fs(self, volume: Volume) -> None:
        """Unmount and let the loop device go; the kernel lets go of it a moment later, or
        only when a container's mount namespace that still holds the filesystem ends."""
        host.unmount(self.mountpoint(volume))
        backing = self.blkfs.file(volume.key)
        device = volume.loop or host.loop_of(backing)
        if device:
            host.detach(device)
            host.wait_detached(backing, seconds=5)
        volume.loop = None

    def _medium_spec(self, volume: Volume) -> str:
        image = f"driver={_format_of(volume.active)},file.driver=file,file.filename={volume.active}"
        if not volume.throttle:
            return image
        limits = ",".join(f"limits.{k}={v}" for k, v in sorted(volume.throttle.items()))
        return f"driver=throttle,{limits},file.{image.replace(',', ',file.')}"

    def _refresh(self, volume: Volume) -> None:
        """The chain as the blkfs mount has it now."""
        backend = self.blkfs.backend(volume.key)
        if backend is not None and backend["tree"] is not None:
            volume.chain = host.chain(backend["tree"])

    def _status(self, volume: Volume) -> dict[str, Any]:
        backend = self.blkfs.backend(volume.key)
        self._refresh(volume)
        own = [f for f in volume.chain if self._owns(volume, f)]
        return {
            "backend": volume.key,
            "chain": volume.chain,
            "size": backend["size"] if backend else None,
            "host-bytes": host.host_bytes(own),
            "filesystem": volume.fs,
            "users": len(volume.mounts),
            "last-snapshot": volume.snapshots[-1] if volume.snapshots else None,
        }

    def _owns(self, volume: Volume, image: str) -> bool:
        return Path(image).parent == self.images and Path(image).name.startswith(volume.key + ".")

    def _release(self, images: list[str]) -> None:
        """Delete these image files once no volume's chain has them: now, or when the last
        clone over them is removed (``STATE/released.json`` remembers them until then)."""
        with self._table:
            released = (
                set(json.loads(self.released.read_text())) if self.released.exists() else set()
            )
            released.update(images)
            used = {f for v in self.store.all() for f in v.chain}
            for image in released - used:
                Path(image).unlink(missing_ok=True)
            write_atomically(self.released, json.dumps(sorted(released & used)))

    @contextmanager
    def _locked(self, *keys: str) -> Iterator[None]:
        """The locks of these volumes, taken in one order (no two callers deadlock)."""
        with self._table:
            locks = [self._locks.setdefault(k, threading.Lock()) for k in sorted(set(keys))]
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            for lock in reversed(locks):
                lock.release()


def _format_of(image: str) -> str:
    return "raw" if image.endswith(".raw") else "qcow2"
