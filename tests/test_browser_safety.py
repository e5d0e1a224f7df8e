"""Origins, body types, Host names, security headers and unforeseen errors as JSON."""

from __future__ import annotations

import sqlite3

import aiohttp
import pytest
from conftest import TOKENS

ADMIN = {"Authorization": "Bearer admin-token"}


def own(client) -> str:
    """The origin the test client sends to."""
    return f"http://127.0.0.1:{client.port}"


ORIGIN_CASES = [  # (Origin header or None, allowed_origins, accepted)
    pytest.param("same", (), True, id="same-origin"),
    pytest.param(None, (), True, id="no-origin"),
    pytest.param("http://127.0.0.1:1", (), False, id="other-port"),
    pytest.param("http://localhost:{port}", (), False, id="other-host-name"),
    pytest.param("https://127.0.0.1:{port}", (), False, id="other-scheme"),
    pytest.param("http://evil.example", (), False, id="other-site"),
    pytest.param("null", (), False, id="null-origin"),
    pytest.param("http://evil.example", ("http://evil.example",), True, id="allowed-origin"),
    pytest.param("http://EVIL.example:80", ("http://evil.example",), True,
                 id="allowed-origin-default-port"),
]


def origin_header(client, origin):
    """The Origin header of a case."""
    if origin is None:
        return {}
    value = own(client) if origin == "same" else origin.format(port=client.port)
    return {"Origin": value}


@pytest.mark.parametrize("tokens", [(), TOKENS], ids=["auth-off", "auth-on"])
@pytest.mark.parametrize(("origin", "allowed_origins", "accepted"), ORIGIN_CASES)
async def test_origin_cases_rest_and_websocket(make_client, origin, allowed_origins, accepted,
                                               tokens):
    """POST /tasks, GET /tasks and a WebSocket upgrade pass or get 403 bad_origin alike."""
    client = await make_client(tokens=tokens, allowed_origins=allowed_origins)
    headers = {**origin_header(client, origin), **(ADMIN if tokens else {})}
    response = await client.post("/tasks", json={"script": "hello.sh"}, headers=headers)
    assert response.status == (201 if accepted else 403), await response.text()
    if not accepted:
        assert (await response.json())["error"] == "bad_origin"
    listed = await client.get("/tasks", headers=headers)
    assert listed.status == (200 if accepted else 403)
    if accepted:
        ws = await client.ws_connect("/ws", headers=headers)
        await ws.send_json({"type": "submit", "script": "hello.sh"})
        assert (await ws.receive_json())["type"] == "task"
        await ws.close()
    else:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws", headers=headers)
        assert refused.value.status == 403


async def test_cross_site_without_origin_is_refused(client):
    """A request a browser marks Sec-Fetch-Site: cross-site is refused even with no Origin."""
    response = await client.get("/tasks", headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status == 403 and (await response.json())["error"] == "bad_origin"
    assert (await client.get("/tasks", headers={"Sec-Fetch-Site": "same-origin"})).status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
async def test_post_bodies_must_be_json(client, content_type):
    """A body in any type but JSON gets 415 unsupported_media_type, and nothing is queued."""
    headers = {"Content-Type": content_type} if content_type else {}
    response = await client.post("/tasks", data=b'{"script": "hello.sh"}', headers=headers)
    assert response.status == 415, await response.text()
    assert (await response.json())["error"] == "unsupported_media_type"
    assert (await (await client.get("/tasks")).json())["tasks"] == []


async def test_login_also_takes_a_form(make_client):
    """/login accepts a urlencoded form (a plain HTML form), as well as JSON."""
    client = await make_client(tokens=TOKENS)
    response = await client.post("/login", data={"token": "viewer-token"})
    assert response.status == 200 and (await response.json())["role"] == "viewer"
    response = await client.post("/login", data=b"token=viewer-token",
                                 headers={"Content-Type": "text/plain"})
    assert response.status == 415


@pytest.mark.parametrize(("host", "allowed_hosts", "status"), [
    ("localhost:8080", (), 200), ("127.0.0.1", (), 200), ("[::1]:9", (), 200),
    ("attacker.example", (), 421), ("attacker.example:8080", (), 421), ("", (), 421),
    ("runner.lan:8080", ("runner.lan",), 200), ("runner.lan:8080", ("runner.lan:8080",), 200),
    ("runner.lan:9999", ("runner.lan:8080",), 421),
])
async def test_host_allow_list_without_tokens(make_client, host, allowed_hosts, status):
    """Without tokens, only loopback Host names (and server.allowed_hosts) are answered."""
    client = await make_client(allowed_hosts=allowed_hosts)
    response = await client.get("/tasks", headers={"Host": host})
    assert response.status == status, await response.text()
    if status == 421:
        assert (await response.json())["error"] == "misdirected_request"


async def test_host_not_checked_with_tokens(make_client):
    """With tokens, any Host name may be used (the token is the protection)."""
    client = await make_client(tokens=TOKENS)
    response = await client.get("/tasks", headers={"Host": "runner.example", **ADMIN})
    assert response.status == 200


async def test_pages_carry_csp_nosniff_and_no_framing(client):
    """The page, its files and API answers carry CSP with frame-ancestors 'none' and nosniff."""
    for path in ("/", "/static/app.js", "/tasks", "/nowhere"):
        response = await client.get(path)
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"], path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["X-Frame-Options"] == "DENY"


async def test_unforeseen_error_is_json_500(client, settings):
    """An error of no class of ours (the audit table gone) answers 500 internal JSON."""
    with sqlite3.connect(settings.db_path) as conn:
        conn.execute("DROP TABLE audit")
    response = await client.post("/tasks", json={"script": "hello.sh"})
    assert response.status == 500
    body = await response.json()
    assert body["error"] == "internal" and body["message"]
    assert (await client.get("/healthz")).status == 200
