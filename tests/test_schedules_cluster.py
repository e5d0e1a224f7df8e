"""Schedules on real processes (issue 29): a server SIGKILLed for a few slots records them and
runs only the newest; three cluster nodes on real PostgreSQL run every slot once while one
node is SIGKILLed and started again."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest
from cluster_nodes import get_json, make_nodes, start_all
from conftest import wait_for

TICK = '\n[[schedules]]\nname = "tick"\nscript = "hello.sh"\nevery = "1s"\n'


def seconds(text):
    """Unix seconds of an RFC 3339 time."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def slot_rows(http, url, name="tick"):
    """Every slot record of a schedule, oldest first."""
    body = await get_json(http, f"{url}/schedules/{name}/runs?limit=500")
    return body["runs"][::-1]


async def test_sigkill_for_five_seconds_runs_only_the_newest_missed_slot(server, http):
    """SIGKILL, 5 s down, start again: with catch_up = latest the newest slot of the downtime
    runs, the older ones are recorded missed, and the slots go on one a second."""
    server.config.write_text(server.config.read_text() + TICK + 'catch_up = "latest"\n')
    server.start()
    await wait_for(lambda: _started(http, server.url), timeout=20, what="a started slot")
    server.kill()
    killed = time.time()
    await wait_for(lambda: time.time() > killed + 5, timeout=10, what="five seconds")
    server.start()
    target = time.time() + 2
    rows = await wait_for(lambda: _beyond(http, server.url, target), timeout=20,
                          what="slots after the restart")
    after = [r for r in rows if seconds(r["slot"]) > killed]
    slots = [seconds(r["slot"]) for r in after]
    assert all(b - a == 1 for a, b in zip(slots, slots[1:], strict=False)), after  # none left out
    missed = [r for r in after if r["outcome"] == "missed"]
    assert len(missed) >= 3, after
    newest_missed = seconds(missed[-1]["slot"])
    caught = next(r for r in after if seconds(r["slot"]) == newest_missed + 1)
    assert caught["outcome"] == "started" and caught["task_id"], after
    assert all(r["outcome"] == "started" for r in after if seconds(r["slot"]) > newest_missed)


async def _started(http, url):
    return any(r["outcome"] == "started" for r in await slot_rows(http, url))


async def _beyond(http, url, instant):
    rows = await slot_rows(http, url)
    return rows if rows and seconds(rows[-1]["slot"]) >= instant else None


@pytest.mark.timeout(240)
async def test_three_nodes_run_each_slot_once_while_one_is_killed(tmp_path, engines, http):
    """Three nodes with the same 1-second schedule (overlap = allow) on one PostgreSQL: every
    slot is recorded once with one task, none is lost, while n2 is SIGKILLed and restarted."""
    nodes = make_nodes(tmp_path, engines, 3, extra=TICK + 'overlap = "allow"\n')
    await start_all(nodes)
    try:
        n1, n2, _ = nodes
        await wait_for(lambda: _count(http, n1.url, 3), timeout=30, what="three slots")
        n2.kill()
        await wait_for(lambda: _count(http, n1.url, 7), timeout=30, what="slots without n2")
        await asyncio.to_thread(n2.start)
        await wait_for(lambda: _count(http, n1.url, 14), timeout=60, what="slots with n2 back")
        status = await http.post(f"{n1.url}/schedules/tick/pause")
        assert status.status == 200
        rows = await slot_rows(http, n1.url)
        tasks = (await get_json(http, f"{n1.url}/tasks?limit=500"))["tasks"]
    finally:
        for node in nodes:
            node.stop()
    slots = [seconds(r["slot"]) for r in rows]
    assert slots == sorted(set(slots)) and slots[-1] - slots[0] == len(slots) - 1, rows
    started = [r for r in rows if r["outcome"] == "started"]
    assert len(started) >= len(rows) - 2, rows  # a loaded machine may run one late slot missed
    by_slot = [t["scheduled_for"] for t in tasks if t["schedule"] == "tick"]
    assert len(by_slot) == len(set(by_slot)) == len(started)
    assert {r["task_id"] for r in started} == {t["id"] for t in tasks if t["schedule"]}
    owners = {t["node"] for t in tasks if t["schedule"] and t["node"]}
    assert owners, tasks


async def _count(http, url, count):
    rows = await slot_rows(http, url)
    return len(rows) >= count
