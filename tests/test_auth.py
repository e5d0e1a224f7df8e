"""Tokens and roles over REST, SSE and WebSocket."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import TOKENS, submit, wait_final


@pytest.fixture
async def secured(make_client):
    """A client of an app with tokens configured."""
    return await make_client(tokens=TOKENS)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


async def test_no_or_wrong_token_is_401(secured):
    """Every endpoint but /healthz needs a known token."""
    for path in ("/tasks", "/scripts", "/metrics"):
        for headers in (None, bearer("wrong"), {"Authorization": "Basic x"}):
            response = await secured.get(path, headers=headers)
            assert response.status == 401, (path, headers)
            assert (await response.json())["error"] == "unauthorized"
    assert (await secured.get("/healthz")).status == 200
    response = await secured.post("/tasks", json={"script": "hello.sh"},
                                  headers=bearer("wrong"))
    assert response.status == 401


async def test_viewer_reads_but_cannot_submit(secured):
    """A viewer may list and read but gets 403 on submit and cancel."""
    response = await secured.post("/tasks", json={"script": "hello.sh"},
                                  headers=bearer("viewer-token"))
    assert response.status == 403 and (await response.json())["error"] == "forbidden"
    task = await submit(secured, "hello.sh", headers=bearer("operator-token"))
    assert task["submitted_by"] == "ops"
    await wait_final(secured, task["id"], headers=bearer("viewer-token"))
    response = await secured.get(f"/tasks/{task['id']}/output", headers=bearer("viewer-token"))
    assert response.status == 200 and await response.text() == "hello world\n"
    response = await secured.post(f"/tasks/{task['id']}/cancel", headers=bearer("viewer-token"))
    assert response.status == 403


async def test_script_list_limits_a_token(secured):
    """A token limited to some scripts gets 403 for the others."""
    ok = await secured.post("/tasks", json={"script": "hello.sh"}, headers=bearer("hello-token"))
    assert ok.status == 201
    no = await secured.post("/tasks", json={"script": "lines.py"}, headers=bearer("hello-token"))
    assert no.status == 403


async def test_query_token_and_websocket(secured):
    """?token= works for browsers; a WebSocket without a token is refused with 401."""
    response = await secured.get("/tasks?token=viewer-token")
    assert response.status == 200
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await secured.ws_connect("/ws")
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as wrong:
        await secured.ws_connect("/ws?token=nope")
    assert wrong.value.status == 401
    ws = await secured.ws_connect("/ws?token=viewer-token")
    await ws.send_json({"type": "submit", "script": "hello.sh"})
    error = await ws.receive_json()
    assert error["type"] == "error" and error["error"] == "forbidden"
    await ws.close()
    ws = await secured.ws_connect("/ws", headers=bearer("operator-token"))
    await ws.send_json({"type": "submit", "script": "hello.sh"})
    assert (await ws.receive_json())["task"]["submitted_by"] == "ops"
    await ws.close()


async def test_login_cookie(secured):
    """POST /login with a token sets an HttpOnly session cookie that, with the session key the
    answer holds, authenticates later calls (the cookie alone does not: issue 26)."""
    response = await secured.post("/login", json={"token": "wrong"})
    assert response.status == 401
    response = await secured.post("/login", json={"token": "viewer-token"})
    assert response.status == 200
    assert "httponly" in response.headers["Set-Cookie"].lower()
    key = {"X-RemoteRun-Session-Key": (await response.json())["session_key"]}
    assert (await secured.get("/tasks", headers=key)).status == 200
    assert (await (await secured.get("/whoami", headers=key)).json())["role"] == "viewer"
