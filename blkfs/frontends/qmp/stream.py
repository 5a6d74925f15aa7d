"""QMP's wire format, sans I/O: a byte stream of JSON values in, messages or errors out.

Ground rules: as QEMU's JSON streamer, values are split where their brackets balance (no
newline is needed between them, whitespace between them is skipped); a value is parsed only
once whole. A value larger than :data:`MAX_MESSAGE` bytes, nested deeper than
:data:`MAX_DEPTH`, or not JSON gives one :class:`ParseError` and is skipped whole, so the
stream stays in step and the client may go on. Nothing here does I/O, so it is tested with
plain bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 20
"""The largest command a client may send (bytes)."""
MAX_DEPTH = 64
"""The deepest nesting of brackets in one command."""

_OPEN = frozenset(b"{[")
_CLOSE = frozenset(b"}]")
_SPACE = frozenset(b" \t\r\n")


@dataclass(frozen=True)
class ParseError:
    """A value that could not be taken; ``desc`` is QEMU's wording."""

    desc: str


class Splitter:
    """Feed bytes, get whole JSON values (or :class:`ParseError`) back, in order."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self._error: str | None = None
        """Why the value being read is skipped (too large, too deep)."""
        self._started = False

    def feed(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        for byte in data:
            if not self._started:
                if byte in _SPACE:
                    continue
                self._started = True
            if self._error is None:
                self._buf.append(byte)
                if len(self._buf) > MAX_MESSAGE:
                    self._error = f"JSON parse error, message larger than {MAX_MESSAGE} bytes"
                    self._buf.clear()
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # quote
                    self._in_string = False
            elif byte == 0x22:
                self._in_string = True
            elif byte in _OPEN:
                self._depth += 1
                if self._depth > MAX_DEPTH and self._error is None:
                    self._error = f"JSON parse error, nesting deeper than {MAX_DEPTH}"
                    self._buf.clear()
            elif byte in _CLOSE:
                self._depth -= 1
            if (
                self._depth <= 0
                and not self._in_string
                and (byte in _CLOSE or (self._depth == 0 and byte in _SPACE))
            ):
                out.append(self._take())
        return out

    def _take(self) -> Any:
        text, error = bytes(self._buf), self._error
        self._buf.clear()
        self._depth, self._error, self._started = 0, None, False
        self._in_string = self._escaped = False
        if error is not None:
            return ParseError(error)
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "invalid input"
            return ParseError(f"JSON parse error, {reason[:1].lower()}{reason[1:]}")
