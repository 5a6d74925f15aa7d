"""``cache.no-flush=on`` (QEMU's cache=unsafe, as ``blkfs image convert -t unsafe``
opens its target): a flush writes back what a format node caches, but no host file is asked
to make anything durable."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from blkfs.layer import BlockLayer
from tests.compat.peers import MiB, check, create, to_raw
from tests.conftest import needs_qemu

pytestmark = [needs_qemu]


@pytest.mark.parametrize("no_flush", [False, True])
async def test_a_flush_writes_back_metadata_and_flushes_the_host_file_unless_no_flush(
    images: Path, no_flush: bool
) -> None:
    """The qcow2 node's setting reaches its file node; what QEMU reads after the flush (the
    image still open) is what was written either way."""
    image = create(images, "img.qcow2")
    layer = BlockLayer()
    try:
        backend = await layer.create(
            "d",
            f"driver=qcow2,cache.no-flush={'on' if no_flush else 'off'},"
            f"file.driver=file,file.node-name=host,file.filename={image}",
        )
        await backend.write(0, b"\1" * MiB)
        await backend.flush()
        seen = subprocess.run(
            ["qemu-io", "-r", "-U", "-f", "qcow2", "-c", f"read -P 1 0 {MiB}", str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        host = layer.graph.nodes["host"]
        assert host.values["cache.no-flush"] is no_flush
        flushes = host.stats.flush.ops
    finally:
        await layer.close()
    assert "fail" not in seen.lower()
    assert (flushes == 0) is no_flush
    check(image)
    assert to_raw(image)[:MiB] == b"\1" * MiB
