"""GET /openapi.json describes every REST route, and the live server never contradicts it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from aiohttp import web
from conftest import ServerProcess, make_settings

from remoterun.api.app import create_app
from remoterun.api.openapi import document

# PROTOCOL.md endpoints other work adds to the server; described already, fuzzed once routed.
ELSEWHERE = {("GET", "/readyz"), ("GET", "/audit"), ("GET", "/events"), ("GET", "/stats"),
             ("GET", "/nodes")}
NOT_REST = {"/ws", "/tasks/{id}/ws"}  # WebSocket: PROTOCOL.md's own section
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance,unsupported_method")
SAFE_SCRIPTS = {"hello.sh", "exit.sh", "lines.py", "quiet.sh", "schema.sh", "schema.sh.toml",
                "sub"}


def routed(tmp_path) -> set[tuple[str, str]]:
    """(method, path) of every route of the real app, static files aside."""
    app = create_app(make_settings(tmp_path))
    found = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path is None or route.method == "HEAD" or isinstance(
                route.resource, web.StaticResource):
            continue
        found.add((route.method, path))
    return found


def documented() -> set[tuple[str, str]]:
    """(method, path) of every operation of the document."""
    return {(method.upper(), path) for path, ops in document()["paths"].items()
            for method in ops}


def test_every_route_is_documented(tmp_path):
    """Each REST route of the app is in /openapi.json; only PROTOCOL.md's pending ones are not
    routed yet."""
    served = {r for r in routed(tmp_path) if r[1] not in NOT_REST}
    assert served - documented() == set()
    assert documented() - served <= ELSEWHERE


async def test_openapi_json_is_served(client):
    """GET /openapi.json is an OpenAPI 3.1 document naming the version, without a token."""
    response = await client.get("/openapi.json")
    body = await response.json()
    assert response.status == 200 and body["openapi"] == "3.1.0"
    assert body["info"]["version"] and "/tasks/{id}/output" in body["paths"]
    for op in (o for ops in body["paths"].values() for o in ops.values()):
        for code in op["responses"]:
            assert re.fullmatch(r"[1-5]\d\d", code), code


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_schemathesis_finds_no_5xx_and_no_contradiction(tmp_path):
    """schemathesis (examples, coverage, fuzzing, stateful links; bounded) against a live server."""
    server = ServerProcess(tmp_path)
    for path in (tmp_path / "scripts").iterdir():  # nothing that floods or sleeps for long
        if path.name not in SAFE_SCRIPTS:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    server.config.write_text(
        '[paths]\nscripts = "scripts"\narchive = "archive"\ndb = "rr.db"\n'
        "[engine]\nkill_grace_s = 0.5\ndefault_timeout_s = 5\n"
        # SSE streams end after 1 s (EventSource would resume): no request idles to the timeout
        "[server]\nshutdown_grace_s = 1\nstream_max_s = 1\n")
    server.start()
    try:
        pending = [arg for method, path in ELSEWHERE - routed(tmp_path)
                   for arg in ("--exclude-path", path)]
        ran = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
             "--checks", CHECKS, "--phases", "examples,coverage,fuzzing,stateful",
             "--max-examples", "25", "--seed", "15", "--workers", "1", "--no-color",
             "--request-timeout", "20", "--generation-database", "none", *pending],
            capture_output=True, text=True, timeout=360, cwd=tmp_path)
    finally:
        server.stop()
    assert ran.returncode == 0, ran.stdout[-6000:] + ran.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", ran.stdout), ran.stdout[-2000:]
