"""``blkfs`` starts fast because each verb imports only what it uses (docs/benchmarks.md,
"Start-up of the command"). Guarded by what a real run of the command leaves in
``sys.modules``, never by timing it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from blkfs.cli.main import VERBS, parser

RUN = """
import json, sys
from blkfs.cli.main import main
try:
    status = main(sys.argv[2:])
except SystemExit as exc:
    status = exc.code
with open(sys.argv[1], "w") as f:
    json.dump({"status": status, "modules": sorted(sys.modules)}, f)
"""
"""``blkfs ARGS`` in a fresh interpreter, which writes its exit status and every module it
imported to a file."""
FRONTENDS = ("pyfuse3", "blkfs.frontends.fuse", "blkfs.frontends.qmp", "blkfs.frontends.volumes")
"""What only ``mount`` (FUSE; QMP when asked for) and ``volume-plugin`` need."""
RBD = "blkfs_drivers.rbd"


def run(tmp_path: Path, *argv: str | Path) -> tuple[int, set[str]]:
    """The exit status of ``blkfs ARGV`` and the modules it imported."""
    report = tmp_path / "modules.json"
    subprocess.run(
        [sys.executable, "-c", RUN, report, *argv], check=True, capture_output=True, cwd=tmp_path
    )
    result = json.loads(report.read_text())
    return result["status"], set(result["modules"])


def imported(modules: set[str], *packages: str) -> list[str]:
    return sorted(m for m in modules for p in packages if m == p or m.startswith(p + "."))


def fake_mount(tmp_path: Path) -> Path:
    """A directory with the reports of a mount's ``.ctl``, as a daemon writes them: what
    ``ctl`` and ``job`` read is the same whether FUSE or a plain file serves it."""
    ctl = tmp_path / "mnt" / ".ctl"
    ctl.mkdir(parents=True)
    (ctl / "status").write_text("BACKEND  MEDIUM  RO  SIZE  OPEN  ROOT\n")
    (ctl / "jobs").write_text("JOB  TYPE  STATUS  PROGRESS\n")
    return ctl.parent


def test_the_verb_table_names_every_verb_the_parser_declares_in_its_order() -> None:
    (verbs,) = (a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(verbs.choices) == list(VERBS)


def test_version_imports_neither_the_block_layer_nor_a_frontend(tmp_path: Path) -> None:
    status, modules = run(tmp_path, "--version")
    assert status == 0
    assert not imported(modules, "trio", "blkfs.backend", "blkfs.frontends", "blkfs_drivers")


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl", "{mnt}", "status"],
        ["job", "list", "{mnt}"],
        ["umount", "{tmp}"],  # not a mount: refused, after the verb's imports
    ],
)
def test_verbs_of_a_mount_import_no_frontend_and_no_driver(tmp_path: Path, argv: list[str]) -> None:
    mnt = fake_mount(tmp_path)
    status, modules = run(tmp_path, *(a.format(mnt=mnt, tmp=tmp_path) for a in argv))
    assert status == (1 if argv[0] == "umount" else 0)
    assert not imported(modules, *FRONTENDS, "blkfs.frontends.nbd", "blkfs_drivers")


def test_image_verbs_import_no_frontend(tmp_path: Path) -> None:
    """``image`` opens images through the layer in this process: drivers yes (probing a
    format loads every driver class, so the rbd driver's module too), frontends no."""
    image = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "1M"], check=True)
    for argv in (["info", image], ["convert", "-O", "raw", image, tmp_path / "a.raw"]):
        status, modules = run(tmp_path, "image", *argv)
        assert status == 0
        assert not imported(modules, *FRONTENDS, "blkfs.frontends.nbd")
    assert (tmp_path / "a.raw").stat().st_size == 1 << 20


@pytest.mark.parametrize("qmp", [False, True])
def test_mount_imports_qmp_only_when_it_serves_qmp(tmp_path: Path, qmp: bool) -> None:
    """Refused at its mountpoint (a file), once the configuration is built."""
    (tmp_path / "file").touch()
    flags = ["--qmp", f"unix:{tmp_path / 'qmp.sock'}"] if qmp else []
    status, modules = run(tmp_path, "mount", tmp_path / "file", *flags)
    assert status == 1
    assert "blkfs.frontends.fuse" in modules
    assert ("blkfs.frontends.qmp" in modules) == qmp
    assert not imported(modules, "blkfs.frontends.volumes", RBD)
