"""Docker volumes served by blkfs: ``blkfs volume-plugin`` speaks Docker's volume plugin
protocol (JSON over HTTP on a unix socket) and ``blkfs volume`` sends it the per-volume verbs.

A volume is a qcow2 (or raw) image, a backend of a blkfs mount and, while containers use it,
a filesystem on a loop device of that backend. The plugin reaches the mount the way a user
does, through ``.ctl`` files and the ``blkfs`` command, so it runs as a process of its own:
killing it leaves the mount, the loop devices and the containers' filesystems in place, and
its state directory lets the next one take them over.

* :mod:`.store`: what is kept of each volume, one JSON file each, written atomically;
* :mod:`.host`: the host's tools (losetup, mkfs, mount, fsfreeze) and the blkfs mount;
* :mod:`.volumes`: the operations, each volume's steps under its own lock;
* :mod:`.protocol`: Docker's endpoints onto the operations, without I/O;
* :mod:`.server`: HTTP over the unix socket;
* :mod:`.command`: the ``blkfs volume-plugin`` and ``blkfs volume`` command lines.
"""
