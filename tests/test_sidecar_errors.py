"""A broken sidecar `<script>.toml` is seen, not silent: listed with its error, refused with 422,
and never stops the server (issue 27.2)."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import orjson
import pytest

BROKEN = [
    ("this = = not toml", "hello.sh.toml: not valid TOML"),
    ("timeout_s = -1", "hello.sh.toml.timeout_s: expected a positive number, got -1"),
    ("[params.n]\nenum = 5", "hello.sh.toml:"),
    ('sandbox = {mode = "none"}', "hello.sh.toml.sandbox.mode: 'none' is weaker"),  # issue 26
]


@pytest.mark.parametrize(("text", "named"), BROKEN)
async def test_broken_sidecar_is_listed_and_refused(client, settings, text, named):
    """While the server runs: /scripts lists the script with an error naming the file, key and
    problem (not runnable); a submission answers 422 with that text; others still run."""
    (settings.scripts_dir / "hello.sh.toml").write_text(text + "\n")
    listed = {s["name"]: s for s in (await (await client.get("/scripts")).json())["scripts"]}
    assert named in listed["hello.sh"]["error"]
    assert listed["hello.sh"]["runnable"] is False
    assert "error" not in listed["exit.sh"]
    response = await client.post("/tasks", json={"script": "hello.sh"})
    assert response.status == 422
    body = await response.json()
    assert body["error"] == "bad_metadata" and body["message"] == listed["hello.sh"]["error"]
    assert (await client.post("/tasks", json={"script": "exit.sh"})).status == 201


def get_json(url: str) -> dict:
    """GET a JSON body."""
    with urllib.request.urlopen(url, timeout=10) as response:
        return orjson.loads(response.read())


def test_broken_sidecar_does_not_stop_the_server(server):
    """At start: the server warns and serves; /scripts and `remoterun scripts` name the error."""
    (server.tmp_path / "scripts" / "hello.sh.toml").write_text("this = = not toml\n")
    server.start()
    listed = {s["name"]: s for s in get_json(f"{server.url}/scripts")["scripts"]}
    assert listed["hello.sh"]["error"].startswith("hello.sh.toml: not valid TOML")
    cli = subprocess.run([sys.executable, "-m", "remoterun", "scripts", "--url", server.url],
                         capture_output=True, text=True, timeout=30, check=True)
    (line,) = [x for x in cli.stdout.splitlines() if x.startswith("hello.sh ")]
    assert "ERROR: hello.sh.toml: not valid TOML" in line
    assert "script_metadata_invalid" in server.log.read_text()
