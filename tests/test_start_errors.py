"""A script that cannot start says what to do: CRLF #! line, missing interpreter, not executable
(issue 27.3)."""

from __future__ import annotations

import pytest
from conftest import submit, wait_final

CASES = [
    ("crlf.sh", b"#!/bin/sh\r\necho hi\r\n", "Windows line endings (CRLF)", "sed -i"),
    ("nointerp.sh", b"#!/usr/bin/no-such-shell\necho hi\n", "'/usr/bin/no-such-shell'",
     "install it or fix the #! line"),
]


@pytest.mark.parametrize(("name", "body", "why", "todo"), CASES)
async def test_script_that_cannot_start_is_named(client, settings, name, body, why, todo):
    """It ends failed with exit 127 and an error naming the cause and the fix; no retry."""
    script = settings.scripts_dir / name
    script.write_bytes(body)
    script.chmod(0o755)
    task = await submit(client, name, max_retries=2)
    final = await wait_final(client, task["id"])
    assert final["status"] == "failed" and final["exit_code"] == 127, final
    assert why in final["error"] and todo in final["error"], final["error"]
    assert final["attempt"] == 1


async def test_not_executable_says_chmod(client, settings):
    """A file without the x bit: a 404 whose message says chmod +x."""
    response = await client.post("/tasks", json={"script": "notexec.sh"})
    assert response.status == 404
    body = await response.json()
    assert body["error"] == "unknown_script" and "chmod +x" in body["message"]
