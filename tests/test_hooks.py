"""`POST /hooks/{name}` end to end (issue 30): real signed requests to the real app, the way
GitHub, GitLab and a generic HMAC sender sign them, computed here from the secret."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import structlog
from conftest import TOKENS, make_settings, wait_final

from remoterun.api import SETTINGS
from remoterun.api.app import create_app
from remoterun.api.openapi import document
from remoterun.config import Cluster, SandboxConfig
from remoterun.hooks import parse_hooks

SECRET, ROTATED = "github-secret-one", "github-secret-two"
GITLAB_SECRET, HMAC_SECRET = "gitlab-token-xyz", "hmac-secret-abc"
SECRETS = (SECRET, ROTATED, GITLAB_SECRET, HMAC_SECRET)
CONFIG = f"""
[[hooks]]
name = "deploy"
script = "hook_echo.sh"
signature = "github"
secrets = ["{SECRET}", "{ROTATED}"]
delivery_header = "X-GitHub-Delivery"
match = {{ "header:X-GitHub-Event" = ["push", "ping-push"], "body:ref" = "refs/heads/main" }}
params = {{ ref = "body:ref", repo = "body:repository.full_name", env = "query:env" }}

[[hooks]]
name = "lab"
script = "hook_echo.sh"
signature = "gitlab"
secrets = ["{GITLAB_SECRET}"]
params = {{ ref = "body:ref" }}
mode = "wait"
wait_s = 20

[[hooks]]
name = "generic"
script = "hook_echo.sh"
signature = "hmac-sha256"
secrets = ["{HMAC_SECRET}"]
signature_header = "X-Signature"
timestamp_header = "X-Timestamp"
max_age_s = 60
params = {{ ref = "body:ref", gate = "body:gate" }}
mode = "stream"

[[hooks]]
name = "slow"
script = "hook_echo.sh"
signature = "gitlab"
secrets = ["{GITLAB_SECRET}"]
params = {{ ref = "body:ref", gate = "body:gate" }}
mode = "wait"
wait_s = 0.3
"""
# Prints each param on a line of its own; with a gate, prints "first", waits for the gate
# file (a bounded poll in the script), then "second".
ECHO = """#!/bin/sh
printf 'ref=%s\\n' "$RR_PARAM_REF"
printf 'repo=%s\\n' "$RR_PARAM_REPO"
printf 'env=%s\\n' "$RR_PARAM_ENV"
if [ -n "$RR_PARAM_GATE" ]; then
  echo first
  i=0
  while [ ! -e "$RR_PARAM_GATE" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
  echo second
fi
"""
SIDECAR = """
[params.ref]
type = "string"
required = true
pattern = "refs/heads/[A-Za-z0-9._/-]+"
[params.repo]
type = "string"
default = "-"
[params.sha]
type = "string"
default = ""
[params.env]
type = "string"
enum = ["staging", "production"]
default = "staging"
[params.gate]
type = "string"
default = ""
"""
PUSH = {"ref": "refs/heads/main", "after": "0" * 40,
        "repository": {"full_name": "octo/site"}}
ADMIN = {"Authorization": "Bearer admin-token"}


def github(body: bytes, secret: str = SECRET, event: str = "push",
           delivery: str | None = None) -> dict[str, str]:
    """The headers GitHub sends: the raw body's HMAC-SHA256 as `sha256=<hex>`."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-GitHub-Event": event,
            "X-Hub-Signature-256": f"sha256={digest}",
            "X-GitHub-Delivery": delivery or str(uuid.uuid4())}


def generic(body: bytes, stamp: float | None = None) -> dict[str, str]:
    """A generic sender's headers: hex HMAC-SHA256 of "<timestamp>.<body>"."""
    sent = str(int(stamp if stamp is not None else time.time()))
    digest = hmac.new(HMAC_SECRET.encode(), sent.encode() + b"." + body,
                      hashlib.sha256).hexdigest()
    return {"Content-Type": "application/json", "X-Timestamp": sent, "X-Signature": digest}


def encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.fixture
async def hooked(aiohttp_client: Any, tmp_path: Path):
    """A factory of clients of the real app with CONFIG's hooks and the echo script, run
    unsandboxed: the gate files and the marker live in the test's own folder."""

    async def factory(**changes: Any) -> Any:
        settings = make_settings(tmp_path, hooks=parse_hooks(
            tomllib.loads(CONFIG)["hooks"], tmp_path), sandbox=SandboxConfig(mode="none"),
            **changes)
        script = settings.scripts_dir / "hook_echo.sh"
        script.write_text(ECHO)
        script.chmod(0o755)
        (settings.scripts_dir / "hook_echo.sh.toml").write_text(SIDECAR)
        return await aiohttp_client(create_app(settings))

    return factory


async def tasks_of(client: Any) -> list[dict[str, Any]]:
    response = await client.get("/tasks", headers=ADMIN)
    return (await response.json())["tasks"]  # type: ignore[no-any-return]


async def output(client: Any, task_id: str) -> str:
    response = await client.get(f"/tasks/{task_id}/output", headers=ADMIN)
    return await response.text()  # type: ignore[no-any-return]


async def audit_rows(client: Any, action: str) -> list[dict[str, Any]]:
    response = await client.get(f"/audit?action={action}&limit=500", headers=ADMIN)
    return (await response.json())["events"]  # type: ignore[no-any-return]


async def test_github_signed_push_starts_the_script_with_params_from_the_body(hooked):
    """A push payload signed as GitHub signs it answers 202 with the task; the script gets
    the params mapped from the body and the query, and the task is the hook's."""
    client = await hooked()
    body = encoded(PUSH)
    response = await client.post("/hooks/deploy?env=production", data=body,
                                 headers=github(body))
    answer = await response.json()
    assert response.status == 202, answer
    task = answer["task"]
    assert answer["triggered"] is True and response.headers["Location"] == f"/tasks/{task['id']}"
    assert task["submitted_by"] == "hook:deploy"
    assert task["params"]["ref"] == "refs/heads/main" and task["params"]["repo"] == "octo/site"
    assert (await wait_final(client, task["id"]))["status"] == "success"
    assert await output(client, task["id"]) == \
        "ref=refs/heads/main\nrepo=octo/site\nenv=production\n"
    [row] = await audit_rows(client, "hook")
    assert row["actor"] == "hook:deploy" and row["task_id"] == task["id"]
    assert "delivery" in row["detail"]


async def test_gitlab_token_starts_the_script_and_wait_returns_the_exit_and_output(hooked):
    """GitLab's X-Gitlab-Token equal to the secret starts the script; `wait` answers 200 once
    the task has ended, with its final status, exit code and output."""
    client = await hooked()
    body = encoded({"ref": "refs/heads/dev", "object_kind": "push"})
    response = await client.post("/hooks/lab", data=body, headers={
        "X-Gitlab-Token": GITLAB_SECRET, "Content-Type": "application/json"})
    answer = await response.json()
    assert response.status == 200, answer
    assert answer["task"]["status"] == "success" and answer["task"]["exit_code"] == 0
    assert answer["output"] == "ref=refs/heads/dev\nrepo=-\nenv=staging\n"


async def test_wait_past_wait_s_answers_202_as_async(hooked, tmp_path):
    """A `wait` hook whose task has not ended after wait_s answers 202 with the task."""
    client = await hooked()
    gate = tmp_path / "gate-slow"
    body = encoded({"ref": "refs/heads/main", "gate": str(gate)})
    response = await client.post("/hooks/slow", data=body, headers={
        "X-Gitlab-Token": GITLAB_SECRET, "Content-Type": "application/json"})
    answer = await response.json()
    assert response.status == 202 and answer["task"]["status"] in ("pending", "running")
    gate.touch()
    assert (await wait_final(client, answer["task"]["id"]))["status"] == "success"


async def test_stream_delivers_the_first_line_while_the_script_still_runs(hooked, tmp_path):
    """A `stream` hook (generic HMAC over "<timestamp>.<body>") answers text/plain with the
    task's id, and the first line arrives while the script still waits; the rest, in
    order, once it goes on; the body ends when the task ends."""
    client = await hooked()
    gate = tmp_path / "gate-stream"
    body = encoded({"ref": "refs/heads/main", "gate": str(gate)})
    response = await client.post("/hooks/generic", data=body, headers=generic(body))
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    task_id = response.headers["X-RemoteRun-Task"]
    received = b""
    while b"first\n" not in received:
        received += await response.content.readany()
    assert not gate.exists()
    task = await (await client.get(f"/tasks/{task_id}")).json()
    assert task["status"] == "running"  # the first line came before the script went on
    gate.touch()
    received += await response.content.read()
    assert received == b"ref=refs/heads/main\nrepo=-\nenv=staging\nfirst\nsecond\n"
    assert (await wait_final(client, task_id))["status"] == "success"


@pytest.mark.parametrize("case", ["byte_changed", "wrong_secret", "missing", "no_prefix"])
async def test_a_bad_signature_is_401_starts_nothing_and_is_audited(hooked, case):
    """A changed byte, a wrong secret, no signature or a bare hex digest: the same 401
    `bad_signature` (not saying which), a `hook_denied` row with the reason, no task."""
    client = await hooked()
    body = encoded(PUSH)
    headers = github(body, secret="not-the-secret" if case == "wrong_secret" else SECRET)
    if case == "byte_changed":
        body = body.replace(b"main", b"mail")
    if case == "missing":
        del headers["X-Hub-Signature-256"]
    if case == "no_prefix":
        headers["X-Hub-Signature-256"] = headers["X-Hub-Signature-256"][7:]
    response = await client.post("/hooks/deploy", data=body, headers=headers)
    assert response.status == 401
    assert await response.json() == {"error": "bad_signature",
                                     "message": "the request is not signed as this hook expects"}
    assert await tasks_of(client) == []
    [row] = await audit_rows(client, "hook_denied")
    assert row["result"] == "bad_signature" and row["detail"].startswith("deploy: signature")


async def test_a_stale_or_future_timestamp_is_401(hooked):
    """The generic HMAC hook refuses a signed request whose timestamp is outside max_age_s,
    and one whose timestamp was changed after signing."""
    client = await hooked()
    body = encoded({"ref": "refs/heads/main"})
    for stamp in (time.time() - 120, time.time() + 120):
        response = await client.post("/hooks/generic", data=body, headers=generic(body, stamp))
        assert response.status == 401
    headers = generic(body)
    headers["X-Timestamp"] = str(int(headers["X-Timestamp"]) + 1)
    response = await client.post("/hooks/generic", data=body, headers=headers)
    assert response.status == 401
    assert await tasks_of(client) == []
    rows = await audit_rows(client, "hook_denied")
    assert any("timestamp outside" in r["detail"] for r in rows)


async def test_a_rotated_secret_signs_too(hooked):
    """Either secret of the hook's list is accepted (rotation)."""
    client = await hooked()
    body = encoded(PUSH)
    response = await client.post("/hooks/deploy", data=body, headers=github(body, ROTATED))
    assert response.status == 202


async def test_a_redelivered_id_returns_the_first_task(hooked):
    """The same delivery id again answers the first task with `duplicate`; no second run."""
    client = await hooked()
    body = encoded(PUSH)
    headers = github(body, delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    first = await (await client.post("/hooks/deploy", data=body, headers=headers)).json()
    response = await client.post("/hooks/deploy", data=body, headers=headers)
    again = await response.json()
    assert response.status == 202 and again["duplicate"] is True
    assert again["task"]["id"] == first["task"]["id"]
    assert [t["id"] for t in await tasks_of(client)] == [first["task"]["id"]]
    other = github(body, delivery="another-delivery")
    assert (await client.post("/hooks/deploy", data=body, headers=other)).status == 202
    assert len(await tasks_of(client)) == 2


async def test_the_same_delivery_sent_twice_at_once_runs_once(hooked):
    """Two copies of one delivery at the same moment: one task, the other answer its
    duplicate (the lookup and the task's creation are one step per hook)."""
    client = await hooked()
    body = encoded(PUSH)
    headers = github(body, delivery="sent-twice")
    answers = await asyncio.gather(*(client.post("/hooks/deploy", data=body, headers=headers)
                                     for _ in range(2)))
    bodies = [await a.json() for a in answers]
    assert [a.status for a in answers] == [202, 202]
    assert sorted(b.get("duplicate", False) for b in bodies) == [False, True]
    assert bodies[0]["task"]["id"] == bodies[1]["task"]["id"]
    assert len(await tasks_of(client)) == 1


async def test_a_match_miss_starts_nothing_and_names_the_key(hooked):
    """A header or body value that `match` does not accept: 200 `triggered: false` with the
    key; a value of its list of accepted ones runs."""
    client = await hooked()
    body = encoded(PUSH)
    missed = github(body, event="issues", delivery="missed-1")
    response = await client.post("/hooks/deploy", data=body, headers=missed)
    assert response.status == 200
    assert await response.json() == {"triggered": False, "reason": "header:X-GitHub-Event"}
    again = await client.post("/hooks/deploy", data=body, headers=missed)
    assert again.status == 200 and await again.json() == {
        "triggered": False, "reason": "header:X-GitHub-Event", "duplicate": True}
    other = encoded({**PUSH, "ref": "refs/heads/feature"})
    response = await client.post("/hooks/deploy", data=other, headers=github(other))
    assert (await response.json())["reason"] == "body:ref"
    assert await tasks_of(client) == []
    response = await client.post("/hooks/deploy", data=body,
                                 headers=github(body, event="ping-push"))
    assert response.status == 202


@pytest.mark.parametrize(("body", "query", "field"), [
    (PUSH, "?env=staging;id", "params.env"),  # a shell metacharacter in an enum field
    ({**PUSH, "repository": {"full_name": {"nested": 1}}}, "", "params.repo"),  # not a string
])
async def test_params_that_break_the_schema_are_422_and_nothing_runs(hooked, body, query,
                                                                      field):
    """Mapped params are checked by the script's schema like any submission's: 422
    `invalid_params` naming the field, and no task."""
    client = await hooked()
    raw = encoded(body)
    response = await client.post(f"/hooks/deploy{query}", data=raw, headers=github(raw))
    answer = await response.json()
    assert response.status == 422 and answer["error"] == "invalid_params"
    assert [d["field"] for d in answer["details"]] == [field]
    assert await tasks_of(client) == []


async def test_a_pattern_failure_is_422(hooked):
    """A body value that fails the param's pattern (no `match` on it) is refused with 422."""
    client = await hooked()
    body = encoded({"ref": "refs/tags/$(id)"})
    response = await client.post("/hooks/lab", data=body, headers={
        "X-Gitlab-Token": GITLAB_SECRET, "Content-Type": "application/json"})
    answer = await response.json()
    assert response.status == 422 and answer["details"][0]["field"] == "params.ref"
    assert await tasks_of(client) == []


async def test_shell_metacharacters_arrive_intact_as_the_variable(hooked, tmp_path):
    """A value full of shell syntax reaches the script's environment byte for byte: nothing
    on the way runs it."""
    client = await hooked()
    marker = tmp_path / "pwned"
    nasty = f"o/s'; touch {marker}; echo \"$(touch {marker})\" `touch {marker}` | && $HOME"
    body = encoded({**PUSH, "repository": {"full_name": nasty}})
    response = await client.post("/hooks/deploy", data=body, headers=github(body))
    task = (await response.json())["task"]
    assert (await wait_final(client, task["id"]))["status"] == "success"
    assert f"repo={nasty}\n" in await output(client, task["id"])
    assert not marker.exists()


async def test_unknown_hook_is_404_and_a_body_over_the_limit_is_413(hooked):
    """An unknown name answers 404 `unknown_hook`; a body over server.max_body_bytes, 413."""
    client = await hooked(max_body_bytes=1024)
    body = encoded(PUSH)
    response = await client.post("/hooks/nope", data=body, headers=github(body))
    assert response.status == 404 and (await response.json())["error"] == "unknown_hook"
    big = encoded({**PUSH, "padding": "x" * 4096})
    response = await client.post("/hooks/deploy", data=big, headers=github(big))
    assert response.status == 413
    assert await tasks_of(client) == []


async def test_hooks_need_no_token_but_refuse_a_foreign_origin(hooked):
    """With tokens on, a signed request needs no token; a browser's cross-site one is still
    403 `bad_origin`; every other route still asks for a token."""
    client = await hooked(tokens=TOKENS)
    body = encoded(PUSH)
    response = await client.post("/hooks/deploy", data=body, headers=github(body))
    assert response.status == 202
    foreign = {**github(body), "Origin": "https://evil.example"}
    response = await client.post("/hooks/deploy", data=body, headers=foreign)
    assert response.status == 403 and (await response.json())["error"] == "bad_origin"
    assert (await client.get("/hooks")).status == 401
    assert (await client.post("/tasks", json={"script": "hello.sh"})).status == 401


async def test_failed_signatures_count_against_the_address_budget(hooked):
    """Past server.auth_fail_limit failures a wrong signature answers 429; a right one is
    still served."""
    client = await hooked(auth_fail_limit=3)
    body = encoded(PUSH)
    bad = github(body, secret="wrong-secret")
    statuses = [(await client.post("/hooks/deploy", data=body, headers=bad)).status
                for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    assert (await client.post("/hooks/deploy", data=body, headers=github(body))).status == 202


async def test_a_flood_of_bad_signatures_writes_bounded_audit_rows(hooked):
    """Bad signatures from one address write at most one `hook_denied` row a second (the
    others are counted for a summary row: audit.Denials)."""
    client = await hooked(auth_fail_limit=1000)
    body = encoded(PUSH)
    bad = github(body, secret="wrong-secret")
    for _ in range(30):
        assert (await client.post("/hooks/deploy", data=body, headers=bad)).status == 401
    assert len(await audit_rows(client, "hook_denied")) <= 3


async def test_no_secret_in_answers_logs_audit_or_listing(hooked):
    """No secret appears in any answer, log line (structlog), audit row, the hooks' listing
    or the settings' repr, through accepted, denied and skipped requests."""
    client = await hooked()
    seen: list[str] = []
    with structlog.testing.capture_logs() as logs:
        body = encoded(PUSH)
        for headers in (github(body), github(body, "bad-secret"), github(body, event="x"),
                        {"X-Gitlab-Token": "guess", "Content-Type": "application/json"}):
            for name in ("deploy", "lab"):
                response = await client.post(f"/hooks/{name}", data=body, headers=headers)
                seen.append(await response.text())
        seen.append(await (await client.get("/hooks", headers=ADMIN)).text())
        seen.append(await (await client.get("/audit?limit=500", headers=ADMIN)).text())
        seen.append(await (await client.get("/metrics", headers=ADMIN)).text())
    seen.append(repr(client.app[SETTINGS]))
    seen.append(json.dumps(logs, default=str))
    text = "\n".join(seen)
    assert "hook_denied" in text and "deploy" in text
    for secret in SECRETS:
        assert secret not in text


async def test_get_hooks_lists_hooks_and_their_deliveries(hooked):
    """GET /hooks (operator or admin) shows each hook's name, script, signature kind and
    mode, and its latest deliveries with their results and tasks."""
    client = await hooked(tokens=TOKENS)
    body = encoded(PUSH)
    headers = github(body, delivery="d-1")
    task = (await (await client.post("/hooks/deploy", data=body, headers=headers)).json())["task"]
    await client.post("/hooks/deploy", data=body, headers=github(body, event="x",
                                                                  delivery="d-2"))
    viewer = {"Authorization": "Bearer viewer-token"}
    assert (await client.get("/hooks", headers=viewer)).status == 403
    response = await client.get("/hooks", headers={"Authorization": "Bearer operator-token"})
    hooks = {h["name"]: h for h in (await response.json())["hooks"]}
    assert set(hooks) == {"deploy", "lab", "generic", "slow"}
    deploy = hooks["deploy"]
    assert deploy["script"] == "hook_echo.sh" and deploy["signature"] == "github"
    assert deploy["mode"] == "async" and "secrets" not in deploy
    assert [(d["delivery_id"], d["result"], d["task_id"]) for d in deploy["deliveries"]] == [
        ("d-2", "skipped", None), ("d-1", "accepted", task["id"])]


async def test_the_metric_counts_requests_by_hook_and_result(hooked):
    """remoterun_hook_requests_total{hook,result} counts accepted and denied requests."""
    client = await hooked()
    body = encoded(PUSH)
    await client.post("/hooks/deploy", data=body, headers=github(body))
    await client.post("/hooks/deploy", data=body, headers=github(body, "bad"))
    text = await (await client.get("/metrics")).text()
    assert 'remoterun_hook_requests_total{hook="deploy",result="accepted"} 1.0' in text
    assert 'remoterun_hook_requests_total{hook="deploy",result="denied"} 1.0' in text


async def test_github_form_encoded_payload_is_read(hooked):
    """GitHub's other content type (a form with a `payload` field) is signed over the raw
    form body and read like the JSON one."""
    client = await hooked()
    body = urlencode({"payload": json.dumps(PUSH)}).encode()
    headers = {**github(body), "Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post("/hooks/deploy", data=body, headers=headers)
    answer = await response.json()
    assert response.status == 202 and answer["task"]["params"]["repo"] == "octo/site"


def test_openapi_lists_the_hook_routes():
    """The OpenAPI document describes POST /hooks/{name} and GET /hooks."""
    paths = document()["paths"]
    assert "post" in paths["/hooks/{name}"] and "get" in paths["/hooks"]
    assert {"200", "202", "401", "404", "413", "422"} <= set(paths["/hooks/{name}"]["post"]
                                                             ["responses"])


@pytest.mark.slow
async def test_a_hook_on_a_cluster_node_runs_once_per_delivery(hooked, engines):
    """On a cluster node (real PostgreSQL and Redis) a signed delivery runs through the
    claim queue, and the same delivery twice at once still makes one task."""
    _, redis_server, url = engines
    client = await hooked(cluster=Cluster(database_url=url, redis_url=redis_server.url,
                                          node="n1"))
    body = encoded(PUSH)
    headers = github(body, delivery="cluster-delivery")
    answers = await asyncio.gather(*(client.post("/hooks/deploy", data=body, headers=headers)
                                     for _ in range(2)))
    bodies = [await a.json() for a in answers]
    assert [a.status for a in answers] == [202, 202], bodies
    assert bodies[0]["task"]["id"] == bodies[1]["task"]["id"]
    assert (await wait_final(client, bodies[0]["task"]["id"], timeout=30))["status"] == "success"
    assert len(await tasks_of(client)) == 1
