"""How long the FUSE frontend busy-polls /dev/fuse before sleeping (``poll-max-ns``): the
default and the bound, declared once for the session loop that polls and the command line
that takes the setting."""

POLL_MAX_NS = 65536
"""The longest busy-poll before sleeping. Twice QEMU's iothread default: at queue depth 1
the next request came 20-35 us after a reply on the 2-vCPU VM of the benchmark, so 32 us
polls missed about half of them (4 KiB reads: 14-20k IOPS, against 23.5k with 64 us)."""

MAX_POLL_NS = 1_000_000_000
"""``poll-max-ns`` at most a second: a daemon may busy-poll that long once when it idles."""
