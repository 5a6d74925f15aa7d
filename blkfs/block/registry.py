"""Drivers by name, fed from the ``blkfs.drivers`` entry point group.

blkfs's own drivers are registered the same way as a third party's (see pyproject.toml), so a
package that declares ``[project.entry-points."blkfs.drivers"] mydrv = "pkg.mod:MyDriver"``
plugs in with no change here.
"""

from __future__ import annotations

import logging
from functools import cache
from importlib.metadata import entry_points

from blkfs.block.driver import BlockDriver
from blkfs.errors import OptionError

GROUP = "blkfs.drivers"
log = logging.getLogger("blkfs.registry")


class DriverRegistry:
    """Driver classes by name; loads each entry point on first use."""

    def __init__(self) -> None:
        self._points = {ep.name: ep for ep in entry_points(group=GROUP)}
        self._loaded: dict[str, type[BlockDriver]] = {}

    def names(self) -> list[str]:
        return sorted(self._points)

    def get(self, name: str) -> type[BlockDriver]:
        """The driver class called ``name``; OptionError naming the known ones otherwise."""
        if name not in self._loaded:
            point = self._points.get(name)
            if point is None:
                raise OptionError(f"unknown driver '{name}' (known: {', '.join(self.names())})")
            cls = point.load()
            if not (isinstance(cls, type) and issubclass(cls, BlockDriver)):
                raise OptionError(f"entry point '{name}' does not name a BlockDriver subclass")
            self._loaded[name] = cls
        return self._loaded[name]

    def formats(self) -> list[type[BlockDriver]]:
        """Every driver that may be chosen by probing; a plug-in that fails to load is
        logged and skipped, so one broken package cannot stop every image from opening."""
        found = []
        for name in self.names():
            try:
                cls = self.get(name)
            except (ImportError, OptionError) as exc:
                log.warning("driver %s cannot be loaded: %s", name, exc)
                continue
            if cls.is_format:
                found.append(cls)
        return found


@cache
def default_registry() -> DriverRegistry:
    return DriverRegistry()
