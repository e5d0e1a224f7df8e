"""The audit trail: a row for each action (submit, cancel, signal, stdin once, attach,
download, login, logout, denied), and `GET /audit` as PROTOCOL.md says (admin only)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from conftest import TOKENS, submit, wait_final, wait_for

OPS = {"Authorization": "Bearer operator-token"}
ADMIN = {"Authorization": "Bearer admin-token"}
VIEWER = {"Authorization": "Bearer viewer-token"}
FIELDS = {"ts", "actor", "role", "address", "action", "task_id", "script", "result", "detail"}


@pytest.fixture
async def secured(make_client):
    """An app with tokens."""
    return await make_client(tokens=TOKENS, shutdown_grace_s=0.1)


async def events(client, query=""):
    """GET /audit as the admin."""
    response = await client.get(f"/audit{query}", headers=ADMIN)
    assert response.status == 200, await response.text()
    return (await response.json())["events"]


async def test_submit_row_is_written_with_the_task(secured):
    """The 201 comes after the task and its audit row were committed together."""
    task = await submit(secured, "hello.sh", headers=OPS)
    (row,) = await events(secured, "?action=submit")
    assert set(row) == FIELDS and row["ts"].endswith("Z")
    assert row == {**row, "actor": "ops", "role": "operator", "address": "127.0.0.1",
                   "task_id": task["id"], "script": "hello.sh", "result": "ok"}


async def test_cancel_rows_pending_and_running(make_client):
    """Cancelling a pending and a running task each leave a cancel row (REST and WebSocket)."""
    client = await make_client(tokens=TOKENS, workers=1, shutdown_grace_s=0.1)
    running = await submit(client, "sleep.sh", headers=OPS)
    pending = await submit(client, "hello.sh", headers=OPS)
    assert (await client.post(f"/tasks/{pending['id']}/cancel", headers=OPS)).status == 200
    ws = await client.ws_connect(f"/tasks/{running['id']}/ws", headers=OPS)
    await ws.send_json({"type": "cancel"})
    await wait_final(client, running["id"], headers=OPS)
    await ws.close()
    rows = await events(client, "?action=cancel")
    assert {r["task_id"] for r in rows} == {running["id"], pending["id"]}


async def test_ws_rows_attach_stdin_once_signal(secured):
    """Attach, the first stdin message only, and each signal are recorded."""
    task = await submit(secured, "echo_stdin.sh", interactive=True, headers=OPS)
    ws = await secured.ws_connect(f"/tasks/{task['id']}/ws", headers=OPS)
    for line in ("a\n", "b\n", "c\n"):
        await ws.send_json({"type": "stdin", "data": line})
    await wait_for(lambda: events(secured, "?action=stdin"), what="a stdin row")
    await ws.send_json({"type": "signal", "signal": "TERM"})
    await wait_final(secured, task["id"], headers=OPS)
    await ws.close()
    assert len(await events(secured, "?action=stdin")) == 1
    (signal,) = await events(secured, "?action=signal")
    assert signal["detail"] == "TERM" and signal["task_id"] == task["id"]
    (attach,) = await events(secured, "?action=attach")
    assert attach["detail"] == "ws" and attach["actor"] == "ops"


async def test_download_sse_login_logout_rows(secured):
    """An output download, an SSE follow, a login and a logout each leave their row."""
    task = await submit(secured, "hello.sh", headers=OPS)
    await wait_final(secured, task["id"], headers=OPS)
    await (await secured.get(f"/tasks/{task['id']}/output", headers=VIEWER)).read()
    await (await secured.get(f"/tasks/{task['id']}/logs", headers=VIEWER)).read()
    login = await secured.post("/login", json={"token": "viewer-token"})
    key = (await login.json())["session_key"]
    await secured.post("/logout", headers={"X-RemoteRun-Session-Key": key})
    (download,) = await events(secured, "?action=download")
    assert download["actor"] == "viewer-1" and download["task_id"] == task["id"]
    (sse,) = await events(secured, "?action=attach")
    assert sse["detail"] == "sse"
    (login,) = await events(secured, "?action=login")
    (logout,) = await events(secured, "?action=logout")
    assert login["actor"] == "viewer-1" and logout["actor"] == "viewer-1"


async def test_denied_rows_for_401_and_403(secured):
    """A wrong token (401) and a role that may not (403, REST and WebSocket) are recorded."""
    await secured.get("/tasks?token=guessed-secret&limit=5")
    await secured.post("/tasks", json={"script": "hello.sh"}, headers=VIEWER)
    ws = await secured.ws_connect("/ws", headers=VIEWER)
    await ws.send_json({"type": "submit", "script": "hello.sh"})
    assert (await ws.receive_json())["error"] == "forbidden"
    await ws.close()

    async def summarized():  # the second 403 within a second is counted, not written (issue 26)
        rows = await events(secured, "?action=denied")
        return rows if len(rows) == 3 else None

    rows = await wait_for(summarized, timeout=5, what="the summary of the second 403")
    assert [r["result"] for r in rows] == ["forbidden", "forbidden", "unauthorized"]
    assert rows[-1]["actor"] == "-" and "GET /tasks?limit=5" in rows[-1]["detail"]
    assert "guessed-secret" not in str(rows)
    assert rows[1]["actor"] == "viewer-1" and "POST /tasks" in rows[1]["detail"]
    assert rows[0]["detail"].startswith("summary: 1 more refused (forbidden) from 127.0.0.1")


async def test_audit_filters_pages_and_is_admin_only(secured):
    """actor, action, task and since filter; limit and cursor page; others get 403."""
    first = await submit(secured, "hello.sh", headers=OPS)
    await asyncio.sleep(0.01)  # distinct timestamps for `since`
    mark = (await events(secured, "?action=submit"))[0]["ts"]
    second = await submit(secured, "hello.sh", headers=ADMIN)
    assert {r["actor"] for r in await events(secured, "?action=submit&actor=root")} == {"root"}
    assert [r["task_id"] for r in await events(secured, f"?task={first['id']}")] == [first["id"]]
    later = await events(secured, f"?action=submit&since={mark}")
    assert {r["task_id"] for r in later} == {first["id"], second["id"]}
    page = await (await secured.get("/audit?action=submit&limit=1", headers=ADMIN)).json()
    assert [e["task_id"] for e in page["events"]] == [second["id"]] and page["next_cursor"]
    rest = await (await secured.get(f"/audit?action=submit&limit=1&cursor={page['next_cursor']}",
                                    headers=ADMIN)).json()
    assert [e["task_id"] for e in rest["events"]] == [first["id"]]
    for headers in (OPS, VIEWER):
        assert (await secured.get("/audit", headers=headers)).status == 403
    bad = await secured.get("/audit?since=yesterday&limit=0", headers=ADMIN)
    assert bad.status == 400
    assert {d["field"] for d in (await bad.json())["details"]} == {"since", "limit"}


async def test_submit_and_its_audit_row_are_one_transaction(make_client, settings):
    """With the audit table gone, a submission fails whole: 500 JSON, no task row at all."""
    client = await make_client(workers=1, shutdown_grace_s=0.1)
    blocker = await submit(client, "sleep.sh")
    waiting = await submit(client, "hello.sh")
    with sqlite3.connect(settings.db_path) as conn:
        schema = [r[0] for r in conn.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'audit' AND sql IS NOT NULL")]
        conn.execute("DROP TABLE audit")
    response = await client.post("/tasks", json={"script": "hello.sh"})
    assert response.status == 500 and (await response.json())["error"] == "internal"
    tasks = (await (await client.get("/tasks")).json())["tasks"]
    assert {t["id"] for t in tasks} == {blocker["id"], waiting["id"]}
    cancel = await client.post(f"/tasks/{waiting['id']}/cancel")
    assert cancel.status == 500  # the cancellation rolled back with its audit row
    assert (await (await client.get(f"/tasks/{waiting['id']}")).json())["status"] == "pending"
    with sqlite3.connect(settings.db_path) as conn:
        for sql in schema:
            conn.execute(sql)
    again = await client.post(f"/tasks/{waiting['id']}/cancel")  # still queued, so cancellable
    assert again.status == 200 and (await again.json())["status"] == "cancelled"
