"""Issue 26, attack 1: strings that cannot be encoded as UTF-8 (a lone surrogate, bytes that
are not UTF-8) are refused with 422 at every input, and a stored row holding one never makes a
task list, a task or the `/events` replay unreadable."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from aiohttp.test_utils import TestClient
from conftest import submit, wait_final
from test_api_events import read_until, tasks_of

SURROGATE_BODIES = [
    b'{"script": "hello.sh", "params": {"a": "\\ud800"}}',
    b'{"script": "hello.sh", "params": {"\\udfff": "x"}}',
    b'{"script": "hello\\ud800.sh"}',
    b'{"script": "hello.sh", "stdin": "\\udc80"}',
]


async def raw_request(port: int, head: bytes) -> bytes:
    """Send raw request bytes; the whole answer (the server closes: Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


async def test_lone_surrogates_are_refused_with_422(client: TestClient) -> None:
    """REST bodies (params, keys, script, stdin), WebSocket submit and stdin, and headers that
    are not UTF-8 answer 422 invalid_encoding; nothing is stored and the lists stay readable."""
    for body in SURROGATE_BODIES:
        response = await client.post("/tasks", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = await response.json()
        assert (response.status, answer["error"]) == (422, "invalid_encoding"), answer
        assert answer["details"][0]["field"]
    ws = await client.ws_connect("/ws")
    await ws.send_str('{"type": "submit", "script": "hello.sh", "params": {"a": "\\ud800"}}')
    frame = await ws.receive_json()
    assert (frame["type"], frame["error"]) == ("error", "invalid_encoding"), frame
    await ws.send_json({"type": "submit", "script": "echo_stdin.sh", "interactive": True})
    assert (await ws.receive_json())["type"] == "task"
    await ws.send_str('{"type": "stdin", "data": "ab\\ud800"}')
    async with asyncio.timeout(10):
        frame = await ws.receive_json()
        while frame["type"] != "error":  # the task's own frames come meanwhile
            frame = await ws.receive_json()
    assert frame["error"] == "invalid_encoding", frame
    await ws.send_json({"type": "stdin", "data": "still here\n"})  # the socket lives on
    await ws.send_json({"type": "eof"})
    await ws.close()
    answer = await raw_request(client.port, b"GET /tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                             b"Connection: close\r\nX-Note: caf\xe9\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 422 "), answer[:200]
    assert b'"error":"invalid_encoding"' in answer and b"X-Note" in answer
    response = await client.get("/tasks")
    assert response.status == 200
    assert [t["script"] for t in (await response.json())["tasks"]] == ["echo_stdin.sh"]


def _poison(db_path: Path, escaped_id: str, raw_id: str) -> None:
    """Write what the attack left behind straight into the database: a lone surrogate as a
    JSON escape (what the server stored) and bytes that are not UTF-8 at all."""
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE tasks SET params = ? WHERE id = ?", ('{"a": "\\ud800"}', escaped_id))
        conn.execute("UPDATE tasks SET params = CAST(X'7B2261223A2261FF227D' AS TEXT), "
                     "error = CAST(X'C0AF' AS TEXT) WHERE id = ?", (raw_id,))
    conn.close()


async def test_a_stored_bad_row_never_breaks_a_list(client: TestClient, tmp_path: Path) -> None:
    """Rows poisoned in the SQLite file itself still list, show and replay (200, valid UTF-8
    JSON, U+FFFD where the bad text was) for everyone who may see them."""
    first = await submit(client, "hello.sh")
    second = await submit(client, "hello.sh")
    for task in (first, second):
        await wait_final(client, task["id"])
    await asyncio.to_thread(_poison, tmp_path / "rr.db", first["id"], second["id"])
    listed = await client.get("/tasks")
    assert listed.status == 200, await listed.text()
    params = {t["id"]: t["params"] for t in (await listed.json())["tasks"]}
    assert params[first["id"]] == {"a": "\ufffd"}
    assert params[second["id"]]["a"].startswith("a")
    for task in (first, second):
        one = await client.get(f"/tasks/{task['id']}")
        assert one.status == 200, await one.text()
        (await one.read()).decode("utf-8")  # strict: every byte sent is UTF-8
    async with client.get("/events?since=0") as stream:
        assert stream.status == 200
        events = await read_until(stream, lambda got: len(tasks_of(got)) >= 6)
    assert {t["id"] for t in tasks_of(events)} == {first["id"], second["id"]}
