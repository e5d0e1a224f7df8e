"""Tokens by digest and with expiry, their minimum length, server-side sessions (expiry,
logout revocation, the cookie's flags), the failed-attempt limiter, `token create`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
import tomllib
from http.cookies import SimpleCookie

import pytest
from conftest import TOKENS, wait_for

from remoterun import config
from remoterun.auth import COOKIE, Sessions
from remoterun.config import Token


def session_of(response) -> str:
    """The session id a /login response set."""
    return SimpleCookie(response.headers["Set-Cookie"])[COOKIE].value


async def logged_in(client, token: str) -> dict[str, str]:
    """Log in; the headers a page sends with each call then: the cookie and the key."""
    response = await client.post("/login", json={"token": token})
    client.session.cookie_jar.clear()
    return {"Cookie": f"{COOKIE}={session_of(response)}",
            "X-RemoteRun-Session-Key": (await response.json())["session_key"]}


async def test_session_cookie_is_opaque_and_flagged(make_client):
    """The cookie holds a random id, not the token; HttpOnly, SameSite=Strict, Max-Age set."""
    client = await make_client(tokens=TOKENS, session_ttl_s=600)
    response = await client.post("/login", json={"token": "viewer-token"})
    header = response.headers["Set-Cookie"]
    assert "viewer-token" not in header and len(session_of(response)) >= 40
    lowered = header.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "max-age=600" in lowered
    assert "secure" not in lowered  # plain HTTP here; over TLS see test_listen


async def test_logout_revokes_the_session_on_the_server(make_client):
    """After POST /logout the old session id is refused even if a client kept it."""
    client = await make_client(tokens=TOKENS)
    kept = await logged_in(client, "viewer-token")
    assert (await client.get("/tasks", headers=kept)).status == 200
    out = await client.post("/logout", headers=kept)
    assert (await out.json())["revoked"] is True
    response = await client.get("/tasks", headers=kept)
    assert response.status == 401 and (await response.json())["error"] == "session_expired"


async def test_session_expires_after_ttl(make_client):
    """A session older than server.session_ttl_s is refused (401)."""
    client = await make_client(tokens=TOKENS, session_ttl_s=0.5)
    kept = await logged_in(client, "operator-token")
    assert (await client.get("/tasks", headers=kept)).status == 200

    async def refused():
        return (await client.get("/tasks", headers=kept)).status == 401

    await wait_for(refused, timeout=5, what="the session to expire")


async def test_forged_session_id_is_refused(make_client):
    """A cookie that was never issued (or holds a token) authenticates nothing."""
    client = await make_client(tokens=TOKENS)
    for value in ("made-up", "admin-token"):
        response = await client.get("/tasks", headers={"Cookie": f"{COOKIE}={value}"})
        assert response.status == 401


async def test_token_by_sha256_and_expiry(make_client):
    """A token configured by its digest works; an expired one answers 401 token_expired."""
    digest = hashlib.sha256(b"digest-only-token-123456").hexdigest()
    tokens = (Token("hashed", "", "viewer", sha256=digest),
              Token("old", "expired-token-12345678", "admin", expires_at=time.time() - 1),
              Token("later", "valid-until-later-1234", "viewer", expires_at=time.time() + 600))
    client = await make_client(tokens=tokens)
    ok = await client.get("/tasks", headers={"Authorization": "Bearer digest-only-token-123456"})
    assert ok.status == 200
    old = await client.get("/tasks", headers={"Authorization": "Bearer expired-token-12345678"})
    assert old.status == 401 and (await old.json())["error"] == "token_expired"
    later = await client.get("/tasks", headers={"Authorization": "Bearer valid-until-later-1234"})
    assert later.status == 200
    assert (await client.post("/login", json={"token": "expired-token-12345678"})).status == 401


@pytest.mark.parametrize(("text", "words"), [
    ('name = "a"\ntoken = "short"\nrole = "viewer"', "tokens[0].token: must be at least 16"),
    ('name = "a"\nsha256 = "abc"\nrole = "viewer"', "tokens[0].sha256: expected 64 hex"),
    ('name = "a"\nrole = "viewer"', "give exactly one of token or sha256"),
    ('name = "a"\ntoken = "long-enough-token-1"\nrole = "viewer"\nexpires = "soon"',
     "tokens[0].expires"),
])
def test_bad_tokens_stop_config_load(tmp_path, text, words):
    """Short tokens, bad digests and bad expiries are refused at load with a clear line."""
    path = tmp_path / "config.toml"
    path.write_text("[[tokens]]\n" + text + "\n")
    with pytest.raises(config.ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        config.load(path)


def test_short_token_stops_the_server(server):
    """`remoterun serve` with a 1-character token exits 2 with one line naming the key."""
    server.config.write_text(server.config.read_text()
                             + '[[tokens]]\nname = "a"\ntoken = "x"\nrole = "admin"\n')
    result = subprocess.run([sys.executable, "-m", "remoterun", "serve", "--config",
                             str(server.config), "--port", str(server.port)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "remoterun: config error: tokens[0].token: must be at least 16 characters")


def test_empty_script_list_from_config_allows_nothing(tmp_path):
    """`scripts = []` in config.toml stays an empty list (it used to mean every script)."""
    path = tmp_path / "config.toml"
    path.write_text('[[tokens]]\nname = "a"\ntoken = "long-enough-token-1"\nrole = "operator"\n'
                    'scripts = []\n')
    assert config.load(path).tokens[0].scripts == ()


async def test_failed_attempts_are_rate_limited(make_client):
    """Past auth_fail_limit failures an address gets 429 with Retry-After for every wrong or
    missing credential until the window passes; a valid token is still served (issue 26)."""
    client = await make_client(tokens=TOKENS, auth_fail_limit=3, auth_fail_window_s=1.0)
    for _ in range(2):
        assert (await client.get("/tasks", headers={"Authorization": "Bearer nope"})).status \
            == 401
    assert (await client.post("/login", json={"token": "wrong"})).status == 401
    limited = await client.get("/tasks", headers={"Authorization": "Bearer nope"})
    assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    assert (await limited.json())["error"] == "too_many_requests"
    assert (await client.post("/login", json={"token": "wrong"})).status == 429
    assert (await client.get("/tasks")).status == 429

    async def back():
        response = await client.get("/tasks", headers={"Authorization": "Bearer nope"})
        return response.status == 401

    await wait_for(back, timeout=5, what="the window to pass")


async def test_parallel_wrong_logins_are_counted_before_their_bodies(make_client):
    """Issue 26, attack 8: of 100 wrong logins sent at once, only auth_fail_limit are checked
    (401); the rest get 429, because each is counted before its body is read."""
    client = await make_client(tokens=TOKENS, auth_fail_limit=20, auth_fail_window_s=60.0)
    connections = [await asyncio.open_connection("127.0.0.1", client.port)
                   for _ in range(100)]
    bodies = [json.dumps({"token": f"guess-{i:03}"}).encode() for i in range(100)]
    for (_, writer), body in zip(connections, bodies, strict=True):
        writer.write(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     b"Content-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n")
    await asyncio.sleep(0.5)  # every request's headers are in before any body
    for (_, writer), body in zip(connections, bodies, strict=True):
        writer.write(body)
    answers = await asyncio.gather(*(reader.read() for reader, _ in connections))
    for _, writer in connections:
        writer.close()
    statuses = [int(a.split(b" ", 2)[1]) for a in answers]
    assert statuses.count(401) == 20 and statuses.count(429) == 80, statuses


async def test_a_valid_credential_is_never_locked_out(make_client):
    """Issue 26, attack 8: after 22 bad tokens from the address, the admin's token (header,
    login, session) is served there while wrong ones get 429."""
    client = await make_client(tokens=TOKENS, auth_fail_limit=20, auth_fail_window_s=60.0)
    for _ in range(22):
        await client.get("/tasks", headers={"Authorization": "Bearer guessed-token-123"})
    assert (await client.get("/tasks", headers={"Authorization": "Bearer guessed"})).status \
        == 429
    assert (await client.get("/tasks", headers={"Authorization": "Bearer admin-token"})).status \
        == 200
    assert (await client.post("/login", json={"token": "wrong"})).status == 429
    login = await client.post("/login", json={"token": "admin-token"})
    assert login.status == 200, await login.text()


def test_sessions_are_capped_per_token():
    """Issue 26, attack 8: 10,000 logins with one viewer token evict only that token's oldest
    sessions; an admin's session (and the viewer's newest) live on."""
    sessions = Sessions(ttl_s=600)
    admin = sessions.create("admin-digest")
    viewer = [sessions.create("viewer-digest") for _ in range(10_000)]
    assert sessions.token_digest(*admin) == "admin-digest"
    assert sessions.token_digest(*viewer[-1]) == "viewer-digest"
    assert sessions.token_digest(*viewer[0]) is None
    alive = sum(sessions.token_digest(*v) is not None for v in viewer)
    assert alive == Sessions.PER_TOKEN


def test_token_create_prints_a_token_and_its_config_lines(tmp_path):
    """`remoterun token create` prints a 16+ character token once and lines that load."""
    result = subprocess.run([sys.executable, "-m", "remoterun", "token", "create", "ops",
                             "--role", "operator", "--scripts", "hello.sh", "count*",
                             "--expires", "30d"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    first, _, rest = result.stdout.partition("\n")
    token = first.rsplit(" ", 1)[1]
    assert len(token) >= 16 and token not in rest
    lines = rest[rest.index("[[tokens]]"):]
    path = tmp_path / "config.toml"
    path.write_text(lines)
    (loaded,) = config.load(path).tokens
    assert loaded.sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert loaded.scripts == ("hello.sh", "count*") and loaded.role == "operator"
    assert 29 * 86400 < loaded.expires_at - time.time() <= 30 * 86400
    assert tomllib.loads(lines)["tokens"][0]["name"] == "ops"
    bad = subprocess.run([sys.executable, "-m", "remoterun", "token", "create", "x", "--role",
                          "viewer", "--expires", "soon"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "duration" in bad.stderr
