"""The ``blkfs`` command: :mod:`~blkfs.cli.main` (the parser and the table of verbs, each
imported only when used), :mod:`~blkfs.cli.mount` and :mod:`~blkfs.cli.mount_config` (a
mount and its configuration), :mod:`~blkfs.cli.umount`, :mod:`~blkfs.cli.control` (``ctl``),
:mod:`~blkfs.cli.jobs` (snapshots and block jobs of a mount), :mod:`~blkfs.cli.image` and
:mod:`~blkfs.cli.image_jobs` (qemu-img's verbs on image files), :mod:`~blkfs.cli.progress`
(following a job). Like the frontends, it stands on the backend API and the commands alone."""
