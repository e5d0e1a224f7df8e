"""structlog set-up: one JSON line per event on stderr (a readable, coloured line when stderr
is a terminal), context variables merged first."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import sys
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog


def _serialize(event: dict[str, Any], **kw: Any) -> str:
    # orjson is ~10x the standard library's speed (a line per submission and per end, on
    # the event loop); the standard library for what it refuses (integers past 64 bits).
    try:
        return orjson.dumps(event, default=kw.get("default")).decode()
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(event, **kw)


def _timestamp(logger: Any, name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`timestamp`: now in UTC, ISO 8601 to the microsecond (the second formatted once)."""
    now = time.time()
    second = int(now)
    event["timestamp"] = f"{_second(second)}.{int((now - second) * 1e6):06d}Z"
    return event


@functools.lru_cache(maxsize=4)
def _second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def configure(level: str = "info", console: bool | None = None) -> None:
    """Send structlog events at `level` (debug, info, warning, error) and above to stderr: as
    JSON lines, or for a person reading a terminal (`console`; by default when stderr is a
    tty) as aligned, coloured lines with the traceback rendered."""
    if console is None:
        console = sys.stderr.isatty()
    tail: list[Any]
    if console:
        # Tracebacks without their frames' locals (rich shows them by default): a local may
        # hold a task's secret params.
        formatter = structlog.dev.RichTracebackFormatter(show_locals=False) \
            if importlib.util.find_spec("rich") else structlog.dev.plain_traceback
        tail = [structlog.dev.ConsoleRenderer(colors=True, exception_formatter=formatter)]
    else:
        tail = [structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(serializer=_serialize)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),  # a line in one write
        cache_logger_on_first_use=True,
    )
