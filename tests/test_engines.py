"""The cluster tests' engines: real PostgreSQL and Redis on loopback, restartable."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, NoPermissionError
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
    await client.set("rr:k", "v")
    assert await client.get("rr:k") == b"v"
    await asyncio.to_thread(rd.restart)
    assert await client.get("rr:k") is None  # the client reconnects on its retry
    await client.aclose()


async def test_the_engines_want_credentials(engines):
    """As deployed: PostgreSQL refuses a login without its password, Redis every command
    without its user's, and the nodes' user only reaches RemoteRun's keys."""
    pg, rd, _ = engines
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres")
    anonymous = aioredis.from_url(f"redis://127.0.0.1:{rd.port}/0")
    with pytest.raises(AuthenticationError):
        await anonymous.xrange("rr:out:x")
    await anonymous.aclose()
    client = aioredis.from_url(rd.url)
    with pytest.raises(NoPermissionError):
        await client.get("other")
    with pytest.raises(NoPermissionError):
        await client.flushall()
    await client.aclose()
