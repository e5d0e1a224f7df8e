"""The engine's writes as statements: each a shape and its values, in no dialect.

`schema.Dialect.bind` renders a shape in its store's dialect; the builders here only name the
table, the columns and the rows, so one builder serves SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from remoterun.store.base import Guarded, Row, Statement
from remoterun.store.schema import (
    SCHEMA_VERSION,
    AuditEvent,
    HookDelivery,
    Meta,
    Schedule,
    ScheduleSlot,
    Task,
    TaskEvent,
    _Base,
)
from remoterun.wire import rfc3339


@functools.cache
def _defaults(model: type[_Base]) -> tuple[tuple[str, Any], ...]:
    return tuple((f.column_name, f.default) for f in model._meta.sorted_fields
                 if f.default is not None)


def insert(table: type[_Base], values: dict[str, Any]) -> Statement:
    """An INSERT of one row, the model's defaults filled in."""
    values = {**dict(_defaults(table)), **values}
    return Statement(("insert", table._meta.table_name, tuple(values)), tuple(values.values()))


def update(table: str, values: dict[str, Any], where: dict[str, Any]) -> Statement:
    """An UPDATE of the columns in `values` of the rows whose columns equal `where`'s."""
    terms = tuple((column, "=") for column in where)
    return Statement(("update", table, tuple(values), terms),
                     (*values.values(), *where.values()))


def insert_task(row: dict[str, Any]) -> list[Statement]:
    """Statements that create a task and its first event."""
    return [insert(Task, row),
            insert(TaskEvent, {"task_id": row["id"], "ts": row["created_at"],
                               "old_status": None, "new_status": row["status"],
                               "attempt": row["attempt"]})]


def transition(task_id: str, old: Any, new: Any, attempt: int, fields: dict[str, Any],
               detail: str | None = None) -> list[Statement]:
    """Statements that move a task to a new status and record the event; the update is
    guarded by the old status, so a final state is never overwritten."""
    now = fields.setdefault("updated_at", time.time())
    moved = update("tasks", {"status": str(new), **fields}, {"id": task_id, "status": str(old)})
    return [Guarded(moved.shape, moved.params),
            insert(TaskEvent, {"task_id": task_id, "ts": now, "old_status": str(old),
                               "new_status": str(new), "attempt": attempt, "detail": detail,
                               "exit_code": fields.get("exit_code")})]


def update_task(task_id: str, fields: dict[str, Any]) -> Statement:
    """A statement that changes task fields without a transition (progress counters)."""
    return update("tasks", fields, {"id": task_id})


SEGMENT_COLUMNS = ("task_id", "created_at", "path", "first_seq", "last_seq", "raw_bytes",
                   "gz_bytes", "closed_at", "pruned")
SEGMENT_PROGRESS = ("last_seq", "raw_bytes", "gz_bytes", "closed_at")


def upsert_segment(task_id: str, seg: Any) -> Statement:
    """A statement that records an archive segment (an archive.Segment) by its path."""
    return Statement(("upsert", "task_logs", SEGMENT_COLUMNS, "path", SEGMENT_PROGRESS),
                     (task_id, seg.opened_at, seg.path, seg.first_seq, seg.last_seq,
                      seg.raw_bytes, seg.gz_bytes, seg.closed_at, False))


def delete_segment(path: str) -> Statement:
    """A statement that forgets a segment's row (an empty segment `archive verify` removed)."""
    return Statement(("delete", "task_logs", (("path", "="),)), (path,))


def mark_pruned(task_id: str) -> Statement:
    """A statement that records a task's archived output as deleted by retention."""
    return update("task_logs", {"pruned": True}, {"task_id": task_id})


AUDIT_COLUMNS = ("actor", "role", "address", "action", "task_id", "script", "result", "detail")


def insert_audit(entry: dict[str, Any], **fields: Any) -> Statement:
    """A statement that records one audit event (`fields` fill in what the action made, such
    as the new task's id)."""
    values = {key: entry.get(key) for key in AUDIT_COLUMNS}
    values.update(fields)
    values["ts"] = entry.get("ts") or time.time()
    return insert(AuditEvent, values)


def audit_json(row: Row) -> dict[str, Any]:
    """An audit row as `GET /audit` shows it."""
    return {"ts": rfc3339(row["ts"]), **{key: row[key] for key in AUDIT_COLUMNS}}


def insert_delivery(hook: str, delivery_id: str | None, result: str,
                    task_id: str | None = None, reason: str | None = None) -> Statement:
    """A statement that records a hook's answered delivery; a second with the same hook and
    delivery id fails the transaction it is in (the unique index)."""
    return insert(HookDelivery, {"hook": hook, "delivery_id": delivery_id, "ts": time.time(),
                                 "result": result, "task_id": task_id, "reason": reason})


VERSION_QUERY = Meta.select(Meta.value).where(Meta.key == "schema_version")


def version_row() -> Statement:
    """A statement that records this server's schema version."""
    return Statement(("upsert", "meta", ("key", "value"), "key", ("value",)),
                     ("schema_version", str(SCHEMA_VERSION)))


# Schedules (issue 29) --------------------------------------------------------------------------

def record_slot(schedule: str, slot: float, outcome: str, task_id: str | None = None,
                reason: str | None = None) -> Statement:
    """A guarded insert of a slot's record: it fails (and its transaction with it) when the
    slot was recorded already, by this server earlier or by another node."""
    values = {"schedule": schedule, "slot": slot, "outcome": outcome, "task_id": task_id,
              "reason": reason, "recorded_at": time.time()}
    return Guarded(("insert_once", ScheduleSlot._meta.table_name, tuple(values)),
                   tuple(values.values()))


def settle_slot(schedule: str, slot: float, was: str, outcome: str, task_id: str | None,
                reason: str | None = None) -> Statement:
    """A guarded change of a slot recorded `was` and no task yet (a queued slot that starts,
    or fails to): it changes nothing, and fails, once the slot has its task."""
    return Guarded(("update", "schedule_slots", ("outcome", "task_id", "reason"), (
        ("schedule", "="), ("slot", "="), ("outcome", "="), ("task_id", "null"))),
        (outcome, task_id, reason, schedule, slot, was))


def save_schedule(values: dict[str, Any]) -> Statement:
    """An insert of a schedule's row, guarded: it fails if the name is taken."""
    return Guarded(("insert_once", Schedule._meta.table_name, tuple(values)),
                   tuple(values.values()))


def change_schedule(name: str, values: dict[str, Any]) -> Statement:
    """A guarded change of an existing schedule's row."""
    moved = update("schedules", values, {"name": name})
    return Guarded(moved.shape, moved.params)


def delete_schedule(name: str) -> Statement:
    """A guarded removal of a schedule's row (its slot records stay)."""
    return Guarded(("delete", "schedules", (("name", "="),)), (name,))
