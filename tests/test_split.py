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
        *(ROOT / "blkfs" / "cli").rglob("*.py"),
    ]
)
"""Every way in: the frontends folder and the command line."""
OVER_THE_BACKEND_API = [ROOT / "blkfs" / "commands.py", ROOT / "blkfs" / "daemon.py"]
"""The command layer and the daemon: they too stand on the backend API alone."""
BACKEND_API = [
    ROOT / "blkfs" / name
    for name in (
        "backend.py",
        "backend_io.py",
        "layer.py",
        "bitmaps.py",
        "image.py",
        "info.py",
        "error_policy.py",
        "passthrough.py",
    )
]
"""The backend API: what frontends may import from the core (over the driver API)."""
BELOW = ["block", "jobs", "nbd"]
"""Packages of blkfs beneath the backend API: the driver API, the jobs over the driver graph,
the sans-IO NBD protocol."""
SHARED = [ROOT / "blkfs" / name for name in ("__init__.py", "__main__.py", "errors.py")]
"""The package itself, its ``python -m`` entry, and the error type every layer raises."""


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
    assert {"frontends/fuse/operations.py", "frontends/ctl.py", "cli/main.py"} <= names
    for path in FRONTENDS + OVER_THE_BACKEND_API:
        modules = imported_modules(path)
        assert not touches(modules, "blkfs.block"), f"{path.name} imports the driver API"
        assert not touches(modules, "blkfs_drivers"), f"{path.name} imports a driver"


def test_every_module_is_on_one_side() -> None:
    """A module in none of the lists above would slip past every rule here."""
    listed = {*FRONTENDS, *OVER_THE_BACKEND_API, *BACKEND_API, *SHARED}
    for path in sorted((ROOT / "blkfs").rglob("*.py")):
        below = path.relative_to(ROOT / "blkfs").parts[0] in BELOW
        assert below or path in listed, f"{path.relative_to(ROOT)} is in no list of test_split"


def test_the_core_never_imports_a_frontend() -> None:
    for path in [*OVER_THE_BACKEND_API, *BACKEND_API]:
        assert not touches(imported_modules(path), "blkfs.frontends"), path.name


def test_the_backend_api_never_imports_what_stands_on_it() -> None:
    for path in BACKEND_API:
        modules = imported_modules(path)
        for name in ("blkfs.commands", "blkfs.daemon", "blkfs.cli"):
            assert not touches(modules, name), f"{path.name} imports {name}"


DRIVER_TYPES = re.compile(r"\b(Node|Graph|Child)\b")


def bound(item: ast.AST) -> tuple[list[str], ast.expr | None]:
    """The names a class item binds and what types them: a method's return annotation, an
    attribute's annotation, or the constructor an attribute is assigned from."""
    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
        return [item.name], item.returns
    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Attribute):
        return [item.target.attr], item.annotation
    if isinstance(item, ast.Assign) and isinstance(item.value, ast.Call):
        return [t.attr for t in item.targets if isinstance(t, ast.Attribute)], item.value.func
    return [], None


def driver_handles() -> set[str]:
    """The attributes and methods of the backend API's classes that hold or return the
    driver API's objects (``BlockLayer.graph``, ``BlockBackend.root_node()``, ...), read
    from their annotations and assignments."""
    handles = set()
    for path in BACKEND_API:
        for cls in ast.walk(ast.parse(path.read_text(), str(path))):
            for item in ast.walk(cls) if isinstance(cls, ast.ClassDef) else ():
                names, typed_by = bound(item)
                if typed_by is not None and DRIVER_TYPES.search(ast.unparse(typed_by)):
                    handles.update(names)
    return handles


def reached(path: Path, names: set[str]) -> list[str]:
    """Every ``x.NAME`` in a file for a NAME of ``names``, as ``line: code``."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in names
    ]


def test_frontends_never_reach_the_graph_or_a_node() -> None:
    """Not through an import, nor through the backend API's own handles on the tree; nor
    do the command layer and the daemon."""
    handles = driver_handles()
    assert {"graph", "root_node"} <= handles
    for path in FRONTENDS + OVER_THE_BACKEND_API:
        assert not reached(path, handles), f"{path.relative_to(ROOT)}: {reached(path, handles)}"


def test_the_attribute_checker_sees_a_reach_into_the_graph(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("async def f(layer, b):\n    layer.graph.find('n')\n    b.root_node().name\n")
    assert len(reached(probe, driver_handles())) == 2


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
        "blkfs.commands",
        "blkfs.errors",
        "blkfs.frontends",
        "blkfs.info",
        "blkfs.layer",
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
