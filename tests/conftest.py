"""Fixtures shared by every test layer: real mounts that are always unmounted."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio.testing

from tests.ceph import Cluster, cluster
from tests.helpers import Mount, blkfs_mounts_under, force_unmount, mounts_in
from tests.tls import make_credentials

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="FUSE is not available (/dev/fuse or fusermount3 missing; run scripts/setup)",
)
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img is missing (run scripts/setup)"
)
needs_loop = pytest.mark.skipif(
    os.geteuid() != 0 or any(shutil.which(t) is None for t in ("losetup", "mkfs.ext4")),
    reason="needs root, losetup and mkfs.ext4",
)
MUST_RUN_IN_CI = ("fuse", "loop", "qemu")
"""Markers of tests that CI must run: under CI=true, skipping one of them fails it."""
NBD_TOOLS = ("qemu-nbd", "nbdkit", "nbdinfo", "nbdcopy")
"""What the NBD client and export suites talk to (tests/nbdpeers.py)."""
CI_TOOLS = (
    "fusermount3",
    "losetup",
    "qemu-img",
    "qemu-io",
    "qemu-storage-daemon",
    "openssl",
    *NBD_TOOLS,
)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under CI=true, a machine without FUSE, loop devices, QEMU's tools or the NBD peers
    fails the run at once instead of skipping the tests that need them."""
    if os.environ.get("CI") != "true":
        return
    missing = [tool for tool in CI_TOOLS if shutil.which(tool) is None]
    missing += [dev for dev in ("/dev/fuse", "/dev/loop-control") if not os.path.exists(dev)]
    if missing:
        pytest.exit(
            f"CI=true, but {', '.join(missing)} missing: the tests that need them "
            "would skip (run scripts/setup; /dev/fuse needs the fuse module)",
            1,
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that needs /dev/fuse, a loop device or QEMU's tools (the NBD peers included)
    must not pass in CI by skipping: a green run would then prove nothing about what users run."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    needed = [m for m in MUST_RUN_IN_CI if item.get_closest_marker(m)]
    optional = item.get_closest_marker("kernel_module")  # the kernel may not have it at all
    if report.skipped and needed and not optional and os.environ.get("CI") == "true":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true, but it needs {', '.join(needed)}, which "
            f"CI must provide: {reason}"
        )


@pytest.fixture(autouse=True)
def no_mount_outlives_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A blkfs mount a test leaves in its tmp_path (one it started outside
    :func:`mount_factory`, such as a mount it expected to fail) is unmounted, so its daemon
    ends, and the test errors."""
    yield
    tmp_path = request.node.funcargs.get("tmp_path")
    if tmp_path is None:
        return
    left = blkfs_mounts_under(tmp_path)
    for path in left:
        force_unmount(path)
    assert not left, f"mounts left behind: {left}"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A directory for the test's image files."""
    path = tmp_path / "img"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def credentials(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x509 credentials for TLS (tests/tls.py), made once: a CA, a server certificate for
    localhost and 127.0.0.1, a client certificate, in one directory."""
    return make_credentials(tmp_path_factory.mktemp("tls") / "creds")


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[Callable[..., Mount]]:
    """Start blkfs mounts with given arguments; all are stopped after the test, even when
    it fails, and no daemon outlives it."""
    with mounts_in(tmp_path) as start:
        yield start


@pytest.fixture
def mount(mount_factory: Callable[..., Mount]) -> Mount:
    """A blkfs mount with no backends."""
    return mount_factory()


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's autojump clock, but jumping only after 0.1 s of real idleness: host
    calls run on worker threads (docs/design.md, "What runs where"), and a clock that jumped
    the moment the loop waits for one would fire a test's timers while the call is still
    under way, on a loaded machine even more so."""
    return trio.testing.MockClock(autojump_threshold=0.1)


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One throwaway Ceph cluster for the whole run (tests/ceph.py): started at the first
    test that asks, stopped at the end of the run even when tests fail."""
    with cluster(tmp_path_factory.mktemp("ceph")) as running:
        yield running
