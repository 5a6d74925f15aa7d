"""``blkdebug``: a disk that fails, lags or loses writes on purpose, to test what sits above.

Three kinds of rule, all retunable on a live node through ``.ctl/reopen``:

* error injection, as QEMU's blkdebug: ``inject-error.N.event=read|write|flush|discard``
  with ``.errno`` (name or number, default EIO), a range (``.sector``, or ``.offset`` and
  ``.length`` in bytes; default: every request), ``.once`` and ``.probability`` with
  ``.seed``. A request fails if it overlaps the range of an enabled rule for its event.
  Zero writes count as writes.
* delays per request kind (``delay.read=10ms``), as dm-delay;
* ``drop-writes=on``: writes, zero writes and discards are acknowledged and thrown away, as
  dm-flakey's drop_writes, to test an application's crash safety.

``align`` sets the request alignment the layer must honour (QEMU's blkdebug ``align``), to
exercise read-modify-write above a device with large sectors.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import trio

from blkfs.block import BlockDriver, BlockError, ChildSpec, Option, WriteFlags

Event = Literal["read", "write", "flush", "discard"]
EVENTS = ("read", "write", "flush", "discard")
SECTOR = 512


@dataclass
class Rule:
    index: int
    event: Event
    errno: int
    start: int
    end: int | None
    """Byte range [start, end) a request must overlap; None: every request."""
    once: bool
    probability: float
    rng: random.Random
    fired: int = 0

    def matches(self, event: Event, offset: int, length: int) -> bool:
        if event != self.event or (self.once and self.fired):
            return False
        if self.end is not None and not (offset < self.end and offset + length > self.start):
            return False
        return self.probability >= 1 or self.rng.random() < self.probability


def parse_rules(values: Mapping[str, Any]) -> list[Rule]:
    """The error rules in ``values``; EINVAL names the first rule that makes no sense."""
    keys = sorted({key.split(".")[1] for key in _rule_values(values)}, key=int)
    rules = []
    for key in keys:  # as given: "01" and "1" are two rules, as they are two option names
        index = int(key)

        def get(field: str, default: Any = None, key: str = key) -> Any:
            value = values.get(f"inject-error.{key}.{field}")
            return default if value is None else value

        where = f"blkdebug: inject-error.{key}"
        event = get("event")
        if event is None:
            raise BlockError(errno.EINVAL, f"{where}.event is required ({', '.join(EVENTS)})")
        sector, offset, length = get("sector"), get("offset"), get("length")
        if sector is not None and (offset is not None or length is not None):
            raise BlockError(errno.EINVAL, f"{where}: give .sector or .offset/.length, not both")
        if sector is not None:
            start, end = sector * SECTOR, (sector + 1) * SECTOR
        elif offset is not None or length is not None:
            start = offset or 0
            end = start + (length if length is not None else 1)
        else:
            start, end = 0, None
        probability = get("probability", 1.0)
        if not 0 <= probability <= 1:
            raise BlockError(
                errno.EINVAL, f"{where}.probability must be between 0 and 1 (got {probability})"
            )
        seed = get("seed")
        rules.append(
            Rule(
                index,
                event,
                get("errno", errno.EIO),
                start,
                end,
                get("once", False),
                probability,
                random.Random(seed if seed is not None else index),
            )
        )
    return rules


def _rule_values(values: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: value
        for key, value in values.items()
        if key.startswith("inject-error.") and value is not None
    }


class BlkdebugDriver(BlockDriver):
    name = "blkdebug"
    rules: list[Rule]
    is_filter = True
    filtered_role = "image"
    reopen_drains = False
    options = {
        "inject-error.*.event": Option("enum", None, "which requests fail", choices=EVENTS),
        "inject-error.*.errno": Option("errno", None, "the error (default EIO)"),
        "inject-error.*.sector": Option(
            "int", None, "fail requests touching this 512-byte sector", minimum=0
        ),
        "inject-error.*.offset": Option("size", None, "start of the failing byte range"),
        "inject-error.*.length": Option(
            "size", None, "length of the failing byte range", minimum=1
        ),
        "inject-error.*.once": Option("bool", None, "fail only the first matching request"),
        "inject-error.*.probability": Option("float", None, "chance a match fails (0 to 1)"),
        "inject-error.*.seed": Option("int", None, "seed for the probability, to replay a run"),
        **{
            f"delay.{event}": Option("duration", 0.0, f"latency added to each {event}")
            for event in EVENTS
        },
        "drop-writes": Option("bool", False, "acknowledge writes and discards, but lose them"),
        "align": Option("size", 1, "request alignment the layer must honour", minimum=1),
    }
    children = {"image": ChildSpec(help="the node to misbehave in front of")}

    async def open(self, values: Mapping[str, Any], children: Mapping[str, Any]) -> None:
        self.injected = 0
        self.dropped = 0
        self.delayed = 0
        self._apply(values)

    async def reopen(self, values: Mapping[str, Any]) -> None:
        """New values apply to the next request. Rules whose options did not change keep
        their state (a spent ``once`` rule stays spent, a seeded sequence goes on)."""
        unchanged = _rule_values(values) == _rule_values(self.node.values)
        self._apply(values, keep_rules=unchanged)

    def _apply(self, values: Mapping[str, Any], keep_rules: bool = False) -> None:
        align = values["align"]
        if align & (align - 1):
            raise BlockError(errno.EINVAL, f"blkdebug: align must be a power of two (got {align})")
        rules = self.rules if keep_rules else parse_rules(values)  # raises before any change
        self.rules = rules
        self.delays = {event: values[f"delay.{event}"] for event in EVENTS}
        self.drop_writes = values["drop-writes"]
        self.request_alignment = align

    async def _enter(self, event: Event, offset: int, length: int) -> None:
        """Delay, then fail if a rule says so."""
        if self.delays[event]:
            self.delayed += 1
            try:
                await trio.sleep(self.delays[event])
            finally:
                self.delayed -= 1
        for rule in self.rules:
            if rule.matches(event, offset, length):
                rule.fired += 1
                self.injected += 1
                raise BlockError(
                    rule.errno,
                    f"blkdebug: injected {errno.errorcode[rule.errno]}"
                    f" ({os.strerror(rule.errno)}) on {event} at "
                    f"{offset}+{length} (rule {rule.index})",
                )

    async def read(self, offset: int, buf: memoryview) -> None:
        await self._enter("read", offset, buf.nbytes)
        await self.filtered.readinto(offset, buf)

    async def write(
        self, offset: int, data: memoryview, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self._enter("write", offset, data.nbytes)
        if self.drop_writes:
            self.dropped += 1
            return
        await self.filtered.write(offset, data, flags)

    async def write_zeroes(
        self, offset: int, length: int, unmap: bool, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        await self._enter("write", offset, length)
        if self.drop_writes:
            self.dropped += 1
            return
        await self.filtered.write_zeroes(offset, length, unmap, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self._enter("discard", offset, length)
        if self.drop_writes:
            self.dropped += 1
            return
        await self.filtered.discard(offset, length)

    async def flush(self) -> None:
        await self._enter("flush", 0, 0)
        await self.filtered.flush()

    def info(self) -> dict[str, Any]:
        return {
            "rules": [
                {
                    "index": rule.index,
                    "event": rule.event,
                    "errno": errno.errorcode[rule.errno],
                    "fired": rule.fired,
                }
                for rule in self.rules
            ],
            "injected-errors": self.injected,
            "dropped-writes": self.dropped,
            "delayed": self.delayed,
        }
