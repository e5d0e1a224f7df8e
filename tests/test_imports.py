"""Every module imports alone (no cycles), and the layers point the way STYLE.md says."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "remoterun"
MODULES = sorted(
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
    for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"
)
# The layers of STYLE.md, as rules between units: a unit is a top-level module or a whole
# subpackage (engine/, isolation/, archive/, store/, cluster/, api/, cli/). Each unit may import
# only what its entry names. Leaves import nothing of ours but the other leaves they name.
LEAVES = {"config", "errors", "state", "logs", "wire", "spawn", "hooks"}
ALLOWED: dict[str, set[str]] = {
    "config": {"hooks"}, "hooks": set(), "errors": set(), "logs": set(), "wire": set(),
    "spawn": set(),
    "state": {"wire"},  # the Task's wire form is the one wire.task_json makes
    # services: each a family of interchangeable or related parts over the leaves
    "store": set(LEAVES), "archive": set(LEAVES), "isolation": set(LEAVES),
    "catalogue": set(LEAVES), "runner": set(LEAVES), "reaper": set(LEAVES),
    "metrics": set(LEAVES),
    # secrets and integrity: masking is pure bytes work; the key and the checks read files
    "redact": set(), "vault": {"config"}, "integrity": {"errors"},
    "auth": LEAVES | {"catalogue"},
    "alerts": LEAVES | {"metrics", "archive"},
    "retention": LEAVES | {"store", "archive"},
    # the engine composes the services; cluster provides parts the engine is built with and
    # may name the engine's protocols, never the other way round
    "engine": LEAVES | {"store", "archive", "isolation", "catalogue", "runner", "reaper",
                        "metrics", "redact", "vault", "integrity"},
    "cluster": LEAVES | {"store", "archive", "catalogue", "runner", "reaper", "metrics",
                         "engine"},
    # the API talks to the engine, reads through the store, uses the leaves; only the CLI's
    # `serve` (and __main__) sit above it. api/app.py is the composition root: it builds the
    # engine's parts, the Sandbox among them (issue 24), hence `isolation`
    "api": LEAVES | {"store", "archive", "catalogue", "metrics", "auth", "alerts", "retention",
                     "engine", "cluster", "integrity", "vault", "redact", "isolation"},
    "cli": LEAVES | {"api", "store", "catalogue", "auth", "integrity", "retention", "vault",
                     "archive"},
}
UNITS = sorted({p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir()
                                                          if (p / "__init__.py").exists()})


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    """`import remoterun.x` works in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _ours(path: Path) -> set[str]:
    """The units of ours a file imports (the first name after `remoterun.`)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("remoterun"):
            if node.module == "remoterun":  # units, not names such as __version__
                found.update(alias.name for alias in node.names
                             if (PACKAGE / f"{alias.name}.py").exists()
                             or (PACKAGE / alias.name).is_dir())
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("remoterun."):
                    found.add(alias.name.split(".")[1])
    return found


def _files_of(unit: str) -> list[Path]:
    folder = PACKAGE / unit
    return sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{unit}.py"]


def _imports_of(unit: str) -> set[str]:
    """What a unit (every file of a package) imports of ours, itself left out."""
    found: set[str] = set()
    for path in _files_of(unit):
        found |= _ours(path)
    return found - {unit}


@pytest.mark.parametrize("unit", sorted(ALLOWED))
def test_each_unit_imports_only_what_style_allows(unit):
    """Every unit (module or subpackage, api/ and cli/ included) imports only the layers
    STYLE.md points it at."""
    extra = _imports_of(unit) - ALLOWED[unit]
    assert not extra, f"{unit} imports {sorted(extra)}"


def test_every_unit_has_a_layer():
    """A new module or package gets its place in ALLOWED (only the entry points are exempt)."""
    assert set(UNITS) - set(ALLOWED) - {"__init__", "__main__", "page"} == set()


def test_nothing_imports_api_or_cli():
    """Only the CLI (its `serve`) reaches into api/; nothing but __main__ imports cli/."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        imported = _ours(path)
        assert "cli" not in imported or rel.parts[0] in {"__main__.py", "cli"}, rel
        assert "api" not in imported or rel.parts[0] in {"api", "cli"}, rel


def test_cli_client_modules_import_no_engine():
    """The CLI's HTTP-client modules (remote, attach, commands, completion, clock) speak the API only:
    they import nothing of ours but each other."""
    client = {"remote", "attach", "commands", "completion", "clock", "hooks"}
    for name in client:
        tree = ast.parse((PACKAGE / "cli" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("remoterun"):
                assert node.module.startswith("remoterun.cli."), (name, node.module)
                assert node.module.split(".")[2] in client, (name, node.module)


def _store_modules(path: Path) -> set[str]:
    """The modules of store/ a file imports, by name (`from remoterun.store import x` too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "remoterun.store":
                found.update(alias.name for alias in node.names
                             if (PACKAGE / "store" / f"{alias.name}.py").exists())
            elif node.module.startswith("remoterun.store."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[2] for alias in node.names
                         if alias.name.startswith("remoterun.store."))
    return found


def test_the_two_stores_are_siblings():
    """store/sqlite.py and store/postgres.py each implement store/base.py's Protocol on their
    own: neither imports the other, and what they share (base, schema, queries, nodes)
    imports neither; only the package's __init__ names a backend."""
    backends = {"sqlite", "postgres"}
    for path in sorted((PACKAGE / "store").glob("*.py")):
        if path.name == "__init__.py":
            continue
        imported = _store_modules(path) & backends - {path.stem}
        assert not imported, f"store/{path.name} imports {sorted(imported)}"
