"""Times as the CLI shows them: the user's local zone with its offset, or UTC marked Z."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def _parsed(iso: str, utc: bool) -> datetime:
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return moment.astimezone(UTC if utc else None)  # None: the zone TZ (or /etc/localtime) names


def _marked(text: str) -> str:
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def short(iso: str, utc: bool = False) -> str:
    """`2026-12-08 09:10:03+08:00` (or `2026-12-08 01:10:03Z` with utc) for a table."""
    return _marked(_parsed(iso, utc).isoformat(sep=" ", timespec="seconds"))


def precise(iso: str, utc: bool = False) -> str:
    """`2026-12-08T09:10:03.123+08:00` (or `...Z` with utc), for one task and output lines."""
    return _marked(_parsed(iso, utc).isoformat(timespec="milliseconds"))


def task_times(task: dict[str, Any], utc: bool = False) -> dict[str, Any]:
    """A task's JSON with its `*_at` times shown (the rest as it was)."""
    return {key: precise(value, utc) if key.endswith("_at") and isinstance(value, str) else value
            for key, value in task.items()}
