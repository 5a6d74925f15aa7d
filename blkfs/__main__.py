"""``python -m blkfs`` is the ``blkfs`` command."""

import sys

from blkfs.cli.main import main

sys.exit(main())
