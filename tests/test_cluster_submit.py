"""Cluster-mode submissions in one process (the real app on real PostgreSQL and Redis): each
submission's number is its own, whatever the others do meanwhile."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
import pytest
from conftest import make_settings, wait_for

from remoterun.config import Cluster

pytestmark = pytest.mark.slow
SUBMISSIONS = 16


async def test_concurrent_checked_submissions_each_keep_their_number(make_client, tmp_path,
                                                                     engines):
    """Submissions that await the script's integrity check side by side each get the number
    the cluster's sequence gave them: all answered 201, numbers distinct, none skipped, and a
    later submission's number is not one an earlier task already took (issue 24: the number
    was set on the scheduler before that await, so another submission could take it)."""
    _, redis_server, url = engines
    digest = hashlib.sha256((make_settings(tmp_path).scripts_dir / "hello.sh").read_bytes())
    client = await make_client(
        cluster=Cluster(database_url=url, redis_url=redis_server.url, node="n1"),
        scripts={"hello.sh": {"sha256": digest.hexdigest()}})

    async def submit() -> tuple[int, dict]:
        response = await client.post("/tasks", json={"script": "hello.sh"})
        return response.status, await response.json()

    answers = await asyncio.gather(*(submit() for _ in range(SUBMISSIONS)))
    answers += [await submit() for _ in range(4)]  # after them, one at a time
    assert [status for status, _ in answers] == [201] * len(answers), answers
    conn = await asyncpg.connect(url)
    try:
        nums = {r["id"]: r["num"] for r in await conn.fetch("SELECT id, num FROM tasks")}
    finally:
        await conn.close()
    assert set(nums) == {body["id"] for _, body in answers}
    assert sorted(nums.values()) == list(range(1, len(answers) + 1))

    async def all_ended() -> bool:
        response = await client.get("/tasks?limit=100")
        tasks = (await response.json())["tasks"]
        return len(tasks) == len(answers) and all(t["status"] == "success" for t in tasks)
    await wait_for(all_ended, 30, interval=0.1, what="every task to succeed")
