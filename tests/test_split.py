"""The split is the product: frontends use only the backend API, drivers only the driver API."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = {"backend.py", "errors.py", "image.py", "__init__.py"}
"""Modules of blkfs/ outside blkfs/block that are the core, not a frontend."""


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against its package."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module or ""]))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def frontend_modules() -> list[Path]:
    return [p for p in sorted((ROOT / "blkfs").glob("*.py")) if p.name not in CORE]


def touches(modules: set[str], forbidden: str) -> list[str]:
    return sorted(m for m in modules if m == forbidden or m.startswith(forbidden + "."))


def test_frontends_never_import_the_driver_api_or_a_driver() -> None:
    frontends = frontend_modules()
    assert {"fusefs.py", "control.py", "cli.py"} <= {p.name for p in frontends}
    for path in frontends:
        modules = imported_modules(path)
        assert not touches(modules, "blkfs.block"), f"{path.name} imports the driver API"
        assert not touches(modules, "drivers"), f"{path.name} imports a driver"


def test_drivers_never_import_the_backend_api_or_a_frontend() -> None:
    forbidden = ["blkfs.backend"] + [f"blkfs.{p.stem}" for p in frontend_modules()]
    for path in sorted((ROOT / "drivers").rglob("*.py")):
        modules = imported_modules(path)
        for name in forbidden:
            assert not touches(modules, name), f"{path.relative_to(ROOT)} imports {name}"


def test_the_checker_sees_relative_and_aliased_imports(tmp_path: Path) -> None:
    probe = ROOT / "blkfs" / "_split_probe.py"
    probe.write_text("from .block import node\nimport blkfs.block.graph as g\n"
                     "from blkfs import block\n")
    try:
        modules = imported_modules(probe)
    finally:
        probe.unlink()
    assert {"blkfs.block", "blkfs.block.node", "blkfs.block.graph"} <= modules
