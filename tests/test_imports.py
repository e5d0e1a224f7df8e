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
# The layers of STYLE.md: what each module may import of ours. `wire` is the vocabulary every
# layer shares (Frame, Event, the task's JSON), so the leaves that store or read frames
# (segments, and through it gzjoin's neighbours) may name it; nothing else below the engine
# imports sideways.
LEAVES = {"config", "errors", "state", "logs", "wire", "spawn", "segments", "gzjoin"}
# feed: the committed transitions, fanned out to GET /events (a leaf beside the hub)
SERVICES = {"store", "runner", "archive", "catalogue", "compressor", "reaper", "sandbox"}
ALLOWED: dict[str, set[str]] = {
    **{leaf: set() for leaf in LEAVES},
    "segments": {"wire"},
    "store": set(LEAVES), "runner": set(LEAVES), "archive": set(LEAVES),
    "catalogue": set(LEAVES), "compressor": set(LEAVES), "reaper": set(LEAVES),
    # sandbox: isolation around a run; limits (rlimits, cgroups), bwrap (its view of the
    # filesystem) and docker (its `docker run`) are leaves beside it
    "sandbox": LEAVES | {"limits", "bwrap", "docker"}, "limits": set(LEAVES),
    "bwrap": set(LEAVES), "docker": set(LEAVES),
    "hub": LEAVES | {"archive"},
    "pending": set(LEAVES),
    "feed": set(LEAVES),
    "attempt": LEAVES | {"runner", "archive", "hub", "catalogue", "sandbox", "redact"},
    "scheduler": LEAVES | SERVICES | {"hub", "pending", "attempt", "metrics", "feed", "vault",
                                      "protect"},
    # Secrets and integrity (issue 13 B): masking is pure bytes work; the key and the checks
    # read files and name a leaf's error, nothing else of ours.
    "redact": set(),
    "vault": {"config"},
    "integrity": {"errors"},
    "protect": LEAVES | {"vault", "redact", "integrity", "catalogue", "store", "runner"},
    "auth": LEAVES | {"catalogue"},
    "metrics": set(LEAVES),
    "alerts": LEAVES | {"metrics", "archive"},
    "retention": LEAVES | {"store", "archive"},
    # cluster mode (issue 16): a node's scheduler over PostgreSQL and Redis, composed of the
    # engine's parts as scheduler is, and of the scheduler itself
    "cluster": LEAVES | SERVICES | {"hub", "pending", "attempt", "metrics", "feed",
                                    "scheduler", "catalogue"},
}


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
            if node.module == "remoterun":  # modules, not names such as __version__
                found.update(alias.name for alias in node.names
                             if (PACKAGE / f"{alias.name}.py").exists()
                             or (PACKAGE / alias.name).is_dir())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("remoterun."):
                    found.add(alias.name.split(".")[1])
    found.discard("")
    return found


def _module_path(name: str) -> Path:
    path = PACKAGE / f"{name}.py"
    return path if path.exists() else PACKAGE / name / "__init__.py"


def _imports_of(name: str) -> set[str]:
    """What a module (or every file of a package) imports of ours, itself left out."""
    folder = PACKAGE / name
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else [_module_path(name)]
    found: set[str] = set()
    for path in files:
        found |= _ours(path)
    return found - {name}


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_each_layer_imports_only_what_style_allows(module):
    """Every module of the engine imports only the layers STYLE.md points it at."""
    extra = _imports_of(module) - ALLOWED[module]
    assert not extra, f"{module} imports {sorted(extra)}"


def test_every_module_has_a_layer():
    """A new module gets its place in ALLOWED (or is part of api/, cli, __main__)."""
    top = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir()
                                                    if (p / "__init__.py").exists()}
    entry = {"__init__", "__main__", "cli", "api", "page", "remote", "attach", "commands",
             "completion"}  # the CLI's client side: see the test below
    assert top - set(ALLOWED) - entry == set()


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
