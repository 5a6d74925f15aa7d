"""A bounded write-back cache of metadata clusters (L2 tables, refcount blocks).

Tables are kept decoded as ``array('Q')`` (L2) or raw ``bytearray`` (refcount blocks) by host
offset. Dirty tables are written back by the driver at flush time or when evicted, in the
order crash safety needs (refcounts before the L2 tables that reference new clusters), so the
cache only says *what* is dirty and *which* entry to evict.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

T = TypeVar("T")


class TableCache(Generic[T]):
    """LRU of tables by host offset, at most ``capacity`` of them."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 2)
        self._tables: OrderedDict[int, T] = OrderedDict()
        self.dirty: set[int] = set()

    def __len__(self) -> int:
        return len(self._tables)

    def get(self, offset: int) -> T | None:
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
        return table

    def put(self, offset: int, table: T, dirty: bool = False) -> None:
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        if dirty:
            self.dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def clean(self, offsets: list[int]) -> None:
        """These tables' writes are durable (a barrier after them succeeded)."""
        self.dirty.difference_update(offsets)

    def victim(self) -> int | None:
        """The least recently used table if the cache is over capacity, else None."""
        if len(self._tables) <= self.capacity:
            return None
        return next(iter(self._tables))

    def pop(self, offset: int) -> T | None:
        self.dirty.discard(offset)
        return self._tables.pop(offset, None)

    def dirty_items(self) -> list[tuple[int, T]]:
        return [(offset, self._tables[offset]) for offset in sorted(self.dirty)]
