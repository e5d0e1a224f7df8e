"""Task states and the one table of transitions between them."""

from __future__ import annotations

from enum import StrEnum


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
