"""Cluster mode (issue 16): trivial tasks/s and stream MB/s on one and three nodes beside SQLite
mode in the same run, and the live latency from a task on one node to a client on another.

PostgreSQL and Redis are the tests' own (tests/engines.py: Debian's packages, started on
loopback in a temporary folder); every node shares one archive folder.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp

from bench import client
from bench.b_stream import MB, remoterun_stream
from bench.b_tasks import remoterun_trivial
from bench.lib import REPO, Context, Row, interleave, median, percentile
from bench.server import CpuMeter, Server

sys.path.insert(0, str(REPO / "tests"))
from engines import PostgresServer, RedisServer  # noqa: E402 - the tests' engine fixtures


def _cluster_config(database_url: str, redis_url: str, node: str) -> str:
    return (f'[cluster]\ndatabase_url = "{database_url}"\nredis_url = "{redis_url}"\n'
            f'node = "{node}"\nnode_timeout_s = 10\n')


async def _nodes(ctx: Context, tag: str, count: int, database_url: str, redis_url: str
                 ) -> list[Server]:
    shared = ctx.work / f"{tag}-archive"
    shared.mkdir(parents=True, exist_ok=True)
    nodes = []
    for i in range(1, count + 1):
        server = Server(ctx, f"{tag}-n{i}", workers=8,
                        extra_config=_cluster_config(database_url, redis_url, f"n{i}"))
        (server.folder / "archive").symlink_to(shared)
        nodes.append(server)
    await asyncio.gather(*(n.start(timeout_s=120) for n in nodes))
    return nodes


async def _spread_trivial(http: aiohttp.ClientSession, urls: list[str], n: int) -> float:
    """Trivial tasks split over the nodes (each submitted to and followed on one); tasks/s."""
    began = time.perf_counter()
    share = [n // len(urls) + (i < n % len(urls)) for i in range(len(urls))]
    await asyncio.gather(*(remoterun_trivial(http, url, k) for url, k in zip(urls, share,
                                                                            strict=True)))
    return n / (time.perf_counter() - began)


async def _cross_latency(http: aiohttp.ClientSession, owner: str, watcher: str, lines: int,
                         p50s: list[float]) -> float:
    """p99 ms from tick.py's print on node n1 to a client of node n2."""
    task_id = await client.submit(http, watcher, "tick.py",
                                  {"LINES": lines, "PERIOD": 0.02, "DELAY": 0.5}, node="n1")
    async with asyncio.timeout(60 + lines * 0.1):
        seen = await client.follow(http, watcher, task_id, client.latency_frame)
    if len(seen.latencies) != lines:
        raise RuntimeError(f"cross-node latency: got {len(seen.latencies)} of {lines} lines")
    p50s.append(percentile(seen.latencies, 50) * 1000)
    del owner
    return percentile(seen.latencies, 99) * 1000


async def cluster(ctx: Context) -> list[Row]:
    """SQLite vs cluster (1 node, 3 nodes): trivial tasks, one stream; cross-node latency."""
    n = ctx.size(600, 150)
    times = ctx.size(8, 1)
    expected = ctx.log_bytes * times
    lines = ctx.size(200, 60)
    pg, rd = PostgresServer(), RedisServer()
    await asyncio.to_thread(pg.start)
    await asyncio.to_thread(rd.start)
    servers: list[Server] = []
    try:
        single = Server(ctx, "cluster-sqlite", workers=8)
        await single.start(timeout_s=120)
        servers.append(single)
        one = await _nodes(ctx, "cluster-1", 1, await asyncio.to_thread(pg.new_database),
                           rd.url)
        three = await _nodes(ctx, "cluster-3", 3, await asyncio.to_thread(pg.new_database),
                             rd.url)
        servers += one + three
        p50s: list[float] = []
        async with client.session() as http:
            for urls in ([single.url], [one[0].url], [t.url for t in three]):
                await _spread_trivial(http, urls, 30)  # warm-up
            cpu = CpuMeter(one[0])

            async def one_node() -> float:
                with cpu:
                    return await _spread_trivial(http, [one[0].url], n)

            sq, c1, c3 = await interleave(
                ctx.runs, lambda: _spread_trivial(http, [single.url], n), one_node,
                lambda: _spread_trivial(http, [t.url for t in three], n))
            s_sq, s_c1, s_c3 = await interleave(
                ctx.runs,
                lambda: _first(remoterun_stream(http, single.url, ctx.log_file, expected, times)),
                lambda: _first(remoterun_stream(http, one[0].url, ctx.log_file, expected, times)),
                lambda: _first(remoterun_stream(http, three[1].url, ctx.log_file, expected,
                                                times)))
            (lat,) = await interleave(ctx.runs, lambda: _cross_latency(
                http, three[0].url, three[1].url, lines, p50s))
    finally:
        for server in servers:
            await server.stop()
        await asyncio.to_thread(pg.close)
        await asyncio.to_thread(rd.close)
    note = f"{n} tasks, 8 concurrent clients per node set; all engines on this machine"
    return [
        Row("cluster trivial tasks, 1 node", "tasks/s", median(c1), median(sq), "SQLite mode",
            "-", runs=c1, baseline_runs=sq, notes=f"{note}; {cpu.describe(n * ctx.runs, 'task')}"),
        Row("cluster trivial tasks, 3 nodes", "tasks/s", median(c3), median(sq), "SQLite mode",
            "-", runs=c3, baseline_runs=sq, notes="clients spread over the three nodes"),
        Row("cluster stream to one WS client, 1 node", "MB/s", median(s_c1), median(s_sq),
            "SQLite mode", "-", runs=s_c1, baseline_runs=s_sq,
            notes=f"{expected / MB:.0f} MB per run, through the task's Redis stream"),
        Row("cluster stream, 3 nodes (client on n2)", "MB/s", median(s_c3), median(s_sq),
            "SQLite mode", "-", runs=s_c3, baseline_runs=s_sq,
            notes="the task runs on whichever node claims it"),
        Row("cluster live latency n1 -> client on n2", "ms p99", median(lat), None, "", "-",
            higher_is_better=False, runs=lat,
            notes=f"{lines} lines 20 ms apart; p50 {median(p50s):.1f} ms"),
    ]


async def _first(measure: object) -> float:
    rate, _ = await measure  # type: ignore[misc]
    return float(rate)
