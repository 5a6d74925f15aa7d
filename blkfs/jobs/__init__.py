"""Live snapshots and block jobs: long copies that run inside the daemon while backends
keep serving (QEMU's block jobs), and the switches that end them."""
