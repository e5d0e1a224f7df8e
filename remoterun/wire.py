"""The wire's vocabulary: output frames, events, the task's JSON, times, and their encodings.

A leaf every layer shares: the engine builds Frames and Events, the archive stores Frames, the
hub fans them out, and the API sends them as WebSocket text, SSE events or JSON lines; each
encoding is made once per item and kept on it, so a frame fanned out to a thousand sockets is
encoded once.
"""

from __future__ import annotations

import functools
import json
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

SIGNALS = {name: getattr(signal, "SIG" + name)
           for name in ("INT", "TERM", "HUP", "QUIT", "KILL", "USR1", "USR2")}

@dataclass(slots=True)
class Frame:
    """One output frame: a read-sized chunk of one stream, numbered per task."""

    seq: int
    stream: str
    ts: float
    data: bytes
    encoded: dict[str, Any] | None = None  # per-format encodings, made once for all clients


def rfc3339(ts: float | None) -> str | None:
    """Unix seconds as PROTOCOL.md's time format (every output frame has one: the formatted
    second is reused, only the milliseconds are new)."""
    if ts is None:
        return None
    second = int(ts)
    millis = int((ts - second) * 1000)
    return f"{_second(second)}.{millis:03d}Z"


@functools.lru_cache(maxsize=64)
def _second(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def task_json(row: dict[str, Any]) -> dict[str, Any]:
    """A task row as REST and WebSocket show it."""
    out = {
        "id": row["id"],
        "script": row["script"],
        "params": json.loads(row["params"]),
        "status": row["status"],
        "priority": row["priority"],
        "timeout": row["timeout"],
        "max_retries": row["max_retries"],
        "attempt": row["attempt"],
        "pty": bool(row["pty"]),
        "interactive": bool(row["interactive"]),
        "exit_code": row["exit_code"],
        "error": row["error"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "run_after": rfc3339(row["run_after"]),
        "submitted_by": row["submitted_by"],
        "logs_path": row["logs_path"],
        "output_bytes": row["output_bytes"],
        "last_seq": row["last_seq"],
        "schedule": row.get("schedule"),  # the schedule that submitted it (issue 29)
        "scheduled_for": rfc3339(row.get("scheduled_for")),
    }
    # The node of its latest attempt: a cluster row's owner; "local" on a single server.
    out["node"] = row["owner"] if "owner" in row else "local" if row["started_at"] else None
    return out


@dataclass(slots=True)
class Event:
    """A non-output message: `task`, `status` or `exit`, with its body."""

    kind: str
    body: dict[str, Any]
    encoded: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        """Whether this event ends the stream."""
        return self.kind == "exit"


Item = Frame | Event


def dumps(obj: Any) -> str:
    """Compact JSON text, non-ASCII kept readable (not \\uXXXX) for people using wscat.

    orjson: ~10x the standard library's speed, which spent ~5% of the event loop on a trivial
    task's dozen frames and bodies; the standard library for what orjson refuses (integers
    past 64 bits, possible in a task's params).

    A string UTF-8 cannot encode (a lone surrogate, refused at every input but maybe in a row
    stored before that, or written to the database by hand) goes out as U+FFFD: one bad row
    must not make every list that holds it unanswerable.
    """
    try:
        return orjson.dumps(obj).decode()
    except TypeError:  # orjson.JSONEncodeError
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return _SURROGATE.sub("\ufffd", text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def unencodable(value: Any) -> str | None:
    """Where a parsed JSON value holds a string (value or key) that UTF-8 cannot encode: a
    lone surrogate, which JSON's `\\uXXXX` escapes can spell; None when it holds none.

    The answer is a field path (`params.a`, `labels[0]`), for an error's `details`.
    """
    todo: list[tuple[str, Any]] = [("", value)]
    while todo:
        path, item = todo.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return path or "body"
        elif isinstance(item, dict):
            for key, inner in item.items():
                where = f"{path}.{key}" if path else str(key)
                if not key.isascii() and _SURROGATE.search(key):
                    return _SURROGATE.sub("\ufffd", where)
                todo.append((where, inner))
        elif isinstance(item, list):
            todo.extend((f"{path}[{i}]", inner) for i, inner in enumerate(item))
    return None


def _frame_body(frame: Frame) -> str:
    return dumps({"seq": frame.seq, "stream": frame.stream, "ts": rfc3339(frame.ts),
                  "data": frame.data.decode("utf-8", "replace")})


def encoded(item: Item, form: str, make: Callable[[Item], Any]) -> Any:
    """The item in one wire form, made on first use and kept on the item: shared by every
    client, so a frame fanned out to a thousand sockets is encoded once."""
    cache = item.encoded
    if cache is None:
        cache = item.encoded = {}
    value = cache.get(form)
    if value is None:
        value = cache[form] = make(item)
    return value


def _ws_payload(item: Item) -> bytes:
    if isinstance(item, Frame):
        # One dict, one orjson call: the output decoded once and copied once into its JSON
        # (building it from the SSE body as text, sliced, joined and encoded again, made four
        # more copies and one more UTF-8 pass: ~0.2 ms per MB of output, on the loop).
        return orjson.dumps({"type": "output", "seq": item.seq, "stream": item.stream,
                             "ts": rfc3339(item.ts),
                             "data": item.data.decode("utf-8", "replace")})
    return dumps({"type": item.kind, **item.body}).encode()


def _json_body(item: Item) -> str:
    if isinstance(item, Frame):
        return _frame_body(item)
    return dumps(item.body)


def ws_payload(item: Item) -> bytes:
    """The item as a WebSocket text frame's JSON, UTF-8 encoded."""
    return bytes(encoded(item, "ws", _ws_payload))


def sse_data(item: Item) -> str:
    """The JSON body of the item as an SSE `data:` line (and a jsonl record) carries it."""
    return str(encoded(item, "json", _json_body))


def sse_text(item: Item) -> str:
    """The item as one Server-Sent Event."""
    if isinstance(item, Frame):
        return f"id: {item.seq}\nevent: output\ndata: {sse_data(item)}\n\n"
    return f"event: {item.kind}\ndata: {sse_data(item)}\n\n"


def item_size(item: Item) -> int:
    """What an item costs a subscriber's queue, in bytes."""
    return len(item.data) + 64 if isinstance(item, Frame) else 256


def exit_event(row: dict[str, Any]) -> Event:
    """The `exit` event for a task row in a final state."""
    started, finished = row.get("started_at"), row.get("finished_at")
    duration = round(finished - started, 3) if started is not None and finished else None
    return Event("exit", {"status": row["status"], "exit_code": row["exit_code"],
                          "duration": duration, "last_seq": row.get("last_seq")})


def type_problems(body: dict[str, Any], fields: dict[str, tuple[type, ...]]
                  ) -> list[dict[str, str]]:
    """A JSON body's fields checked against their allowed types (bool is never an int here):
    one `{"field", "message"}` per unknown field or wrong type."""
    problems: list[dict[str, str]] = []
    for key, value in body.items():
        types = fields.get(key)
        if types is None:
            problems.append({"field": key, "message": "unknown field"})
        elif not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append({"field": key, "message": f"expected {expected}"})
    return problems
