"""raw with offset/size against a bytearray model: random unaligned I/O, nothing outside moves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from blkfs.layer import BlockLayer

HOST = 64 * 1024
OFFSET, SIZE = 5000, 40000

op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.binary(min_size=1, max_size=9000)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 9000)),
    st.tuples(st.just("read"), st.integers(0, SIZE - 1), st.integers(1, 9000)),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(op, max_size=25))
def test_raw_slice_matches_a_bytearray(ops: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(check_ops, Path(tmp), ops)


async def check_ops(tmp: Path, ops: list) -> None:
    host = bytearray(os.urandom(HOST))
    image = tmp / "disk.img"
    image.write_bytes(host)
    model = host[OFFSET : OFFSET + SIZE]
    layer = BlockLayer()
    backend = await layer.create(
        "d", f"driver=raw,offset={OFFSET},size={SIZE},file.driver=file,file.filename={image}"
    )
    try:
        for kind, offset, arg in ops:
            length = min(len(arg) if kind == "write" else arg, SIZE - offset)
            if kind == "write":
                await backend.write(offset, arg[:length])
                model[offset : offset + length] = arg[:length]
            elif kind == "zero":
                await backend.write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            else:
                assert await backend.read(offset, length) == model[offset : offset + length]
        assert await backend.read(0, SIZE) == model
    finally:
        await layer.close()
    after = image.read_bytes()
    assert after[:OFFSET] == host[:OFFSET] and after[OFFSET + SIZE :] == host[OFFSET + SIZE :]
    assert after[OFFSET : OFFSET + SIZE] == model
