"""qcow2: QEMU's copy-on-write format, read and written interchangeably with qemu-img.

The pieces, after QEMU's block/qcow2*.c:

* ``ondisk``: every on-disk structure (header, extensions, snapshot and bitmap directory
  entries, tables, refcount entries), packed and unpacked; no I/O.
* ``mapping``: cluster mapping, from guest offsets through L2 entries to host offsets; no I/O.
* ``cache``: the metadata cache and its write-back, in the order each kind declares.
* ``refcount``: the refcount allocator.
* ``metadata``: an open image's metadata: loaded at open, the write-back order declared.
* ``imagefile``: the image file as the metadata code sees it; header reads and writes.
* ``mapped``, ``writes``, ``image_changes``, ``driver``: the driver in layers, each a class
  over the one before: mapping and reads; writes, zeroing and write-back; emptying, a new
  backing file and growth; opening, closing and the driver's declaration.
* ``check``: ``qemu-img check`` and leak repair.
* ``create``: new images.
"""

from .driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
