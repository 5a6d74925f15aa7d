"""What survives a restart of the plugin: one JSON file per volume in ``STATE/volumes/``.

Each file is written whole to a temporary name, fsynced and renamed over the old one, so a
plugin killed at any moment leaves either the old state or the new one. Docker lets a plugin's
volume be named with characters a file or backend name cannot hold (``/``, spaces, a leading
dot): such a name gets a key made from its hash, and the file keeps the name itself.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blkfs.errors import BlockError

PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Names used as they are for the backend, the image files and the mount point."""


def key_of(name: str) -> str:
    """The backend and file name of volume ``name``."""
    if PLAIN_NAME.match(name) and not name.startswith("vol-"):
        return name
    return "vol-" + hashlib.sha256(name.encode()).hexdigest()[:24]


@dataclass
class Volume:
    """One volume as the plugin keeps it."""

    name: str
    key: str
    created: str
    """RFC 3339, as Docker shows ``CreatedAt``."""
    fs: str = "ext4"
    keep: bool = False
    """Leave the image files on the host when the volume is removed."""
    throttle: dict[str, str] = field(default_factory=dict)
    """``limits.*`` options of a throttle filter over the image, if any."""
    chain: list[str] = field(default_factory=list)
    """Image files from the active one down to the last backing file."""
    mounts: list[str] = field(default_factory=list)
    """Docker's mount IDs of the containers using the volume (mounted while not empty)."""
    loop: str | None = None
    """The loop device under the mounted filesystem."""
    snapshots: list[dict[str, str]] = field(default_factory=list)
    """Each snapshot taken: when, and the image that keeps its data."""
    pending: bool = False
    """Being created: a plugin that finds it so at start undoes the creation."""

    @property
    def active(self) -> str:
        return self.chain[0]


class Store:
    """The volumes' files in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def load(self, name: str) -> Volume:
        """The volume named ``name``; ENOENT if there is none."""
        volume = self.find(name)
        if volume is None:
            raise BlockError(errno.ENOENT, f"no volume named {name!r}")
        return volume

    def find(self, name: str) -> Volume | None:
        try:
            data: dict[str, Any] = json.loads(self._path(key_of(name)).read_text())
        except FileNotFoundError:
            return None
        volume = Volume(**data)
        return volume if volume.name == name else None

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def all(self) -> list[Volume]:
        return sorted(
            (Volume(**json.loads(p.read_text())) for p in self.directory.glob("*.json")),
            key=lambda v: v.name,
        )

    def save(self, volume: Volume) -> None:
        write_atomically(self._path(volume.key), json.dumps(asdict(volume), indent=1))

    def delete(self, volume: Volume) -> None:
        self._path(volume.key).unlink(missing_ok=True)
        _fsync_directory(self.directory)


def write_atomically(path: Path, text: str) -> None:
    """``text`` in ``path``, whole or not at all, whenever the process dies."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
