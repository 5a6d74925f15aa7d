"""``throttle``: caps the I/O rate of the subtree below it, as QEMU's throttle filter.

Limits are named as QEMU names them (``limits.bps-read=10M``, ``limits.iops-total=500``,
``limits.bps-write-max=50M`` with ``limits.bps-write-max-length=2`` for bursts). Each limit is
a token bucket that fills at the limit's rate up to its burst size (``max * max-length``, or
a tenth of a second's worth without ``-max``, as QEMU); a request waits until every bucket it
draws from can pay for it, then pays. Requests wait, they never fail.

Nodes naming the same ``throttle-group`` share its buckets, so several backends can share one
budget. A node opened with limits sets the group's limits, one opened without joins the group
as it is, and a reopen of any member sets the group's limits to that member's. Reads and
writes queue separately (a throttled write never holds up a read that only a read limit
governs), in arrival order.

New limits (``.ctl/reopen``) apply at once, also to requests already waiting.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import trio

from blkfs.block import BlockDriver, BlockError, ChildSpec, Option, WriteFlags

Kind = Literal["read", "write"]
RESOLUTION = 1e-9  # seconds; a wait shorter than this is rounding, not throttling
LIMITS = ("bps-total", "bps-read", "bps-write", "iops-total", "iops-read", "iops-write")
PER_KIND: dict[Kind, tuple[str, ...]] = {
    "read": ("bps-total", "bps-read", "iops-total", "iops-read"),
    "write": ("bps-total", "bps-write", "iops-total", "iops-write"),
}


def _limit_options() -> dict[str, Option]:
    options = {}
    for limit in LIMITS:
        unit = "bytes" if limit.startswith("bps") else "requests"
        options[f"limits.{limit}"] = Option("size", 0, f"{unit} per second (0: no limit)")
        options[f"limits.{limit}-max"] = Option("size", 0, f"burst rate, {unit} per second")
        options[f"limits.{limit}-max-length"] = Option(
            "float", 1.0, "seconds a burst at the -max rate may last", minimum=0.001
        )
    return options


@dataclass
class Bucket:
    """A token bucket. ``level`` may go below zero: a request larger than the whole burst
    is let through once the bucket is full, and the debt delays the next ones."""

    rate: float
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def delay(self, cost: float) -> float:
        """Seconds until this bucket can pay ``cost`` (0 if it can now)."""
        need = min(cost, self.capacity)
        return max(0.0, (need - self.level) / self.rate)


def parse_limits(values: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """{limit: (rate, burst size)} for the limits set; EINVAL for combinations QEMU refuses."""
    limits = {}
    for limit in LIMITS:
        rate = values[f"limits.{limit}"]
        peak = values[f"limits.{limit}-max"]
        length = values[f"limits.{limit}-max-length"]
        if peak and not rate:
            raise BlockError(errno.EINVAL, f"throttle: limits.{limit}-max needs limits.{limit}")
        if peak and peak < rate:
            raise BlockError(
                errno.EINVAL,
                f"throttle: limits.{limit}-max ({peak}) is lower than limits.{limit} ({rate})",
            )
        if length != 1.0 and not peak:
            raise BlockError(
                errno.EINVAL, f"throttle: limits.{limit}-max-length needs limits.{limit}-max"
            )
        if rate:
            limits[limit] = (float(rate), peak * length if peak else rate / 10)
    for unit in ("bps", "iops"):
        if f"{unit}-total" in limits and ({f"{unit}-read", f"{unit}-write"} & set(limits)):
            raise BlockError(
                errno.EINVAL,
                f"throttle: limits.{unit}-total cannot be combined "
                f"with limits.{unit}-read or limits.{unit}-write",
            )
    return limits


class ThrottleGroup:
    """One shared budget: the buckets, and a queue per request kind."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.members = 0
        self.limits: dict[str, tuple[float, float]] = {}
        self.buckets: dict[str, Bucket] = {}
        self.queues: dict[Kind, trio.Lock] = {"read": trio.Lock(), "write": trio.Lock()}
        self._changed = trio.Event()

    def configure(self, limits: dict[str, tuple[float, float]]) -> None:
        """Install new limits; buckets keep their level (capped), waiters re-evaluate."""
        now = trio.current_time()
        buckets = {}
        for limit, (rate, capacity) in limits.items():
            old = self.buckets.get(limit)
            if old is not None:
                old.refill(now)
            level = min(capacity, old.level) if old is not None else capacity
            buckets[limit] = Bucket(rate, capacity, level, now)
        self.limits, self.buckets = dict(limits), buckets
        self._changed.set()
        self._changed = trio.Event()

    async def admit(self, kind: Kind, nbytes: int) -> float:
        """Wait until the group's budget allows a request; return the seconds waited (0 if
        it did not wait for the budget)."""
        async with self.queues[kind]:
            start = now = trio.current_time()
            while True:
                draws = [
                    (bucket, nbytes if limit.startswith("bps") else 1)
                    for limit in PER_KIND[kind]
                    if (bucket := self.buckets.get(limit)) is not None
                ]
                for bucket, _ in draws:
                    bucket.refill(now)
                wait = max((bucket.delay(cost) for bucket, cost in draws), default=0.0)
                if wait < RESOLUTION:  # a shorter sleep may not move the clock: livelock
                    break
                changed = self._changed
                with trio.move_on_after(wait):
                    await changed.wait()
                now = trio.current_time()
            for bucket, cost in draws:
                bucket.level -= cost
            return now - start


class ThrottleDriver(BlockDriver):
    name = "throttle"
    is_filter = True
    reopen_drains = False
    options = {
        "throttle-group": Option(
            "str",
            None,
            "share limits with other nodes of this group (default: a group of this node alone)",
        ),
        **_limit_options(),
    }
    children = {"file": ChildSpec(help="the node whose I/O is throttled")}

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.group: ThrottleGroup | None = None
        self.waited = 0.0
        self.throttled = 0
        self._join(values)

    async def reopen(self, values: Mapping[str, Any]) -> None:
        if values["throttle-group"] == self.node.values["throttle-group"]:
            assert self.group is not None
            self.group.configure(parse_limits(values))  # a reopen always sets the limits
        else:
            old = self.group
            self._join(values)
            self._leave(old)

    def _join(self, values: Mapping[str, Any]) -> None:
        name = values["throttle-group"] or f"#{self.node.name}"
        groups = self.node.registry("throttle-group")
        group = groups.get(name) or ThrottleGroup(name)
        limits = parse_limits(values)  # raises before anything changes
        if limits or not group.members:
            group.configure(limits)
        groups[name] = group
        group.members += 1
        self.group = group

    def _leave(self, group: ThrottleGroup | None) -> None:
        if group is None:
            return
        group.members -= 1
        if not group.members:
            del self.node.registry("throttle-group")[group.name]

    async def close(self) -> None:
        self._leave(self.group)
        self.group = None

    async def _throttle(self, kind: Kind, nbytes: int) -> None:
        assert self.group is not None
        waited = await self.group.admit(kind, nbytes)
        if waited:
            self.throttled += 1
            self.waited += waited

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._throttle("read", buf.nbytes)
        await self.filtered.readinto(offset, buf)

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self._throttle("write", data.nbytes)
        await self.filtered.write(offset, data, flags)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self._throttle("write", length)
        await self.filtered.write_zeroes(offset, length, unmap, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self._throttle("write", length)
        await self.filtered.discard(offset, length)

    def info(self) -> dict[str, Any]:
        group = self.group
        return {
            "throttle-group": group.name if group else None,
            "limits": {limit: rate for limit, (rate, _) in group.limits.items()} if group else {},
            "throttled-requests": self.throttled,
            "throttled-ns": int(self.waited * 1e9),
        }
