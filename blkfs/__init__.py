"""blkfs: a Python block layer (BlockBackend over a tree of driver nodes), served as a FUSE
filesystem. See README.md for the module map."""
