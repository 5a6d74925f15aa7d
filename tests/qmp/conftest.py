"""A blkfs mount with a QMP monitor, always unmounted."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Mount


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="qmp") as path:
        yield Path(path)


@pytest.fixture
def monitor(mount_factory: Callable[..., Mount], sockdir: Path) -> tuple[Mount, Path]:
    """A mount serving QMP on ``sockdir/m``, with the NBD server on ``sockdir/nbd``."""
    path = sockdir / "m"
    mount = mount_factory("--qmp", f"unix:{path}", "--nbd", f"unix:{sockdir / 'nbd'}")
    return mount, path
