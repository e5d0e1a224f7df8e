"""A big queue: 100,000 pending tasks in the database; list latency and restart-to-ready time."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench import client
from bench.lib import Context, Row, median, percentile, progress
from bench.server import Server
from remoterun.archive import logs_path_for

QUERIES = 200


def _fill(conn: sqlite3.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    """Insert rows, giving every other NOT NULL column without a default a zero value."""
    columns = conn.execute(f"PRAGMA table_info({table})").fetchall()
    names = [c[1] for c in columns if c[1] in rows[0] or (c[3] and c[4] is None and not c[5])]
    zero = {c[1]: ("" if "CHAR" in c[2].upper() or "TEXT" in c[2].upper() else 0)
            for c in columns}
    sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    conn.executemany(sql, ([row.get(n, zero[n]) for n in names] for row in rows))


def insert_pending(db: Path, count: int) -> None:
    """Bulk-insert `count` pending tasks of sleep.sh (and their first event) with sqlite3."""
    now = time.time() - count * 0.001
    tasks, events = [], []
    for i in range(count):
        task_id = str(uuid.uuid4())
        created = now + i * 0.001
        tasks.append({"id": task_id, "script": "sleep.sh", "params": "{}",
                      "secret_params": "{}", "status": "pending", "priority": 0,
                      "timeout": None, "max_retries": 0, "attempt": 1, "pty": 0,
                      "interactive": 0, "stdin": "", "created_at": created,
                      "updated_at": created, "submitted_by": "bench",
                      "logs_path": logs_path_for(task_id, created), "output_bytes": 0,
                      "last_seq": 0})
        events.append({"task_id": task_id, "ts": created, "old_status": None,
                       "new_status": "pending", "attempt": 1})
    with sqlite3.connect(db) as conn:
        _fill(conn, "tasks", tasks)
        _fill(conn, "task_events", events)


async def _p99_ms(http: aiohttp.ClientSession, url: str, n: int = QUERIES) -> float:
    """p99 of n sequential GETs of url, in milliseconds; checks each answers 200."""
    times = []
    for _ in range(n):
        began = time.perf_counter()
        async with http.get(url) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {url}: {resp.status}")
        times.append(time.perf_counter() - began)
    return percentile(times, 99) * 1000


async def pending(ctx: Context) -> list[Row]:
    """List p99 and restart-to-ready with N pending tasks, vs /healthz p99 and an empty db."""
    count = ctx.size(100_000, 10_000)
    empty = Server(ctx, "pending-empty", workers=1)
    server = Server(ctx, "pending", workers=1)
    await server.start()  # creates the schema
    await server.stop()
    began = time.perf_counter()
    await asyncio.to_thread(insert_pending, server.db, count)
    progress(f"{count} pending rows inserted in {time.perf_counter() - began:.1f} s")
    ready, ready_empty, lists, pendings, floors, rss = [], [], [], [], [], []
    for _ in range(ctx.runs):
        ready.append(await server.start(timeout_s=120))
        ready_empty.append(await empty.start())
        await empty.stop()
        try:
            async with client.session() as http:
                async with http.get(server.url + "/tasks?status=pending&limit=500") as resp:
                    got = len((await resp.json())["tasks"])
                if got < 500:
                    raise RuntimeError(f"only {got} pending tasks listed")
                lists.append(await _p99_ms(http, server.url + "/tasks?limit=50"))
                pendings.append(await _p99_ms(http, server.url + "/tasks?status=pending&limit=50"))
                floors.append(await _p99_ms(http, server.url + "/healthz"))
            rss.append((server.rss_kb() or 0) / 1024)
        finally:
            await server.stop()
    note = f"{count:,} pending tasks; {QUERIES} sequential GETs; server RSS {median(rss):.0f} MB"
    rows = [
        Row("list p99, GET /tasks?limit=50", "ms", median(lists), median(floors),
            "GET /healthz p99", "< 50 ms", higher_is_better=False, runs=lists,
            baseline_runs=floors, notes=note),
        Row("list p99, ?status=pending&limit=50", "ms", median(pendings), median(floors),
            "GET /healthz p99", "< 50 ms", higher_is_better=False, runs=pendings,
            baseline_runs=floors, notes=note),
        Row(f"restart to ready, {count:,} pending", "s", median(ready), median(ready_empty),
            "empty db", "< 3 s", higher_is_better=False, runs=ready, baseline_runs=ready_empty,
            notes="process start until /healthz answers 200"),
    ]
    for row in rows:
        limit = 3.0 if row.unit == "s" else 50.0
        row.met = row.value is not None and row.value < limit
    json.dumps([r.to_json() for r in rows])  # fail here, not at the end, on a bad figure
    return rows
