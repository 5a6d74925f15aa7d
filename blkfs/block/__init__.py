"""The block driver API: nodes, children, drivers and the graph. For drivers and the block
layer only; frontends use :mod:`blkfs.backend`."""

from blkfs.block.driver import BlockDriver, Extent, Status
from blkfs.block.graph import Graph
from blkfs.block.node import Child, Node, Perm
from blkfs.block.options import REQUIRED, ChildSpec, Option
from blkfs.errors import BlockError, OptionError

__all__ = ["BlockDriver", "BlockError", "Child", "ChildSpec", "Extent", "Graph", "Node",
           "Option", "OptionError", "Perm", "REQUIRED", "Status"]
