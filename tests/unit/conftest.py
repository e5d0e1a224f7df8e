"""The unit layer: pure parts only (no process, no socket, no database); `pytest -m unit` or
`pytest tests/unit` runs it alone in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder `unit`."""
    for item in items:
        if HERE in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.unit)
