"""The ways in to the backends, each over the backend API and the command layer only
(``tests/test_split.py`` reads their imports):

* :mod:`blkfs.frontends.fuse`: one file per backend in a FUSE mount, and ``.ctl/``;
* :mod:`blkfs.frontends.ctl`: the ``.ctl`` text grammar, an adapter over the command layer;
* :mod:`blkfs.frontends.nbd`: NBD exports of backends, over the protocol in :mod:`blkfs.nbd`;
* :mod:`blkfs.frontends.qmp`: a QMP monitor, QEMU's commands translated onto the command
  layer;
* the ``blkfs`` command line (:mod:`blkfs.cli`).
"""
