"""A frozen node fences itself: its tasks' scripts never run on two nodes at once (issue 25)."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cluster_nodes import Node, get_json, kill_task_leftovers, make_nodes, start_all
from conftest import wait_for

pytestmark = pytest.mark.slow
FINAL = ("success", "failed", "timeout", "cancelled")
RUN_S = 6.0  # each script's length: the frozen node's runs outlast its timeout, uncut

# Each node's copy names that node. Lines: start, a tick every 0.1 s, end; a run killed by
# SIGKILL has no end line, and its last tick bounds when it stopped.
STAMP = """#!/bin/sh
# Leaves start, tick and end lines (node, task, attempt, time) in a shared execution log.
mark() {{ echo "$1 {node} $RR_TASK_ID $RR_ATTEMPT $(date +%s.%N)" >> "$RR_PARAM_OUT"; }}
mark start
i=0
while [ $i -lt {ticks} ]; do sleep 0.1; mark tick; i=$((i + 1)); done
mark end
"""


def _add_stamp(nodes: list[Node]) -> None:
    for node in nodes:
        path = node.tmp_path / "scripts" / "stamp.sh"
        path.write_text(STAMP.format(node=node.name, ticks=int(RUN_S * 10)))
        path.chmod(0o755)


def _runs(log: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(task, node, attempt) -> {"from", "to", "ended"} read from the execution log."""
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for line in log.read_text().splitlines():
        kind, node, task, attempt, at = line.split()
        run = runs.setdefault((task, node, int(attempt)),
                              {"from": float(at), "to": float(at), "ended": False})
        run["to"] = max(run["to"], float(at))
        run["ended"] = run["ended"] or kind == "end"
    return runs


async def _task(http: aiohttp.ClientSession, node: Node, task_id: str) -> dict[str, Any]:
    return await get_json(http, f"{node.url}/tasks/{task_id}")  # type: ignore[no-any-return]


@pytest.mark.timeout(180)
async def test_a_frozen_node_fences_itself_so_no_script_runs_twice_at_once(tmp_path, engines,
                                                                           http):
    """A node frozen (SIGSTOP) past node_timeout_s while it runs tasks: its watchdog kills
    their scripts before the other node may take them over, so no task's script runs on two
    nodes at overlapping times, and each runs to its end once; the woken node answers
    POST /tasks with 503 and Retry-After, not 500, then joins again."""
    nodes = make_nodes(tmp_path, engines, 2, node_timeout_s=3.0)
    _add_stamp(nodes)
    log = tmp_path / "executions.log"
    log.touch()
    await start_all(nodes)
    ids: list[str] = []
    try:
        for i in range(4):
            status, body = await _post(http, nodes[i % 2], "/tasks", {
                "script": "stamp.sh", "max_retries": 1, "params": {"out": str(log)}})
            assert status == 201, body
            ids.append(body["id"])
        started = await wait_for(lambda: _started(log, ids), 30, 0.05, "all four to start")
        frozen = next(n for n in nodes if n.name == started.most_common(1)[0][0])
        survivor = next(n for n in nodes if n is not frozen)
        frozen.pause()
        for task_id in ids:
            body = await wait_for(lambda t=task_id: _ended(http, survivor, t), 40, 0.1,
                                  f"task {task_id} to end")
            assert body["status"] == "success", body
        # Past the frozen runs' natural end: unfenced, they would have run it to the end.
        await wait_for(lambda: _past(log, RUN_S + 1), 20, 0.1, "the frozen runs' end")
        runs = _runs(log)
        for task_id in ids:
            mine = sorted((r for (t, _, _), r in runs.items() if t == task_id),
                          key=lambda r: r["from"])
            spans = [(k[1], k[2], r["from"], r["to"]) for k, r in runs.items() if k[0] == task_id]
            for before, after in zip(mine, mine[1:], strict=False):
                assert before["to"] < after["from"], f"{task_id} ran twice at once: {spans}"
            assert sum(r["ended"] for r in mine) == 1, f"{task_id} did not end once: {spans}"
        # Sent while it is frozen (the kernel queues it): the first thing it hears on waking.
        reader, writer = await _send_post(frozen, {"script": "stamp.sh",
                                                   "params": {"out": str(log)}})
        frozen.resume()
        status, body, retry_after = await _answer(reader, writer)
        assert (status, body.get("error"), retry_after) == (503, "node_fenced", "1"), body
        await wait_for(lambda: _alive(http, survivor, frozen.name), 30, 0.1, "it to rejoin")
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.resume()
            node.stop()
        kill_task_leftovers(ids)


async def _post(http: aiohttp.ClientSession, node: Node, path: str, body: Any
                ) -> tuple[int, Any]:
    async with http.post(node.url + path, json=body) as response:
        return response.status, await response.json()


async def _send_post(node: Node, body: Any
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and send POST /tasks whole (a frozen server's kernel accepts and buffers it)."""
    data = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(b"POST /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                 b"\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    return reader, writer


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                  ) -> tuple[int, Any, str | None]:
    """(status, JSON body, Retry-After) of the answer to `_send_post`."""
    async with asyncio.timeout(60):
        raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), json.loads(body), headers.get("Retry-After")


def _started(log: Path, ids: list[str]) -> collections.Counter[str] | None:
    """How many of the tasks each node started, once all have started."""
    firsts = {(t, n) for (t, n, a) in _runs(log) if a == 1 and t in ids}
    return collections.Counter(n for _, n in firsts) if len(firsts) == len(ids) else None


async def _ended(http: aiohttp.ClientSession, node: Node, task_id: str) -> Any:
    body = await _task(http, node, task_id)
    return body if body.get("status") in FINAL else None


def _past(log: Path, seconds: float) -> bool:
    """Whether the first start in the log is `seconds` ago (by the log's clock)."""
    first = min(r["from"] for r in _runs(log).values())
    return time.time() - first > seconds


async def _alive(http: aiohttp.ClientSession, node: Node, name: str) -> bool:
    listed = await get_json(http, node.url + "/nodes")
    return any(n["name"] == name and n["alive"] for n in listed["nodes"])
