"""blkfs's own block drivers, one module (or package) each, registered by entry point."""
