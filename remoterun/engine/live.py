"""One live task as the engine holds it: where it is, its row, its hub and its attempt."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from remoterun.engine.attempt import Attempt
from remoterun.engine.hub import TaskHub


class Where(StrEnum):
    """Where a live task is."""

    QUEUED = "queued"  # pending, in the queue
    STARTING = "starting"  # taken from the queue, its running transition being committed
    RUNNING = "running"  # its attempt holds a worker slot
    FINISHING = "finishing"  # its process ended, its next state being committed


@dataclass(eq=False)
class TaskState:
    """Everything the engine knows of one live task."""

    row: dict[str, Any]
    where: Where = Where.QUEUED
    hub: TaskHub | None = None
    attempt: Attempt | None = None
    flush_due: float = 0.0  # time.monotonic() of its archive's next flush
    recorded: dict[str, Any] = field(default_factory=dict)  # progress the last flush wrote
    reserving: bool = False  # a seq reservation is being committed
    next_segment: int | None = 1  # the number its next archive segment takes (None: unknown)
