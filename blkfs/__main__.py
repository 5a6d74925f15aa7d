"""``python -m blkfs`` is the ``blkfs`` command."""

import sys

from blkfs.cli import main

sys.exit(main())
