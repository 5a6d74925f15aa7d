"""Which layer of the backing chain holds each cluster an overlay leaves to it.

A read of a cluster the overlay does not hold would go down the chain one layer at a time,
each a whole request path (range checks, tracking, mapping); through a 3-deep chain that
cost twice a single image. The map remembers, per guest cluster, where the chain's answer
lies (a host offset in some layer's image file, or zeros), as the layers' own
:meth:`~blkfs.block.driver.BlockDriver.locate` gave it, so the next read of that cluster
goes there in one step.

Ground rules:

* An entry is a fact about the layers below, never about the overlay itself (its own
  mapping is read first, every time), so the overlay's own writes leave the map alone.
* Every layer an entry was learnt from is watched: a change of its mapping, its backing
  file, its size or its metadata (reopen, close) clears the whole map; so does a change of
  the overlay's own backing file. Nothing is ever patched in place.
* A direct read is admitted by the tracker of every node it skips (a drain of any of them
  waits for it; while one is drained, the read takes the normal path and waits at the
  door), and counts as in flight in each qcow2 layer it skips, so none of them gives a
  freed cluster's space back, or reuses it, under it.
* Bounded: at most ``capacity`` entries; a full map starts again empty.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blkfs.block import Child, Node
from blkfs.block.driver import BlockDriver, Located
from blkfs.block.request import Tracker

if TYPE_CHECKING:
    from .driver import Qcow2Driver

CAPACITY = 1 << 15
"""Entries per overlay: 2 GiB of guest data in 64 KiB clusters, about 4 MiB of memory."""


class Route:
    """How a located read goes: from ``file`` (None: zeros), past the nodes ``passed``
    (admitted by their ``trackers``), as a request in flight in ``layers``."""

    __slots__ = ("file", "layers", "passed", "trackers")

    def __init__(
        self, file: Child | None, passed: tuple[Node, ...], layers: tuple[Qcow2Driver, ...]
    ) -> None:
        self.file = file
        self.passed = passed
        self.trackers: tuple[Tracker, ...] = tuple(node.tracker for node in passed)
        self.layers = layers

    def enter(self) -> bool:
        """Admit the read at every skipped node; False (and nothing held) if one is
        drained."""
        for entered, tracker in enumerate(self.trackers):
            if not tracker.try_enter():
                for held in self.trackers[:entered]:
                    held.leave()
                return False
        for layer in self.layers:
            layer.in_flight += 1
        return True

    def leave(self) -> None:
        for layer in self.layers:
            layer.in_flight -= 1
        for tracker in self.trackers:
            tracker.leave()


class BackingMap:
    """Guest cluster index -> (route, host offset of the cluster's first byte)."""

    def __init__(self, layer_type: type[Qcow2Driver], capacity: int = CAPACITY) -> None:
        self.entries: dict[int, tuple[Route, int]] = {}
        self.capacity = capacity
        self._layer_type = layer_type
        """qcow2's driver class (whose skipped layers count the read as in flight)."""
        self._routes: dict[tuple[Child | None, tuple[Node, ...]], Route] = {}
        self._watched: list[BlockDriver] = []

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        """Forget everything, and stop watching (a change of any watched layer calls this)."""
        for driver in self._watched:
            driver.unwatch_locations(self.clear)
        self._watched.clear()
        self.entries.clear()
        self._routes.clear()

    def learn(
        self, cluster: int, backing: Child, start: int, length: int
    ) -> tuple[Route, int] | None:
        """Ask the backing chain where guest bytes ``start`` to ``start + length`` (one
        cluster, or its part inside the backing file) lie, and remember the answer for
        ``cluster``; None if the chain cannot say at once."""
        located = backing.node.driver.locate(start, length)
        if located is None:
            return None
        passed = (backing.node, *located.passed)
        key = (located.child, passed)
        route = self._routes.get(key)
        if route is None:
            route = self._new_route(located, passed)
            self._routes[key] = route
        if len(self.entries) >= self.capacity:
            self.entries.clear()
        entry = (route, located.offset)
        self.entries[cluster] = entry
        return entry

    def _new_route(self, located: Located, passed: tuple[Node, ...]) -> Route:
        layers = []
        for node in passed:
            driver = node.driver
            if driver not in self._watched:
                driver.watch_locations(self.clear)
                self._watched.append(driver)
            if isinstance(driver, self._layer_type):
                layers.append(driver)
        return Route(located.child, passed, tuple(layers))
