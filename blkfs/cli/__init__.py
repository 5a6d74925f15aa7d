"""The ``blkfs`` command: :mod:`~blkfs.cli.main` (the parser, mount, umount and ctl),
:mod:`~blkfs.cli.jobs` (snapshots and block jobs of a mount), :mod:`~blkfs.cli.image` and
:mod:`~blkfs.cli.image_jobs` (qemu-img's verbs on image files), :mod:`~blkfs.cli.progress`
(following a job). Like the frontends, it stands on the backend API and the commands alone."""
