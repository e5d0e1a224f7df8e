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
LEAVES = {"config", "errors", "state", "logs", "spawn"}


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_alone(module):
    """`import remoterun.x` works in a fresh interpreter."""
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def _ours(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and \
                node.module.startswith("remoterun"):
            found.add(node.module.split(".")[1] if "." in node.module else "")
            if node.module == "remoterun":
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("remoterun."):
                    found.add(alias.name.split(".")[1])
    found.discard("")
    return found


def test_leaves_import_nothing_of_ours():
    """config, errors, state, logs and spawn import no other module of the package."""
    for leaf in LEAVES:
        assert _ours(PACKAGE / f"{leaf}.py") == set(), leaf


def test_nothing_imports_api_or_cli():
    """Only api/ itself and cli reach into api; nothing imports cli."""
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        imported = _ours(path)
        assert "cli" not in imported or rel.name == "__main__.py", rel
        if rel.parts[0] != "api" and rel.name != "cli.py":
            assert "api" not in imported, rel


def test_cli_client_modules_import_no_engine():
    """The CLI's HTTP-client modules (remote, attach, commands, completion) speak the API only:
    they import nothing of the engine, the store or api/."""
    client = {"remote", "attach", "commands", "completion"}
    for name in client:
        assert _ours(PACKAGE / f"{name}.py") <= client, name
