"""Issue 26.1: in a real cluster (real PostgreSQL and Redis, nodes as processes, tasks in
bubblewrap), a task cannot read another task's live output nor drive it, and a control on
`rr:ctl` acts only if signed with the cluster's key, fresh, not seen before, and allow-listed.

Controls are signed here by hand, from docs/cluster.md's description (not by our module), so
the test checks the wire format as the nodes must read it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from cluster_nodes import Node, make_nodes, start_all
from conftest import wait_for

pytestmark = pytest.mark.slow
CHANNEL = "rr:ctl"

HOSTILE = r"""#!/usr/bin/env python3
# A hostile task: reaches for the cluster's Redis and PostgreSQL from inside its sandbox.
import base64, json, os, socket

env = os.environ

def talk(port, payload):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(payload)
            return s.recv(65536)
    except OSError as exc:
        return repr(exc).encode()

def resp(*words):
    out = [b"*%d\r\n" % len(words)]
    for w in words:
        w = w if isinstance(w, bytes) else w.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(w), w))
    return b"".join(out)

redis_port, pg_port = int(env["RR_PARAM_REDIS"]), int(env["RR_PARAM_PG"])
victim = env["RR_PARAM_VICTIM"]
print("xrange:", talk(redis_port, resp("XRANGE", "rr:out:" + victim, "-", "+")))
forged = json.dumps({"task_id": victim, "method": "write",
                     "args": [base64.b64encode(b"pwned\n").decode()], "bytes": [True]})
print("publish:", talk(redis_port, resp("PUBLISH", "rr:ctl", forged)))
body = b"user\0postgres\0database\0postgres\0\0"
startup = (8 + len(body)).to_bytes(4, "big") + (196608).to_bytes(4, "big") + body
answer = talk(pg_port, startup)
code = int.from_bytes(answer[5:9], "big") if answer[:1] == b"R" else None
print("pg:", "in" if code == 0 else "refused", code)
for path in env["RR_PARAM_FILES"].split(":"):
    try:
        open(path, "rb").read()
        print("file: read", path)
    except OSError:
        print("file: hidden", path)
print("env:", sorted(env))
"""


def control_key(node: Node) -> bytes:
    """The cluster's control key: HMAC-SHA256 of the shared secret key over a fixed label."""
    text = (node.tmp_path.parent / "cluster-secret.key").read_text().strip()
    return hmac.new(base64.b64decode(text), b"remoterun cluster controls", hashlib.sha256).digest()


def signed(key: bytes, task_id: str, method: str, args: list[Any],
           ts_ms: int | None = None) -> bytes:
    """A control as a node publishes it: the fields, a time, a nonce, and their HMAC."""
    fields = {"task_id": task_id, "method": method,
              "args": [base64.b64encode(a).decode() if isinstance(a, bytes) else a
                       for a in args],
              "bytes": [isinstance(a, bytes) for a in args],
              "ts_ms": int(time.time() * 1000) if ts_ms is None else ts_ms,
              "nonce": uuid.uuid4().hex}
    canonical = b"rr-ctl-v1\n" + orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return orjson.dumps({**fields, "mac": hmac.new(key, canonical, hashlib.sha256).hexdigest()})


@pytest.fixture
async def nodes(tmp_path, engines):
    """Two nodes whose tasks run in bubblewrap (as deployed), stopped after the test."""
    made = make_nodes(tmp_path, engines, 2, sandbox="bwrap")
    for node in made:
        path = node.tmp_path / "scripts" / "hostile.py"
        path.write_text(HOSTILE)
        path.chmod(0o755)
    await start_all(made)
    yield made
    for node in made:
        node.stop()


@pytest.fixture
async def redis_admin(engines):
    """A client of the test's Redis with the operator's credentials."""
    client = aioredis.from_url(engines[1].url)
    yield client
    await client.aclose()


class Victim:
    """An interactive echo_stdin.sh task on n1, typed into through n2's WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, task_id: str):
        self.ws = ws
        self.task_id = task_id
        self.text = ""

    async def type(self, line: str) -> None:
        """Send a line as the task's owner would."""
        await self.ws.send_str(json.dumps({"type": "stdin", "data": line + "\n"}))

    async def until(self, needle: str, timeout: float = 20) -> None:
        """Read output until it holds `needle`."""
        async with asyncio.timeout(timeout):
            while needle not in self.text:
                message = await self.ws.receive()
                if message.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"socket closed; output so far: {self.text!r}")
                item = json.loads(message.data)
                if item["type"] == "output":
                    self.text += item["data"]


async def open_victim(http: aiohttp.ClientSession, nodes: list[Node]) -> tuple[Victim, Any]:
    """Submit the victim on n1 and attach through n2; (victim, the socket's context)."""
    async with http.post(f"{nodes[0].url}/tasks", json={
            "script": "echo_stdin.sh", "node": "n1", "interactive": True}) as response:
        assert response.status == 201, await response.text()
        task = await response.json()
    context = http.ws_connect(f"{nodes[1].url}/tasks/{task['id']}/ws")
    victim = Victim(await context.__aenter__(), task["id"])
    await victim.until("ready")
    return victim, context


async def task_output(http: aiohttp.ClientSession, node: Node, task_id: str) -> str:
    """A finished task's output, once it has ended."""
    async def ended() -> bool:
        async with http.get(f"{node.url}/tasks/{task_id}") as response:
            return (await response.json())["status"] in ("success", "failed", "timeout")
    await wait_for(ended, 60, interval=0.2, what="the task to end")
    async with http.get(f"{node.url}/tasks/{task_id}/output") as response:
        return await response.text()


@pytest.mark.timeout(180)
async def test_a_task_cannot_read_nor_drive_another_task(nodes, http, engines):
    """A hostile task on n2 reaches Redis and PostgreSQL on loopback: XRANGE on the victim's
    stream, PUBLISH of a forged write, a PostgreSQL login, a read of the node's config and
    key: none of it gets anything, and the victim never receives the forged line."""
    pg, rd, _ = engines
    victim, context = await open_victim(http, nodes)
    try:
        await victim.type("victim-secret-4711")
        await victim.until("got: victim-secret-4711")
        files = [nodes[0].config, nodes[1].config, nodes[0].tmp_path.parent / "cluster-secret.key"]
        async with http.post(f"{nodes[1].url}/tasks", json={
                "script": "hostile.py", "node": "n2", "params": {
                    "redis": rd.port, "pg": pg.port, "victim": victim.task_id,
                    "files": ":".join(map(str, files))}}) as response:
            assert response.status == 201, await response.text()
            hostile = await response.json()
        seen = await task_output(http, nodes[1], hostile["id"])
        await victim.type("owner-line")
        await victim.until("got: owner-line")
    finally:
        await context.__aexit__(None, None, None)
    assert "xrange:" in seen and "pg:" in seen, seen
    assert "victim-secret-4711" not in seen, seen
    assert "NOAUTH" in seen.split("publish:")[1].splitlines()[0], seen
    assert "pg: in" not in seen, seen
    assert "file: read" not in seen, seen
    assert "pwned" not in victim.text, victim.text


@pytest.mark.timeout(180)
async def test_unsigned_forged_stale_and_replayed_controls_are_ignored(nodes, http,
                                                                      redis_admin):
    """Published straight on rr:ctl (as anyone with Redis's password could): a control
    without a MAC, one signed with another key, one signed too long ago, and a copy of a
    real one are each ignored; the real one acted once."""
    victim, context = await open_victim(http, nodes)
    key = control_key(nodes[0])
    try:
        async with redis_admin.pubsub() as pubsub:
            await pubsub.subscribe(CHANNEL)
            await victim.type("real-line")
            await victim.until("got: real-line")
            captured = None
            async with asyncio.timeout(10):
                while captured is None:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1)
                    if message is not None:
                        captured = message["data"]
        unsigned = orjson.loads(signed(key, victim.task_id, "write", [b"unsigned\n"]))
        del unsigned["mac"]
        for raw in (orjson.dumps(unsigned),
                    signed(os.urandom(32), victim.task_id, "write", [b"forged\n"]),
                    signed(key, victim.task_id, "write", [b"stale\n"],
                           ts_ms=int((time.time() - 600) * 1000)),
                    captured):
            await redis_admin.publish(CHANNEL, raw)
        await victim.type("after")
        await victim.until("got: after")
    finally:
        await context.__aexit__(None, None, None)
    assert victim.text.count("got: real-line") == 1, victim.text
    for word in ("unsigned", "forged", "stale"):
        assert word not in victim.text, victim.text
    assert "control_refused" in nodes[0].log.read_text()


@pytest.mark.timeout(180)
async def test_a_signed_control_outside_the_allow_list_is_ignored(nodes, http, redis_admin):
    """A validly signed control naming a method of the run that is no control (`pause`: it
    would stop reading the task's output) or a control with arguments of the wrong type is
    ignored; the task's output goes on."""
    victim, context = await open_victim(http, nodes)
    key = control_key(nodes[0])
    try:
        for raw in (signed(key, victim.task_id, "pause", []),
                    signed(key, victim.task_id, "write", ["not bytes\n"]),
                    signed(key, victim.task_id, "signal", [19])):  # SIGSTOP: not allowed
            await redis_admin.publish(CHANNEL, raw)
        await asyncio.sleep(0.5)
        await victim.type("still-read")
        await victim.until("got: still-read")
        good = signed(key, victim.task_id, "write", [b"signed-line\n"])
        await redis_admin.publish(CHANNEL, good)
        await victim.until("got: signed-line")
    finally:
        await context.__aexit__(None, None, None)
    assert "not bytes" not in victim.text, victim.text
