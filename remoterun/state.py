"""Task states, the one table of transitions between them, and the task's stored fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from remoterun.wire import task_json


class TaskStatus(StrEnum):
    """Where a task is in its life; see PROTOCOL.md's state machine."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


FINAL = frozenset(
    {TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.TIMEOUT, TaskStatus.CANCELLED}
)

TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
    # running -> pending only when a retry is scheduled.
    TaskStatus.RUNNING: frozenset(FINAL | {TaskStatus.PENDING}),
    **{status: frozenset() for status in FINAL},
}


class InvalidTransition(Exception):
    """A transition the table does not allow was attempted: a bug, never user input."""

    def __init__(self, old: TaskStatus, new: TaskStatus):
        super().__init__(f"{old} -> {new} is not a valid transition")
        self.old = old
        self.new = new


def check_transition(old: TaskStatus, new: TaskStatus) -> None:
    """Raise InvalidTransition unless `old -> new` is in the table."""
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(old, new)


@dataclass(frozen=True, slots=True)
class Task:
    """A task's stored fields as one value: the engine replaces it (`evolve`), never changes
    it, so whoever was handed one holds what was true then."""

    num: int
    id: str
    script: str
    status: TaskStatus
    params: str  # JSON, secrets shown as "***"
    secret_params: str  # sealed (vault.py), or NONE
    priority: int
    timeout: float | None
    max_retries: int
    attempt: int
    pty: bool
    interactive: bool
    stdin: str
    created_at: float
    updated_at: float
    submitted_by: str
    logs_path: str
    exit_code: int | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    run_after: float | None = None
    output_bytes: int = 0  # as last recorded; a running attempt counts on (Attempt.progress)
    last_seq: int = 0
    pid: int | None = None
    seq_reserved: int = 0
    schedule: str | None = None  # the schedule that submitted it (issue 29)
    scheduled_for: float | None = None  # its slot; None for a schedule's "run now"
    # A cluster's store keeps which node claimed the task; one server's keeps no owner at all,
    # which the wire shows differently (wire.task_json's `node`).
    owner: str | None = None
    clustered: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Task:
        """The task of a row as the store reads it (columns it does not hold are ignored)."""
        values = {name: row[name] for name in _COLUMNS if name in row}
        values["status"] = TaskStatus(row["status"])
        return cls(**values, clustered="owner" in row)

    def evolve(self, **changes: Any) -> Task:
        """This task with `changes` (field names checked: an unknown one is a TypeError)."""
        return dataclasses.replace(self, **changes)

    def to_row(self) -> dict[str, Any]:
        """The task as a row: a new dict, the caller's to keep (`owner` only if clustered)."""
        row = {name: getattr(self, name) for name in _COLUMNS}
        row["status"] = str(self.status)
        if not self.clustered:
            del row["owner"]
        return row

    def to_json(self) -> dict[str, Any]:
        """The task as REST and WebSocket show it."""
        return task_json(self.to_row())


_COLUMNS = tuple(f.name for f in dataclasses.fields(Task) if f.name != "clustered")
