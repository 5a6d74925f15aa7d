"""Under CI=true, a test that needs FUSE or a loop device fails instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_pytest(tmp_path: Path, ci: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.mark.fuse\n"
        "@pytest.mark.skipif(True, reason='no /dev/fuse here')\n"
        "def test_needs_fuse():\n    pass\n"
        "@pytest.mark.skipif(True, reason='optional')\n"
        "def test_optional():\n    pass\n"
        "@pytest.mark.fuse\n"
        "@pytest.mark.kernel_module('nbd')\n"
        "@pytest.mark.skipif(True, reason='no nbd module in this kernel')\n"
        "def test_needs_a_module_the_kernel_lacks():\n    pass\n")
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_runtest_makereport  # noqa: F401\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-p", "no:randomly", "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)


def test_a_skipped_fuse_test_fails_under_ci(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "true")
    assert result.returncode == 1, result.stdout
    assert "2 skipped" in result.stdout and "1 error" in result.stdout  # the optional ones
    assert "skipped under CI=true, but it needs fuse" in result.stdout


def test_it_skips_elsewhere(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "")
    assert result.returncode == 0 and "3 skipped" in result.stdout, result.stdout
