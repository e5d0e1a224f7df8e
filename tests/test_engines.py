"""The cluster tests' engines: real PostgreSQL and Redis on loopback, restartable."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

pytestmark = pytest.mark.slow


async def test_postgres_keeps_its_data_across_a_restart(engines):
    """A row committed before a restart is there after it, on the same port."""
    pg, _, url = engines
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE t (v int)")
    await conn.execute("INSERT INTO t VALUES (7)")
    await conn.close()
    await asyncio.to_thread(pg.restart)
    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT v FROM t") == 7
    await conn.close()


async def test_redis_comes_back_empty_after_a_restart(engines):
    """redis-server runs without persistence: a restart forgets every key."""
    _, rd, _ = engines
    client = aioredis.from_url(rd.url, retry=Retry(ExponentialBackoff(), 3),
                               retry_on_error=[RedisConnectionError])
    await client.set("k", "v")
    assert await client.get("k") == b"v"
    await asyncio.to_thread(rd.restart)
    assert await client.get("k") is None  # the client reconnects on its retry
    await client.aclose()
