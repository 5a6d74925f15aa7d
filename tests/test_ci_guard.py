"""Under CI=true, a test that needs FUSE, a loop device, QEMU's tools or the NBD peers fails
instead of skipping."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CI_TOOLS

ROOT = Path(__file__).resolve().parent.parent
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
"""A pytest run of its own, in this interpreter."""


def run_pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.mark.fuse\n"
        "@pytest.mark.skipif(True, reason='no /dev/fuse here')\n"
        "def test_needs_fuse():\n    pass\n"
        "@pytest.mark.qemu\n"
        "@pytest.mark.skipif(True, reason='qemu-nbd, nbdkit or libnbd tools are missing')\n"
        "def test_needs_the_nbd_peers():\n    pass\n"
        "@pytest.mark.skipif(True, reason='optional')\n"
        "def test_optional():\n    pass\n"
        "@pytest.mark.fuse\n"
        "@pytest.mark.kernel_module('nbd')\n"
        "@pytest.mark.skipif(True, reason='no nbd module in this kernel')\n"
        "def test_needs_a_module_the_kernel_lacks():\n    pass\n"
    )
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_makereport  # noqa: F401\n"
    )
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*PYTEST, "--rootdir", str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )


def test_a_skipped_fuse_test_fails_under_ci(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "2 skipped" in result.stdout and "2 error" in result.stdout  # the optional ones
    assert "skipped under CI=true, but it needs fuse" in result.stdout
    assert "skipped under CI=true, but it needs qemu" in result.stdout


def test_it_skips_elsewhere(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "")
    assert result.returncode == 0 and "4 skipped" in result.stdout, result.stdout


@pytest.mark.parametrize("tool", ["nbdkit", "qemu-nbd", "nbdinfo", "nbdcopy"])
def test_a_missing_nbd_peer_fails_the_run_under_ci(tmp_path: Path, tool: str) -> None:
    """The NBD suites skip without it; CI must not go green by skipping them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for other in CI_TOOLS:
        found = shutil.which(other)
        if other != tool and found:
            (bin_dir / other).symlink_to(found)
    env = {**os.environ, "CI": "true", "PATH": str(bin_dir), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [*PYTEST, str(ROOT / "tests" / "test_split.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    said = result.stdout + result.stderr
    line = next((line for line in said.splitlines() if "CI=true, but" in line), "")
    named = line.split("missing")[0].replace(",", " ").split()
    assert result.returncode == 1 and tool in named, said
