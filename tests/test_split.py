"""The split is the product: frontends use only the backend API, drivers only the driver API."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRONTENDS = sorted(
    [
        *(ROOT / "blkfs" / "frontends").rglob("*.py"),
        *(
            ROOT / "blkfs" / name
            for name in ("cli.py", "imagecmd.py", "imagejobs.py", "jobcmd.py", "progress.py")
        ),
    ]
)
"""Every way in: the frontends folder and the command line."""
OVER_THE_BACKEND_API = [ROOT / "blkfs" / "commands.py", ROOT / "blkfs" / "daemon.py"]
"""The command layer and the daemon: they too stand on the backend API alone."""


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def touches(modules: set[str], forbidden: str) -> list[str]:
    return sorted(m for m in modules if m == forbidden or m.startswith(forbidden + "."))


def test_frontends_never_import_the_driver_api_or_a_driver() -> None:
    names = {p.relative_to(ROOT / "blkfs").as_posix() for p in FRONTENDS}
    assert {"frontends/fuse/operations.py", "frontends/ctl.py", "cli.py"} <= names
    for path in FRONTENDS + OVER_THE_BACKEND_API:
        modules = imported_modules(path)
        assert not touches(modules, "blkfs.block"), f"{path.name} imports the driver API"
        assert not touches(modules, "blkfs_drivers"), f"{path.name} imports a driver"


def test_the_core_never_imports_a_frontend() -> None:
    core = [ROOT / "blkfs" / name for name in ("backend.py", "backend_io.py", "layer.py")]
    for path in [*OVER_THE_BACKEND_API, *core]:
        assert not touches(imported_modules(path), "blkfs.frontends"), path.name


def test_drivers_never_import_the_backend_api_or_a_frontend() -> None:
    forbidden = [
        "blkfs.backend",
        "blkfs.layer",
        "blkfs.commands",
        "blkfs.daemon",
        "blkfs.frontends",
        "blkfs.cli",
    ]
    for path in sorted((ROOT / "drivers").rglob("*.py")):
        modules = imported_modules(path)
        for name in forbidden:
            assert not touches(modules, name), f"{path.relative_to(ROOT)} imports {name}"


def blkfs_modules(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m == "blkfs" or m.startswith("blkfs.")}


def within(modules: set[str], allowed: list[str]) -> list[str]:
    """The modules that are none of ``allowed`` nor inside one of them."""
    return sorted(m for m in modules if not any(touches({m}, a) for a in allowed))


def test_drivers_use_only_the_driver_api_the_errors_and_the_protocol_modules() -> None:
    for path in sorted((ROOT / "drivers").rglob("*.py")):
        assert not within(blkfs_modules(path), ["blkfs.block", "blkfs.errors", "blkfs.nbd"]), (
            path.relative_to(ROOT)
        )


def test_frontends_use_only_the_backend_api_the_commands_and_the_protocol_modules() -> None:
    allowed = [
        "blkfs.backend",
        "blkfs.layer",
        "blkfs.commands",
        "blkfs.errors",
        "blkfs.frontends",
        "blkfs.nbd",
    ]
    for path in sorted((ROOT / "blkfs" / "frontends").rglob("*.py")):
        assert not within(blkfs_modules(path), allowed), path.relative_to(ROOT)


def test_the_nbd_protocol_is_sans_io() -> None:
    """blkfs.nbd is bytes in, bytes out: no blkfs layer, no frontend, no socket or trio."""
    paths = sorted((ROOT / "blkfs" / "nbd").rglob("*.py"))
    assert paths
    for path in paths:
        modules = imported_modules(path)
        assert not within(blkfs_modules(path), ["blkfs.nbd"]), path.relative_to(ROOT)
        for name in ("trio", "socket", "asyncio", "selectors"):
            assert not touches(modules, name), f"{path.relative_to(ROOT)} imports {name}"


def test_the_checker_sees_relative_and_aliased_imports(tmp_path: Path) -> None:
    probe = ROOT / "blkfs" / "_split_probe.py"
    probe.write_text(
        "from .block import node\nimport blkfs.block.graph as g\nfrom blkfs import block\n"
    )
    try:
        modules = imported_modules(probe)
    finally:
        probe.unlink()
    assert {"blkfs.block", "blkfs.block.node", "blkfs.block.graph"} <= modules


def test_every_package_is_installed_drivers_as_blkfs_drivers() -> None:
    """pyproject.toml lists the packages (drivers/ installs as blkfs_drivers, a name no other
    distribution's ``drivers`` package can take): a folder left out would be missing from a
    wheel while an editable install still found it. Inside drivers/, imports are relative
    (mypy checks the folder under its own name)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"blkfs_drivers": "drivers"}
    folders = {
        p.parent.relative_to(ROOT).as_posix().replace("/", ".")
        for top in ("blkfs", "drivers")
        for p in (ROOT / top).rglob("*.py")
    }
    assert set(config["packages"]) == {re.sub(r"^drivers", "blkfs_drivers", f) for f in folders}
    for path in [*(ROOT / "blkfs").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        assert not touches(imported_modules(path), "drivers"), (
            f"{path.relative_to(ROOT)} imports 'drivers' (the installed name is blkfs_drivers)"
        )
    for path in (ROOT / "drivers").rglob("*.py"):  # within drivers: relative imports
        assert not touches(imported_modules(path), "blkfs_drivers"), path.relative_to(ROOT)
