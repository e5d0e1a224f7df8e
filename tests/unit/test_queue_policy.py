"""The queue policy and the local queue, pure: aged priority, FIFO ties, limits, retry delays."""

from __future__ import annotations

from typing import Any

from remoterun.engine.queue import LocalQueue, QueuePolicy


def _row(num: int, priority: int = 0, created: float = 0.0, script: str = "a.sh",
         run_after: float | None = None) -> dict[str, Any]:
    return {"id": f"t{num}", "num": num, "priority": priority, "created_at": created,
            "script": script, "run_after": run_after}


def _queue(aging_s: float = 60.0, limits: dict[str, int] | None = None) -> LocalQueue:
    policy = QueuePolicy(aging_s, (limits or {}).get)
    return LocalQueue(policy, db=None, max_pending=100)  # type: ignore[arg-type]


async def _ids(queue: LocalQueue, slots: int, now: float = 1e9) -> list[str]:
    rows, _ = await queue.take(slots, now)
    return [row["id"] for row in rows]


def test_a_higher_priority_goes_first_and_ties_keep_submission_order():
    """Priority orders the queue; equal keys run in submission order."""
    policy = QueuePolicy(0, lambda script: None)
    rows = [_row(1), _row(2, priority=5), _row(3)]
    assert [r["num"] for r in sorted(rows, key=policy.key)] == [2, 1, 3]


def test_waiting_ages_a_task_one_level_per_aging_interval():
    """A task submitted two intervals earlier beats one of priority +1 submitted now, and
    loses to one of priority +3."""
    policy = QueuePolicy(60.0, lambda script: None)
    old = _row(1, priority=0, created=0.0)
    assert policy.key(old) < policy.key(_row(2, priority=1, created=120.0))
    assert policy.key(old) > policy.key(_row(3, priority=3, created=120.0))


def test_limits_and_retry_delays_are_pure_predicates():
    """has_room counts against the limit (None: unlimited); due_in is the wait left."""
    assert QueuePolicy.has_room(None, 99) and QueuePolicy.has_room(2, 1)
    assert not QueuePolicy.has_room(2, 2)
    assert QueuePolicy.due_in(_row(1, run_after=105.0), 100.0) == 5.0
    assert QueuePolicy.due_in(_row(1, run_after=95.0), 100.0) == 0.0
    assert QueuePolicy.due_in(_row(1), 100.0) == 0.0


async def test_take_passes_over_a_limited_script_without_blocking_others():
    """A script at its max_concurrency waits; the tasks behind it start; it starts once a
    slot of its script is given back."""
    queue = _queue(limits={"one.sh": 1})
    for row in (_row(1, script="one.sh"), _row(2, script="one.sh"), _row(3)):
        queue.put(row)
    assert await _ids(queue, 3) == ["t1", "t3"]
    assert await _ids(queue, 3) == []
    queue.ended("one.sh")
    assert await _ids(queue, 3) == ["t2"]


async def test_a_deferred_retry_waits_and_says_when_it_is_due():
    """A retry whose run_after is ahead is skipped; take reports the seconds until it is due."""
    queue = _queue()
    queue.put(_row(1, run_after=110.0))
    queue.put(_row(2))
    rows, next_due = await queue.take(5, now=100.0)
    assert [r["id"] for r in rows] == ["t2"] and next_due == 10.0
    assert await _ids(queue, 5, now=111.0) == ["t1"]


async def test_removed_tasks_are_skipped_and_positions_follow_the_order():
    """A cancelled task is never taken; positions are 1-based in dispatch order."""
    queue = _queue(aging_s=0)
    for row in (_row(1), _row(2, priority=1), _row(3)):
        queue.put(row)
    assert await queue.positions(["t1", "t2", "t3"]) == {"t2": 1, "t1": 2, "t3": 3}
    assert await queue.positions(["t3"]) == {"t3": 3}
    assert queue.remove("t1") is not None
    assert await _ids(queue, 5) == ["t2", "t3"]


async def test_numbers_are_taken_in_turn():
    """Each number is handed out once."""
    queue = _queue()
    assert [await queue.number() for _ in range(3)] == [1, 2, 3]
