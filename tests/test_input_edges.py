"""Input edges answer 4xx JSON, never 500 or plain text: NUL bytes, over-long names, huge
numbers, NaN and Infinity, keys matched in full and not colliding in case; a symlink alias
carries its target's metadata; engine.max_pending bounds the queue."""

from __future__ import annotations

import os

import pytest
from conftest import TOKENS, submit


async def post_raw(client, body: bytes):
    """POST /tasks with a raw JSON body; (status, parsed body)."""
    response = await client.post("/tasks", data=body,
                                 headers={"Content-Type": "application/json"})
    return response.status, await response.json()


@pytest.mark.parametrize(("body", "status", "code"), [
    (b'{"script": "hello.sh\\u0000"}', 404, "unknown_script"),
    (b'{"script": "hello.sh", "params": {"name": "a\\u0000b"}}', 422, "invalid_params"),
    (b'{"script": "hello.sh", "params": {"na\\u0000me": "x"}}', 422, "invalid_params"),
    (b'{"script": "schema.sh", "params": {"name": "a\\u0000"}}', 422, "invalid_params"),
    (b'{"script": "' + b"a" * 5000 + b'"}', 404, "unknown_script"),
    (b'{"script": "' + b"/".join([b"d" * 200] * 30) + b'"}', 404, "unknown_script"),
    (b'{"script": "' + b"x" * 300 + b'"}', 404, "unknown_script"),
    (b'{"script": "hello.sh", "params": {"n": ' + b"9" * 5000 + b"}}", 400, "invalid_json"),
    (b'{"script": "hello.sh", "priority": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    (b'{"script": "hello.sh", "priority": ' + b"9" * 40 + b"}", 400, "invalid_request"),
    (b'{"script": "hello.sh", "params": {"n": NaN}}', 400, "invalid_json"),
    (b'{"script": "hello.sh", "params": {"n": Infinity}}', 400, "invalid_json"),
    (b'{"script": "hello.sh", "params": {"n": -Infinity}}', 400, "invalid_json"),
    (b'{"script": "hello.sh", "params": {"n": 1e999}}', 400, "invalid_json"),
    (b'{"script": "hello.sh", "timeout": NaN}', 400, "invalid_json"),
    (b'{"script": "schema.sh", "params": {"name": "ab", "count": NaN}}', 400, "invalid_json"),
    (b'{"script": "hello.sh", "params": {"k\\n": "v"}}', 422, "invalid_params"),
    (b'{"script": "hello.sh", "params": {"a": "1", "A": "2"}}', 422, "invalid_params"),
    (b'{"script": "schema.sh", "params": {"name": "ab", "NAME": "cd"}}', 422, "invalid_params"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
])
async def test_edges_answer_4xx_json(client, body, status, code):
    """Each malformed or hostile submission gets its 4xx JSON, and nothing is queued."""
    got, answer = await post_raw(client, body)
    assert (got, answer["error"]) == (status, code), answer
    assert (await (await client.get("/tasks")).json())["tasks"] == []


async def test_edges_over_websocket_are_error_frames(client):
    """The same edges on /ws answer error frames and keep the socket open."""
    ws = await client.ws_connect("/ws")
    for raw, code in (('{"type": "submit", "script": "hello.sh", "params": {"n": NaN}}',
                       "invalid_json"),
                      ('{"type": "submit", "script": "' + "a" * 5000 + '"}', "unknown_script"),
                      ('{"type": "ping", "n": ' + "9" * 5000 + "}", "invalid_json")):
        await ws.send_str(raw)
        frame = await ws.receive_json()
        assert frame["type"] == "error" and frame["error"] == code, frame
    await ws.send_json({"type": "ping"})
    assert (await ws.receive_json())["type"] == "pong"
    await ws.close()


async def test_symlink_alias_carries_its_targets_rules(make_client, settings):
    """An alias of schema.sh is schema.sh: its schema validates, its roles apply, its name."""
    os.symlink("schema.sh", settings.scripts_dir / "alias.sh")
    sidecar = settings.scripts_dir / "schema.sh.toml"
    sidecar.write_text('roles = ["admin"]\n' + sidecar.read_text())
    client = await make_client(tokens=TOKENS)
    ops = {"Authorization": "Bearer operator-token"}
    refused = await client.post("/tasks", json={"script": "alias.sh", "params": {"name": "ab"}},
                                headers=ops)
    assert refused.status == 403
    admin = {"Authorization": "Bearer admin-token"}
    bad = await client.post("/tasks", json={"script": "alias.sh", "params": {"name": "AB"}},
                            headers=admin)
    assert bad.status == 422  # the target's pattern [a-z]+
    task = await submit(client, "alias.sh", params={"name": "ab", "token": "s3cret"},
                        headers=admin)
    assert task["script"] == "schema.sh" and task["params"]["token"] == "***"
    names = [s["name"] for s in (await (await client.get("/scripts", headers=admin)).json())
             ["scripts"]]
    assert "alias.sh" not in names and names.count("schema.sh") == 1


async def test_alias_is_bound_by_the_targets_script_list(make_client, settings):
    """A token listing only the alias cannot run the target through it."""
    os.symlink("hello.sh", settings.scripts_dir / "alias.sh")
    client = await make_client(tokens=(*TOKENS, TOKENS[0].__class__(
        "alias-only", "alias-only-token-1234", "operator", ("alias.sh",))))
    response = await client.post("/tasks", json={"script": "alias.sh"},
                                 headers={"Authorization": "Bearer alias-only-token-1234"})
    assert response.status == 403


async def test_queue_is_bounded(make_client):
    """Past engine.max_pending waiting tasks, a submission gets 503 queue_full + Retry-After."""
    client = await make_client(workers=1, max_pending=3, shutdown_grace_s=0.1)
    await submit(client, "sleep.sh")
    for _ in range(3):
        await submit(client, "hello.sh")
    response = await client.post("/tasks", json={"script": "hello.sh"})
    assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["error"] == "queue_full"
