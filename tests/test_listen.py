"""The listening socket of a real server process: HTTPS and WSS, server.max_connections, and
the header read timeout that closes slowloris connections."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import ServerProcess, wait_for


def make_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl, as a deployer would)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True,
                   capture_output=True, timeout=60)
    return cert, key


@pytest.fixture
def tls_server(tmp_path: Path):
    """A server with tokens, serving HTTPS."""
    cert, key = make_cert(tmp_path)
    server = ServerProcess(tmp_path, f'tls_cert = "{cert}"\ntls_key = "{key}"\n'
                           "header_timeout_s = 1.0\n"
                           '[[tokens]]\nname = "ops"\ntoken = "operator-token-123456"\n'
                           'role = "operator"\n')
    server.start()
    yield server, ssl.create_default_context(cafile=str(cert))
    server.stop()


async def test_https_and_wss_with_a_secure_cookie(tls_server):
    """HTTPS answers, WSS submits and streams, and the session cookie is Secure and
    `__Host-` prefixed over TLS, and needs its key."""
    server, context = tls_server
    base = f"https://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        assert (await http.get(base + "/healthz")).status == 200
        login = await http.post(base + "/login", json={"token": "operator-token-123456"})
        assert login.status == 200
        cookie = login.headers["Set-Cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie
        assert cookie.startswith("__host-remoterun_session=") and "domain" not in cookie
        key = {"X-RemoteRun-Session-Key": (await login.json())["session_key"]}
        stolen = {"Cookie": login.headers["Set-Cookie"].split(";")[0]}
        assert (await http.get(base + "/whoami", headers=stolen)).status == 401
        assert (await http.get(base + "/whoami", headers={**stolen, **key})).status == 200
        ws = await http.ws_connect(f"wss://127.0.0.1:{server.port}/ws",
                                   headers={"Authorization": "Bearer operator-token-123456",
                                            "Origin": base})
        await ws.send_json({"type": "submit", "script": "hello.sh"})
        frames = [await ws.receive_json() for _ in range(2)]
        assert frames[0]["type"] == "task"
        await ws.close()
    with pytest.raises(aiohttp.ClientError):  # plain HTTP to the TLS port
        async with aiohttp.ClientSession() as plain:
            await plain.get(f"http://127.0.0.1:{server.port}/healthz")


def test_stalled_tls_handshake_is_cut(tls_server):
    """A connection that never starts its TLS handshake is closed after header_timeout_s."""
    server, _ = tls_server
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        assert closed_by_server(sock)
    assert 0.5 < time.monotonic() - started < 8


def test_bad_certificate_stops_the_server(tmp_path):
    """A missing certificate file is a config error with one line, exit 2."""
    server = ServerProcess(tmp_path, f'tls_cert = "{tmp_path}/no.pem"\n'
                           f'tls_key = "{tmp_path}/no.key"\n')
    result = subprocess.run(
        [sys.executable, "-m", "remoterun", "serve", "--config", str(server.config)],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "config error: server.tls_cert: cannot load" in result.stderr


def slow_socket(port: int) -> socket.socket:
    """A connection that has sent half a request line and nothing more (slowloris)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ")
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed this connection (EOF or reset)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


async def test_connections_are_bounded_and_slow_headers_cut(tmp_path):
    """Past max_connections a connection gets 503 at once; header-slow ones are closed."""
    server = ServerProcess(tmp_path, "max_connections = 4\nheader_timeout_s = 1.0\n")
    server.start()
    try:
        await wait_for(lambda: _healthy(server.port), what="the server")
        slow = [slow_socket(server.port) for _ in range(4)]
        started = time.monotonic()
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = extra.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer
        extra.close()
        assert all(closed_by_server(s) for s in slow)
        assert 0.5 < time.monotonic() - started < 8
        for s in slow:
            s.close()
        await wait_for(lambda: _healthy(server.port), what="room again")
    finally:
        server.stop()


def _healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(4096).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def read_to_close(sock: socket.socket) -> bool:
    """Whether the server closed this connection, after whatever answer it sent first."""
    while not closed_by_server(sock):
        pass
    return True


def stalled_body(port: int, request_line: bytes) -> socket.socket:
    """Headers promising a 100-byte body, then one byte of it and nothing more."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_line + b"\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{")
    return sock


def stalled_second_request(port: int) -> socket.socket:
    """One whole keep-alive request, answered; then half the headers of a second one."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ")
    return sock


async def test_stalled_bodies_and_keep_alive_requests_are_cut(tmp_path):
    """Issue 26, attack 6: a body that stops after its first byte (read by the handler or
    not) and a second keep-alive request whose headers never end each lose their connection
    after header_timeout_s, so they cannot hold server.max_connections."""
    server = ServerProcess(tmp_path, "max_connections = 4\nheader_timeout_s = 1.0\n")
    server.start()
    try:
        await wait_for(lambda: _healthy(server.port), what="the server")
        held = [stalled_body(server.port, b"POST /tasks HTTP/1.1"),
                stalled_body(server.port, b"POST /login HTTP/1.1"),
                stalled_body(server.port, b"GET /healthz HTTP/1.1"),
                stalled_second_request(server.port)]
        started = time.monotonic()
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert extra.recv(4096).startswith(b"HTTP/1.1 503")  # they do hold every slot
        extra.close()
        for sock in held:
            assert read_to_close(sock)
        assert time.monotonic() - started < 5  # lingering alone would be 10 s; before: never
        for sock in held:
            sock.close()
        await wait_for(lambda: _healthy(server.port), what="room again")
    finally:
        server.stop()
