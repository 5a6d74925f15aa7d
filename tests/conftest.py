"""Fixtures shared by every test layer: real mounts that are always unmounted."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.helpers import Mount, mounts_in

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="FUSE is not available (/dev/fuse or fusermount3 missing; run scripts/setup)")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img is missing (run scripts/setup)")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A directory for the test's image files."""
    path = tmp_path / "img"
    path.mkdir()
    return path


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Start blkfs mounts with given arguments; all are stopped after the test, even when
    it fails, and no daemon outlives it."""
    with mounts_in(tmp_path) as start:
        yield start


@pytest.fixture
def mount(mount_factory: Callable[..., Mount]) -> Mount:
    """A blkfs mount with no backends."""
    return mount_factory()
