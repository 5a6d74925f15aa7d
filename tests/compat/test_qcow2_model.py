"""qcow2 against a bytearray model: hypothesis draws sequences of unaligned writes, zero
writes and discards; blkfs must read back the model, and QEMU must find the image sound and
read the same bytes. Allocation, copy-on-write and refcounting bugs surface here first."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blkfs.image import create_image
from blkfs.layer import BlockLayer
from tests.compat.peers import KiB, check, to_raw
from tests.conftest import needs_qemu

pytestmark = needs_qemu

SIZE = 256 * KiB
SECTOR = 512

ops = st.lists(
    st.tuples(
        st.sampled_from(("write", "zeroes", "discard")),
        st.integers(0, SIZE - 1),
        st.integers(1, 40 * KiB),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=12,
)

CONFIGS = {
    "c512": {"cluster_size": "512"},
    "c4k-refcount1": {"cluster_size": "4k", "refcount_bits": "1"},
    "c64k-v2": {"cluster_size": "64k", "compat": "0.10"},
    "c64k-extl2": {"cluster_size": "64k", "extended_l2": "on"},
}


@pytest.mark.parametrize("backing", [False, True], ids=["alone", "over-backing"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_random_operations_match_the_model_and_pass_check(config: str, backing: bool) -> None:
    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops)
    def run(sequence: list[tuple[str, int, int, int]]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            trio.run(check_sequence, Path(tmp), CONFIGS[config], backing, sequence)

    run()


async def check_sequence(
    tmp: Path, options: dict[str, str], backing: bool, sequence: list[tuple[str, int, int, int]]
) -> None:
    model = bytearray(SIZE)
    base = None
    if backing:
        model[:] = bytes((i * 7 + i // 4096) % 251 for i in range(SIZE))
        base = tmp / "base.raw"
        base.write_bytes(model)
    image = tmp / "top.qcow2"
    await create_image(
        str(image),
        "qcow2",
        SIZE,
        options=options,
        backing=base.name if base else None,
        backing_format="raw",
    )
    layer = BlockLayer()
    backend = await layer.create("d", str(image))
    try:
        for kind, offset, length, byte in sequence:
            length = min(length, SIZE - offset)
            if kind == "write":
                await backend.write(offset, bytes([byte]) * length)
                model[offset : offset + length] = bytes([byte]) * length
            elif kind == "zeroes":
                await backend.write_zeroes(offset, length, unmap=byte % 2 == 0)
                model[offset : offset + length] = bytes(length)
            else:
                await backend.discard(offset, length)
                after = await backend.read(offset, length)
                assert_data_or_zero(after, model, offset)
                model[offset : offset + length] = after
        assert await backend.read(0, SIZE) == model
    finally:
        await layer.close()
    check(image)
    assert to_raw(image) == model


def assert_data_or_zero(after: bytes, model: bytearray, offset: int) -> None:
    """Discard is advisory: each sector of the range reads as before or as zeros."""
    position = offset
    while position < offset + len(after):
        end = min(position // SECTOR * SECTOR + SECTOR, offset + len(after))
        got = after[position - offset : end - offset]
        assert got in (model[position:end], bytes(end - position)), position
        position = end
