"""Patches to pyfuse3, kept apart from the FUSE operations they serve.

Each patch reaches into pyfuse3 (or the libfuse it links) where no public API does what the
frontend needs, so each is checked against the versions its docstring names and falls back to
pyfuse3's own behaviour, with a log line, when what it finds is not what it was written for:

- :mod:`.extra_ops`: FUSE ``fallocate`` and ``lseek``, which pyfuse3 3.x does not dispatch,
  added through pyfuse3's GOT slot for ``fuse_session_new``.
- :mod:`.session_loop`: pyfuse3's wait for the next request replaced by one that takes a
  queued request without a trip through trio's scheduler, and busy-polls before sleeping.
"""
