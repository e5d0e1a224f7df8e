"""A schedule's definition: its fields as PROTOCOL.md names them, checked the same way for
`[[schedules]]` in config.toml and for the REST API, and the timing they make."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from remoterun.engine.cron import CATCH_UP, Timing, cron_expression, jitter_offset, period_s
from remoterun.errors import InvalidParams
from remoterun.wire import type_problems

NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
OVERLAP = ("forbid", "allow", "replace", "queue")
FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,), "script": (str,), "cron": (str,), "every": (str,), "timezone": (str,),
    "params": (dict,), "priority": (int,), "timeout": (int, float, type(None)),
    "max_retries": (int,), "overlap": (str,), "catch_up": (str,),
    "catch_up_window_s": (int, float), "jitter_s": (int, float), "enabled": (bool,),
    "node": (str,), "labels": (list,),
}
NULLABLE = ("cron", "every", "node", "labels")  # null: not given
Problems = list[dict[str, str]]


@dataclass(frozen=True)
class Spec:
    """One schedule as defined (`source`: "config" or "api")."""

    name: str
    script: str
    timezone: str
    cron: str | None = None
    every: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    timeout: float | None = None
    max_retries: int = 0
    overlap: str = "forbid"
    catch_up: str = "latest"
    catch_up_window_s: float = 3600.0
    jitter_s: float = 0.0
    enabled: bool = True
    node: str | None = None
    labels: tuple[str, ...] | None = None
    source: str = "api"

    @functools.cached_property
    def timing(self) -> Timing:
        """When its slots fall (its zone read from disk on first use: parse() does that,
        off the event loop where it matters)."""
        zone = ZoneInfo(self.timezone)
        if self.every is not None:
            return Timing(zone, every_s=period_s(self.every))
        return Timing(zone, cron=cron_expression(self.cron or ""))

    @functools.cached_property
    def offset_s(self) -> float:
        """Its jitter: how late after each slot it starts."""
        return jitter_offset(self.name, self.jitter_s)

    def fields(self) -> dict[str, Any]:
        """Its fields as the API shows them (and as an API schedule is kept)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        out["labels"] = list(self.labels) if self.labels is not None else None
        return out

    def request(self) -> dict[str, Any]:
        """The submission its slots make (Scheduler.submit's request)."""
        out: dict[str, Any] = {"script": self.script, "params": dict(self.params),
                               "priority": self.priority, "timeout": self.timeout,
                               "max_retries": self.max_retries, "schedule": self.name}
        if self.node is not None:
            out["node"] = self.node
        if self.labels is not None:
            out["labels"] = list(self.labels)
        return out


def parse(body: Any, default_zone: str, source: str = "api") -> Spec:
    """A Spec from a table or a JSON body; InvalidParams (422 `invalid_schedule`) naming
    each bad field."""
    if not isinstance(body, dict):
        raise _invalid([{"field": "", "message": "expected an object"}])
    body = {k: v for k, v in body.items() if v is not None or k not in NULLABLE}
    problems = _types(body)
    values = {k: v for k, v in body.items() if k in FIELDS}
    mistyped = {p["field"] for p in problems if p["message"].startswith("expected")}
    problems += _values({k: v for k, v in values.items() if k not in mistyped})
    if problems:
        raise _invalid(problems)
    values.setdefault("timezone", default_zone)
    for key in ("timeout", "catch_up_window_s", "jitter_s"):
        if values.get(key) is not None:
            values[key] = float(values[key])
    if "labels" in values:
        values["labels"] = tuple(values["labels"])
    spec = Spec(**values, source=source)
    _ = spec.timing, spec.offset_s  # loaded now: the zone's file, the cron's parse
    return spec


def _types(body: dict[str, Any]) -> Problems:
    problems: Problems = type_problems(body, FIELDS)
    for key in ("name", "script"):
        if key not in body:
            problems.append({"field": key, "message": "required"})
    if ("cron" in body) == ("every" in body):
        problems.append({"field": "cron", "message": "give exactly one of cron and every"})
    return problems


def _values(values: dict[str, Any]) -> Problems:
    checks: list[tuple[str, Any, str]] = [
        ("name", lambda v: NAME.fullmatch(v), "expected [a-z0-9][a-z0-9_.-]{0,62}"),
        ("overlap", lambda v: v in OVERLAP, f"one of {', '.join(OVERLAP)}"),
        ("catch_up", lambda v: v in CATCH_UP, f"one of {', '.join(CATCH_UP)}"),
        ("catch_up_window_s", lambda v: v >= 0, "must be 0 or more"),
        ("jitter_s", lambda v: 0 <= v <= 86400, "must be between 0 and 86400"),
        ("priority", lambda v: -1_000_000 <= v <= 1_000_000, "must be within ±1000000"),
        ("timeout", lambda v: v is None or 0 < v <= 366 * 86400, "must be a positive number"),
        ("max_retries", lambda v: 0 <= v <= 20, "must be between 0 and 20"),
        ("labels", lambda v: all(isinstance(x, str) for x in v), "expected strings"),
    ]
    problems = [{"field": key, "message": message} for key, ok, message in checks
                if key in values and not ok(values[key])]
    for key, check in (("cron", cron_expression), ("every", period_s), ("timezone", ZoneInfo)):
        if key in values:
            try:
                check(values[key])
            except (ValueError, ZoneInfoNotFoundError) as exc:
                text = str(exc) if key != "timezone" else "not a known IANA time zone name"
                problems.append({"field": key, "message": f"{values[key]!r}: {text}"})
    return problems


def _invalid(problems: Problems) -> InvalidParams:
    fields = ", ".join(p["field"] or "body" for p in problems)
    return InvalidParams(f"invalid schedule: {fields}", code="invalid_schedule",
                         details=problems)


def local_zone(configured: str | None) -> str:
    """The default zone: `[server] timezone`, else the server's local zone by IANA name
    (TZ, /etc/timezone, the /etc/localtime link), else UTC."""
    candidates = [configured, os.environ.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append(Path("/etc/timezone").read_text().strip())
    link = Path("/etc/localtime")
    if link.is_symlink():
        candidates.append(str(link.resolve()).partition("zoneinfo/")[2])
    for name in candidates:
        if name:
            try:
                ZoneInfo(name)
                return name
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return "UTC"
