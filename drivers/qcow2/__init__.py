"""qcow2: QEMU's copy-on-write format, read and written interchangeably with qemu-img.

``format`` declares the on-disk structures, ``layout`` the pure address and refcount
arithmetic, ``cache`` the bounded metadata cache, ``create`` new images, ``driver`` the
driver itself.
"""

from drivers.qcow2.driver import Qcow2Driver

__all__ = ["Qcow2Driver"]
