"""Read-your-writes under concurrent readers: a task answered 201 is there for every reader."""

from __future__ import annotations

import asyncio

from conftest import submit, wait_final


async def test_get_after_post_sees_the_task_under_concurrent_lists(make_client):
    """With 16 workers and four clients listing 200 tasks in a loop, every GET right after
    a 201 finds the task, and no task that succeeded is recorded failed by the reaper."""
    client = await make_client(workers=16, reaper_interval_s=0.05)
    stop = asyncio.Event()

    async def lister() -> None:
        while not stop.is_set():
            response = await client.get("/tasks?limit=200")
            assert response.status == 200
            await response.read()

    listers = [asyncio.create_task(lister()) for _ in range(4)]
    missing = 0
    ids = []
    try:
        for _ in range(160):
            task = await submit(client, "hello.sh")
            ids.append(task["id"])
            response = await client.get(f"/tasks/{task['id']}")
            if response.status == 404:
                missing += 1
            await response.read()
    finally:
        stop.set()
        await asyncio.gather(*listers)
    assert missing == 0
    for task_id in ids:
        task = await wait_final(client, task_id)
        assert task["status"] == "success", task
        response = await client.get(f"/tasks/{task_id}/events")
