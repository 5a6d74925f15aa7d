"""The block driver API: nodes, children, drivers and the graph. For drivers and the block
layer only; frontends use :mod:`blkfs.backend`."""

from blkfs.block.driver import BlockDriver, Extent, Status, WriteFlags
from blkfs.block.graph import Graph
from blkfs.block.node import Child, Node
from blkfs.block.options import REQUIRED, ChildSpec, Option
from blkfs.block.perm import FILTERED, IMAGE, Perm, Role
from blkfs.block.request import RangeLocks
from blkfs.errors import BlockError, LastingError, OptionError

__all__ = [
    "FILTERED",
    "IMAGE",
    "REQUIRED",
    "BlockDriver",
    "BlockError",
    "Child",
    "ChildSpec",
    "Extent",
    "Graph",
    "LastingError",
    "Node",
    "Option",
    "OptionError",
    "Perm",
    "RangeLocks",
    "Role",
    "Status",
    "WriteFlags",
]
