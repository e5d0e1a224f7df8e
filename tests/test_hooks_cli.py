"""`remoterun hook ls` and `remoterun hook send` against a real server process (issue 30)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ServerProcess

CLI = [sys.executable, "-m", "remoterun"]
SECRET = "cli-hook-secret-123"
HOOKS = f"""
[[hooks]]
name = "hi"
script = "hello.sh"
signature = "github"
secrets = ["{SECRET}"]
delivery_header = "X-GitHub-Delivery"
mode = "wait"

[[hooks]]
name = "stamped"
script = "hello.sh"
signature = "hmac-sha256"
secrets = ["{SECRET}"]
signature_header = "X-Signature"
timestamp_header = "X-Timestamp"
"""


def cli(server: ServerProcess, *args: str, secret: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """Run `python -m remoterun ... --url URL` to its end, the secret in the environment."""
    env = {k: v for k, v in os.environ.items() if k != "REMOTERUN_HOOK_SECRET"}
    if secret is not None:
        env["REMOTERUN_HOOK_SECRET"] = secret
    return subprocess.run([*CLI, *args, "--url", server.url], capture_output=True, text=True,
                          timeout=60, env=env)


def test_hook_send_signs_as_the_hook_expects_and_hook_ls_lists(tmp_path):
    """`hook send` signs the body with $REMOTERUN_HOOK_SECRET as each hook expects (GitHub's
    header; a generic HMAC with its timestamp) and prints the answer; a wrong secret fails
    with the server's 401; `hook ls` shows the hooks and their last delivery."""
    server = ServerProcess(tmp_path, HOOKS)
    server.start()
    try:
        body = tmp_path / "push.json"
        body.write_text('{"ref": "refs/heads/main"}')
        sent = cli(server, "hook", "send", "hi", "--body", str(body), secret=SECRET)
        assert sent.returncode == 0, sent.stderr
        answer = json.loads(sent.stdout)
        assert answer["task"]["status"] == "success" and answer["output"] == "hello world\n"
        stamped = cli(server, "hook", "send", "stamped", "--body", str(body), secret=SECRET)
        assert stamped.returncode == 0 and json.loads(stamped.stdout)["triggered"] is True
        wrong = cli(server, "hook", "send", "hi", "--body", str(body), secret="not-it")
        assert wrong.returncode == 125 and "401 bad_signature" in wrong.stderr
        listed = cli(server, "hook", "ls")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].startswith("hi  hello.sh  github  wait  ") and "accepted" in lines[0]
        assert SECRET not in listed.stdout + sent.stdout + wrong.stderr
        assert SECRET not in server.log.read_text()
    finally:
        server.stop()
