"""The server runs short of descriptors (issue 25): a low `ulimit -n` under 400 WebSockets."""

from __future__ import annotations

import asyncio
import resource
import socket
import subprocess
import sys

import aiohttp
from conftest import ServerProcess, wait_for

NOFILE = 256
SOCKETS = 400


def _low_nofile() -> None:
    """In the server's child before exec: soft and hard RLIMIT_NOFILE at NOFILE."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def _healthy(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            return sock.recv(4096).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


async def _open(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientWebSocketResponse | str:
    """A WebSocket to `url`, or how it was refused."""
    try:
        return await http.ws_connect(url, timeout=aiohttp.ClientWSTimeout(ws_close=1),
                                     autoping=False)
    except aiohttp.WSServerHandshakeError as exc:
        return f"status {exc.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


async def test_400_websockets_under_ulimit_256_keep_the_log_small(tmp_path):
    """Under `ulimit -n 256` max_connections is lowered at start with a warning; 400 WebSockets
    get 101 or 503 (none left unanswered); the log stays a few lines, with no traceback; once
    they close, /healthz answers."""
    server = ServerProcess(tmp_path)
    server.start(preexec_fn=_low_nofile)
    try:
        await wait_for(lambda: _healthy(server.port), what="the server")
        text = server.log.read_text()
        assert "max_connections_lowered" in text and f'"nofile_limit":{NOFILE}' in text, text
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            async with http.post(server.url + "/tasks", json={"script": "sleep.sh"}) as r:
                task_id = (await r.json())["id"]
            url = f"{server.url}/tasks/{task_id}/ws".replace("http", "ws", 1)
            opened = await asyncio.gather(*(_open(http, url) for _ in range(SOCKETS)))
            sockets = [ws for ws in opened if not isinstance(ws, str)]
            refused = [why for why in opened if isinstance(why, str)]
            assert sockets and set(refused) <= {"status 503"}, set(refused)
            await asyncio.gather(*(ws.close() for ws in sockets))
            await wait_for(lambda: _healthy(server.port), timeout=20, what="/healthz again")
            async with http.post(f"{server.url}/tasks/{task_id}/cancel") as r:
                assert r.status == 200
    finally:
        server.stop()
    lines = server.log.read_text().splitlines()
    assert len(lines) < SOCKETS + 100, "\n".join(lines[-40:])
    assert not any("Traceback" in line for line in lines), "\n".join(lines[-40:])
    assert sum("accept_failed" in line for line in lines) <= 30


def test_a_limit_too_low_for_any_connection_is_a_config_error(tmp_path):
    """Under `ulimit -n 100` (4 workers keep 128) serve refuses to start, naming the key, the
    limit and what to raise it to."""

    def tiny() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))

    ServerProcess(tmp_path)  # the config and the scripts
    done = subprocess.run([sys.executable, "-m", "remoterun", "serve", "--config",
                           str(tmp_path / "config.toml")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, preexec_fn=tiny)
    assert done.returncode == 2, done.stderr
    assert "config error: server.max_connections: RLIMIT_NOFILE is 100" in done.stderr
    assert "raise `ulimit -n` to at least 144" in done.stderr
