"""The /events fan-out: order, bounded queues, dropped followers, shutdown."""

from __future__ import annotations

import pytest

from remoterun.engine.feed import Dropped, TaskFeed


def row(task_id: str, status: str) -> dict[str, object]:
    """A minimal task row as the store returns it."""
    return {"id": task_id, "script": "hello.sh", "params": "{}", "status": status,
            "priority": 0, "timeout": None, "max_retries": 0, "attempt": 1, "pty": 0,
            "interactive": 0, "exit_code": None, "error": None, "created_at": 1.0,
            "updated_at": 2.0, "started_at": None, "finished_at": None, "run_after": None,
            "submitted_by": "t", "logs_path": "x", "output_bytes": 0, "last_seq": 0}


async def test_followers_get_every_change_in_order():
    """Two followers each get the committed changes in publish order, with their ids."""
    feed = TaskFeed()
    a, b = feed.follow(), feed.follow()
    for n, status in enumerate(("pending", "running", "success"), start=1):
        feed.publish(n, row("t1", status), None)
    for follower in (a, b):
        batch = await follower.take()
        assert [c.event_id for c in batch] == [1, 2, 3]
        assert [c.event["new_status"] for c in batch] == ["pending", "running", "success"]


async def test_a_follower_that_falls_behind_is_dropped_and_cut():
    """Past its bound a follower is dropped (its on_drop cuts the stream); others go on."""
    feed = TaskFeed(queue_events=2)
    slow, fast = feed.follow(), feed.follow()
    cut: list[bool] = []
    slow.on_drop = lambda: cut.append(True)
    feed.publish(1, row("t", "pending"), None)
    assert [c.event_id for c in await fast.take()] == [1]
    feed.publish(2, row("t", "running"), "pending")
    feed.publish(3, row("t", "success"), "running")
    assert cut == [True] and feed.followers == 1
    with pytest.raises(Dropped):
        await slow.take()
    assert [c.event_id for c in await fast.take()] == [2, 3]


async def test_close_ends_every_follower_and_later_ones():
    """After close, take() returns [] at once, for existing and new followers alike."""
    feed = TaskFeed()
    before = feed.follow()
    feed.close()
    assert await before.take() == []
    assert await feed.follow().take() == []


def test_publishing_unfollowed_or_uncommitted_costs_nothing():
    """No follower, or no event id (nothing committed): nothing is built or queued."""
    feed = TaskFeed()
    feed.publish(1, {"not": "a row"}, None)  # would fail in task_json if it were read
    follower = feed.follow()
    feed.publish(None, {"not": "a row"}, None)
    assert not follower.queue
