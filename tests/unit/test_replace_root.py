"""Graph.replace_root is one transaction: insert, replace and let go, each one call; a
replacement refused after its new tree opened (and took over the old tree's names) leaves
the graph exactly as it was."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from blkfs.block import Graph, Node, Perm
from blkfs.errors import BlockError

FASTER = {"driver": "throttle", "node-name": "thr", "limits.iops-total": 5000, "file": "r"}
"""A new filter over the old tree's raw node, taking the old filter's name."""


def refuse(old: Node, new: Node) -> None:
    """Refuse a new tree that has taken over the old root's name."""
    assert new is not old and new.name == old.name == "thr"
    raise BlockError(errno.EBUSY, f"not {new.name} instead of {old.name}")


async def test_a_refused_replacement_changes_nothing(tmp_path: Path) -> None:
    image = tmp_path / "a.img"
    image.write_bytes(b"A" * 65536)
    graph = Graph()
    tree = {
        "driver": "throttle",
        "node-name": "thr",
        "limits.iops-total": 1000,
        "file": {
            "driver": "raw",
            "node-name": "r",
            "file": {"driver": "file", "filename": str(image)},
        },
    }
    edge = await graph.replace_root(None, tree, user="test")
    assert edge is not None and Perm.WRITE in edge.perm
    nodes = dict(graph.nodes)
    refcnts = {name: node.refcnt for name, node in nodes.items()}
    perms = {name: (node.perm, node.shared) for name, node in nodes.items()}

    with pytest.raises(BlockError) as err:  # the new filter takes the name thr, then is refused
        await graph.replace_root(edge, FASTER, user="test", allow=refuse)
    assert err.value.errno == errno.EBUSY
    assert graph.nodes == nodes and graph.find("thr") is nodes["thr"]
    assert {name: node.refcnt for name, node in nodes.items()} == refcnts
    assert {name: (node.perm, node.shared) for name, node in nodes.items()} == perms
    assert nodes["thr"].parents == [edge]

    new = await graph.replace_root(edge, FASTER, user="test")
    assert new is not None and graph.find("thr") is not nodes["thr"]
    assert graph.find("r") is nodes["r"] and nodes["thr"].refcnt == 0
    assert await graph.replace_root(new, None, user="test") is None
    assert graph.nodes == {}
