"""Every role x action x script list, over REST and WebSocket: allowed where the role and the
token's `scripts` list say so, refused (403, or absent from lists) everywhere else. The
server-wide reads (`/events`, `/audit`, `/stats`, `/metrics`) are bounded by the list too,
admins' included; `/nodes` names no script, so the role alone decides."""

from __future__ import annotations

import asyncio
import json
import shutil

import aiohttp
import pytest
from conftest import TEST_SCRIPTS, submit, wait_for

from remoterun.auth import RANK, script_allowed
from remoterun.config import Token

TOKENS = {
    t.name: t for t in (
        Token("viewer-all", "viewer-all-token-0001", "viewer"),
        Token("viewer-echo", "viewer-echo-token-0002", "viewer", ("echo_*",)),
        Token("viewer-none", "viewer-none-token-0003", "viewer", ()),
        Token("operator-all", "operator-all-token-0004", "operator"),
        Token("operator-echo", "operator-echo-token-0005", "operator", ("echo_*",)),
        Token("operator-none", "operator-none-token-0006", "operator", ()),
        Token("admin-all", "admin-all-token-000000007", "admin"),
        Token("admin-echo", "admin-echo-token-00000008", "admin", ("echo_stdin.sh",)),
    )
}
IN_LIST, OUT_OF_LIST = "echo_stdin.sh", "other.sh"  # other.sh: a copy of echo_stdin.sh
NEEDS = {"list": "viewer", "get": "viewer", "output": "viewer", "sse": "viewer",
         "scripts": "viewer", "ws_attach": "viewer", "cancel": "operator",
         "submit": "operator", "ws_submit": "operator", "stdin": "operator",
         "eof": "operator", "signal": "operator", "ws_cancel": "operator",
         "events": "viewer", "task_events": "viewer", "audit": "admin", "stats": "viewer",
         "metrics": "viewer", "nodes": "viewer"}
REST = ("list", "get", "output", "sse", "scripts", "cancel", "submit")
READS = ("events", "task_events", "audit", "stats", "metrics", "nodes")
SCRIPTLESS = ("nodes",)  # names no script: the role alone decides
WS = ("ws_attach", "ws_submit", "stdin", "eof", "signal", "ws_cancel")


def allowed(token: Token, action: str, script: str) -> bool:
    """What PROTOCOL.md says: the role must reach the action's, the list must hold the script."""
    return RANK[token.role] >= RANK[NEEDS[action]] and (
        action in SCRIPTLESS or script_allowed(token.scripts, script))


def auth(token: Token) -> dict[str, str]:
    """The Bearer header of a token."""
    return {"Authorization": f"Bearer {token.token}"}


@pytest.fixture
async def app(make_client, tmp_path):
    """An app with the tokens above and two running interactive tasks, one per script."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(TEST_SCRIPTS / "echo_stdin.sh", tmp_path / "scripts" / IN_LIST)
    shutil.copy2(TEST_SCRIPTS / "echo_stdin.sh", tmp_path / "scripts" / OUT_OF_LIST)
    client = await make_client(tokens=tuple(TOKENS.values()), shutdown_grace_s=0.1)
    admin = auth(TOKENS["admin-all"])
    tasks = {}
    for script in (IN_LIST, OUT_OF_LIST):
        tasks[script] = (await submit(client, script, interactive=True, headers=admin))["id"]

    async def running(task_id):
        body = await (await client.get(f"/tasks/{task_id}", headers=admin)).json()
        return body["status"] == "running"

    for task_id in tasks.values():
        await wait_for(lambda t=task_id: running(t), what="the task to run")
    return client, tasks


async def rest_action(client, token, action, script, task_id) -> bool:
    """Do one REST action; whether it was allowed (asserting a refusal is a 403 or absence)."""
    headers = auth(token)
    if action in ("list", "scripts"):
        response = await client.get(f"/{'tasks' if action == 'list' else 'scripts'}",
                                    headers=headers)
        assert response.status == 200
        body = await response.json()
        if action == "list":
            return task_id in {t["id"] for t in body["tasks"]}
        return script in {s["name"] for s in body["scripts"]}
    if action == "submit":
        response = await client.post("/tasks", json={"script": script}, headers=headers)
        ok_status = 201
    elif action == "cancel":
        response = await client.post(f"/tasks/{task_id}/cancel", headers=headers)
        ok_status = 200
    else:
        path = {"get": "", "output": "/output", "sse": "/logs"}[action]
        response = await client.get(f"/tasks/{task_id}{path}", headers=headers)
        ok_status = 200
    status = response.status
    if status != ok_status:
        assert status == 403, (status, await response.text())
        assert (await response.json())["error"] == "forbidden"
    response.release()
    return status == ok_status


async def read_action(client, token, action, script, task_id) -> bool:
    """Do one server-wide read; whether it showed the task's script (a refusal: 403)."""
    path = {"events": "/events?since=0", "task_events": f"/tasks/{task_id}/events",
            "audit": f"/audit?task={task_id}", "stats": "/stats", "metrics": "/metrics",
            "nodes": "/nodes"}[action]
    async with client.get(path, headers=auth(token)) as response:
        if response.status == 403:
            assert (await response.json())["error"] == "forbidden"
            return False
        assert response.status == 200, (response.status, await response.text())
        if action == "events":
            return task_id in await _events_until_ready(response)
        if action == "metrics":
            return f'script="{script}"' in await response.text()
        body = await response.json()
    if action == "audit":
        return any(row["task_id"] == task_id for row in body["events"])
    if action == "stats":
        return script in body["scripts"]
    return bool(body.get("nodes") or body.get("events"))


async def _events_until_ready(response) -> set[str]:
    """The task ids of the `task` events an /events stream replays before `ready`."""
    seen: set[str] = set()
    async with asyncio.timeout(10):
        async for line in response.content:
            if line.startswith(b"event: ready"):
                return seen
            if line.startswith(b"data: "):
                seen.add(json.loads(line[6:])["id"])
    raise AssertionError("the stream ended before ready")


async def frames_until(ws, predicate, timeout=10.0):
    """Frames until one satisfies `predicate` (returned) or an error frame (returned)."""
    async with asyncio.timeout(timeout):
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if frame["type"] == "error" or predicate(frame):
                return frame
    raise AssertionError("the socket closed first")


def output_has(text):
    """A predicate: an output frame holding `text`."""
    return lambda f: f["type"] == "output" and text in f["data"]


async def ws_action(client, token, action, script, task_id) -> bool:
    """Do one WebSocket action; whether it was allowed (a refusal: 403 or a forbidden frame)."""
    headers = auth(token)
    if action == "ws_submit":
        ws = await client.ws_connect("/ws", headers=headers)
        await ws.send_json({"type": "submit", "script": script})
        frame = await frames_until(ws, lambda f: f["type"] == "task")
        await ws.close()
        if frame["type"] == "error":
            assert frame["error"] == "forbidden", frame
        return frame["type"] == "task"
    try:
        ws = await client.ws_connect(f"/tasks/{task_id}/ws", headers=headers)
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 403
        return False
    try:
        assert (await frames_until(ws, lambda f: f["type"] == "task"))["type"] == "task"
        if action == "ws_attach":
            return True
        message, effect = {
            "stdin": ({"type": "stdin", "data": "hi\n"}, output_has("got: hi")),
            "eof": ({"type": "eof"}, output_has("lines:")),
            "signal": ({"type": "signal", "signal": "TERM"}, lambda f: f["type"] == "exit"),
            "ws_cancel": ({"type": "cancel"}, lambda f: f["type"] == "exit"),
        }[action]
        await ws.send_json(message)
        frame = await frames_until(ws, effect)
        if frame["type"] == "error":
            assert frame["error"] == "forbidden", frame
            return False
        return True
    finally:
        await ws.close()


@pytest.mark.parametrize("action", REST + WS + READS)
@pytest.mark.parametrize("name", sorted(TOKENS))
async def test_role_action_script_list(app, name, action):
    """The action on a task of a listed and of an unlisted script: allowed iff role and list."""
    client, tasks = app
    token = TOKENS[name]
    do = rest_action if action in REST else read_action if action in READS else ws_action
    for script in (IN_LIST, OUT_OF_LIST):
        got = await do(client, token, action, script, tasks[script])
        assert got == allowed(token, action, script), (name, action, script)


async def test_empty_list_allows_nothing_and_no_list_allows_all(app):
    """`scripts = []` sees no task at all; no list sees every one."""
    client, tasks = app
    none = await (await client.get("/tasks", headers=auth(TOKENS["viewer-none"]))).json()
    every = await (await client.get("/tasks", headers=auth(TOKENS["viewer-all"]))).json()
    assert none["tasks"] == []
    assert set(tasks.values()) <= {t["id"] for t in every["tasks"]}
