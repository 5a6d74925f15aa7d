"""What the volume plugin's tests share: a plugin over its own blkfs mount per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.volumes.plugin import Plugin, running_plugin


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    """A plugin, stopped (with its mount and volumes) after the test, even when it failed."""
    with running_plugin(tmp_path) as started:
        yield started
