"""REST: submit, read, list, cancel, outcomes, params, and every kind of bad input."""

from __future__ import annotations

import json
import os
from pathlib import Path

from conftest import submit, wait_final, wait_for, ws_collect

from remoterun.api import SETTINGS


async def test_success_and_output(client):
    """A script that exits 0 ends `success`, and /output holds exactly what it wrote."""
    task = await submit(client, "lines.py", params={"n": 5})
    assert task["status"] == "pending" and task["attempt"] == 1
    done = await wait_final(client, task["id"])
    assert (done["status"], done["exit_code"], done["error"]) == ("success", 0, None)
    assert done["started_at"] and done["finished_at"] and done["output_bytes"] == 35
    body = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert body == "".join(f"line {i}\n" for i in range(1, 6))


async def test_location_header_and_get(client):
    """201 carries a Location that GET answers with the same task."""
    response = await client.post("/tasks", json={"script": "hello.sh"})
    assert response.status == 201
    task = await response.json()
    assert response.headers["Location"] == f"/tasks/{task['id']}"
    again = await (await client.get(response.headers["Location"])).json()
    assert again["id"] == task["id"] and again["script"] == "hello.sh"


async def test_failed_with_script_exit_code(client):
    """A non-zero exit ends `failed` with the script's own exit code."""
    task = await submit(client, "exit.sh", params={"code": 3})
    done = await wait_final(client, task["id"])
    assert (done["status"], done["exit_code"]) == ("failed", 3)


async def test_timeout_kills_the_process_group(client):
    """A script sleeping past its timeout ends `timeout`, and its children are gone too."""
    task = await submit(client, "sleep.sh", timeout=0.5)
    done = await wait_final(client, task["id"])
    assert done["status"] == "timeout" and done["exit_code"] < 0
    assert "timeout" in done["error"]
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    pids = [int(line.split()[1]) for line in out.splitlines() if line.split()[0] in
            ("child", "started")]
    assert len(pids) == 2
    # The pids it printed are its PID namespace's in a sandbox: look for its environment.
    from test_restart import tasks_with_env
    await wait_for(lambda: not tasks_with_env(task["id"]), 5, what="its processes gone")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(")")[-1].split()[0] != "Z"


async def test_cancel_running_then_conflict(client):
    """Cancelling a running task stops it (`cancelled`); cancelling again is 409."""
    task = await submit(client, "sleep.sh")
    await wait_for(lambda: _status(client, task["id"], "running"), what="running")
    response = await client.post(f"/tasks/{task['id']}/cancel")
    assert response.status == 200
    done = await wait_final(client, task["id"])
    assert done["status"] == "cancelled" and done["exit_code"] == -15
    response = await client.post(f"/tasks/{task['id']}/cancel")
    assert response.status == 409
    assert (await response.json())["error"] == "already_finished"


async def _status(client, task_id, status):
    return (await (await client.get(f"/tasks/{task_id}")).json())["status"] == status


async def test_cancel_pending(make_client):
    """A task still waiting for a worker is cancelled at once, without ever running."""
    client = await make_client(workers=1)
    blocker = await submit(client, "sleep.sh")
    waiting = await submit(client, "hello.sh")
    response = await client.post(f"/tasks/{waiting['id']}/cancel")
    task = await response.json()
    assert response.status == 200 and task["status"] == "cancelled"
    assert task["started_at"] is None and task["exit_code"] is None
    await client.post(f"/tasks/{blocker['id']}/cancel")
    await wait_final(client, blocker["id"])


async def test_params_as_env_and_args(client):
    """Free-form params arrive as RR_PARAM_<KEY> and --key=value, sorted by key, JSON scalars."""
    task = await submit(client, "args.py", params={"zeta": "a b", "alpha": 30, "mid": True,
                                                   "f": 30.5})
    await wait_final(client, task["id"])
    seen = json.loads(await (await client.get(f"/tasks/{task['id']}/output")).text())
    assert seen["argv"] == ["--alpha=30", "--f=30.5", "--mid=true", "--zeta=a b"]
    assert seen["env"]["RR_PARAM_ZETA"] == "a b" and seen["env"]["RR_PARAM_MID"] == "true"
    assert seen["env"]["RR_TASK_ID"] == task["id"] and seen["env"]["RR_ATTEMPT"] == "1"
    assert seen["cwd"] == str(client.server.app[SETTINGS].scripts_dir.resolve())


async def test_params_beyond_64_bits_and_unicode_round_trip(client):
    """A huge integer and non-ASCII text survive the REST body, the WS task frame and argv."""
    params = {"big": 2**70, "name": "naïve ✓"}
    task = await submit(client, "args.py", params=params)
    assert task["params"] == params
    frames = await ws_collect(await client.ws_connect(f"/tasks/{task['id']}/ws"))
    assert frames[0]["type"] == "task" and frames[0]["task"]["params"] == params
    await wait_final(client, task["id"])
    seen = json.loads(await (await client.get(f"/tasks/{task['id']}/output")).text())
    assert seen["argv"] == [f"--big={2**70}", "--name=naïve ✓"]


async def test_schema_defaults_order_and_secret(client):
    """A schema fills defaults, passes params in declared order, and hides secrets (a secret
    param is not an argument: tests/test_secrets.py follows it into the environment)."""
    task = await submit(client, "schema.sh", params={"token": "s3cret", "name": "ann"})
    assert task["params"]["token"] == "***"
    assert "s3cret" not in json.dumps(task)
    await wait_final(client, task["id"])
    out = await (await client.get(f"/tasks/{task['id']}/output")).text()
    assert out.splitlines() == [
        "name=ann count=2 loud=false mode=a",
        "args: --name=ann --count=2 --loud=false --mode=a",
    ]
    listed = await (await client.get("/tasks")).json()
    assert "s3cret" not in json.dumps(listed)


async def test_script_path_alias(client):
    """`script_path: /scripts/x` is accepted as an alias of `script: x`."""
    response = await client.post("/tasks", json={"script_path": "/scripts/sub/nested.sh"})
    assert response.status == 201
    assert (await response.json())["script"] == "sub/nested.sh"


async def test_list_filters_and_cursor(client):
    """GET /tasks is newest first, filters by status and script, and pages with a cursor."""
    ids = [(await submit(client, "hello.sh"))["id"] for _ in range(5)]
    failed = await submit(client, "exit.sh", params={"code": 1})
    for task_id in [*ids, failed["id"]]:
        await wait_final(client, task_id)
    page = await (await client.get("/tasks?limit=2&script=hello.sh")).json()
    assert [t["id"] for t in page["tasks"]] == ids[::-1][:2]
    rest = await (await client.get(f"/tasks?limit=10&script=hello.sh&cursor="
                                   f"{page['next_cursor']}")).json()
    assert [t["id"] for t in rest["tasks"]] == ids[::-1][2:] and rest["next_cursor"] is None
    only = await (await client.get("/tasks?status=failed")).json()
    assert [t["id"] for t in only["tasks"]] == [failed["id"]]
    for query in ("limit=0", "limit=501", "limit=x", "status=bogus", "cursor=-3"):
        response = await client.get(f"/tasks?{query}")
        assert response.status == 400, query
        assert (await response.json())["details"]


async def test_scripts_listing(client):
    """GET /scripts lists executable scripts (subfolders too) with schemas, and nothing else."""
    body = await (await client.get("/scripts")).json()
    names = [s["name"] for s in body["scripts"]]
    assert "hello.sh" in names and "sub/nested.sh" in names
    assert "notexec.sh" not in names and "schema.sh.toml" not in names
    schema = next(s for s in body["scripts"] if s["name"] == "schema.sh")
    params = {p["name"]: p for p in schema["params"]}
    assert params["mode"]["enum"] == ["a", "b"] and params["count"]["default"] == 2
    assert params["token"]["secret"] is True and params["name"]["required"] is True


async def test_healthz_and_metrics(client):
    """/healthz says ok; /metrics is Prometheus text that counts submissions."""
    response = await client.get("/healthz")
    assert response.status == 200 and (await response.json())["status"] == "ok"
    task = await submit(client, "hello.sh")
    await wait_final(client, task["id"])
    text = await (await client.get("/metrics")).text()
    assert 'remoterun_tasks_submitted_total{script="hello.sh"} 1.0' in text
    assert 'remoterun_tasks_finished_total{script="hello.sh",status="success"} 1.0' in text


# Bad input -----------------------------------------------------------------------------------

async def _count(client) -> int:
    return len((await (await client.get("/tasks?limit=500")).json())["tasks"])


async def _expect_error(client, status, body, code=None, raw=False):
    if raw:
        response = await client.post("/tasks", data=body,
                                     headers={"Content-Type": "application/json"})
    else:
        response = await client.post("/tasks", json=body)
    error = await response.json()
    assert response.status == status, error
    assert set(error) >= {"error", "message"} and error["message"]
    if code:
        assert error["error"] == code
    return error


async def test_malformed_json_and_wrong_shapes(client):
    """Malformed JSON, non-objects, unknown fields and wrong types: 400 naming each field."""
    await _expect_error(client, 400, b'{"script": "hello.sh"', "invalid_json", raw=True)
    await _expect_error(client, 400, b"\xff\xfe", "invalid_json", raw=True)
    await _expect_error(client, 400, ["hello.sh"])
    error = await _expect_error(client, 400, {"script": "hello.sh", "bogus": 1, "priority": "9",
                                              "pty": 1, "timeout": "soon"}, "invalid_request")
    assert {d["field"] for d in error["details"]} == {"bogus", "priority", "pty", "timeout"}
    await _expect_error(client, 400, {"script": "hello.sh", "priority": True})
    await _expect_error(client, 400, {"script": "hello.sh", "timeout": -1})
    await _expect_error(client, 400, {"script": "hello.sh", "max_retries": 999})
    await _expect_error(client, 400, {"params": {}})
    await _expect_error(client, 400, {"script": "hello.sh", "params": [1]})
    assert await _count(client) == 0


async def test_unknown_and_escaping_scripts(client, tmp_path):
    """Unknown names, `..`, absolute paths, symlinks out and non-executables: 404, nothing runs."""
    scripts = client.server.app[SETTINGS].scripts_dir
    outside = tmp_path / "outside.sh"
    outside.write_text("#!/bin/sh\necho escaped\n")
    outside.chmod(0o755)
    os.symlink(outside, scripts / "link_out.sh")
    os.symlink(tmp_path, scripts / "escape_dir")
    for name in ("nope.sh", "../outside.sh", "../../etc/passwd", "/etc/passwd",
                 str(outside), "link_out.sh", "escape_dir/outside.sh", "notexec.sh",
                 "schema.sh.toml", "sub/../../outside.sh", "", ".", "sub"):
        await _expect_error(client, 404, {"script": name}, "unknown_script")
    assert await _count(client) == 0


async def test_params_failing_schema(client):
    """Params that break the schema: 422 with a detail per field; free-form rules too."""
    error = await _expect_error(client, 422, {"script": "schema.sh", "params": {
        "name": "UPPER", "count": 9, "loud": "yes", "mode": "c", "extra": 1}}, "invalid_params")
    fields = {d["field"] for d in error["details"]}
    assert fields == {"params.name", "params.count", "params.loud", "params.mode",
                      "params.extra"}
    error = await _expect_error(client, 422, {"script": "schema.sh", "params": {}})
    assert error["details"] == [{"field": "params.name", "message": "required"}]
    await _expect_error(client, 422, {"script": "hello.sh", "params": {"bad-key": "x"}})
    await _expect_error(client, 422, {"script": "hello.sh", "params": {"k": {"nested": 1}}})
    await _expect_error(client, 422, {"script": "hello.sh", "params": {"k": None}})
    assert await _count(client) == 0


async def test_oversized_body(make_client):
    """A body over max_body_bytes is refused with 413 and a JSON error."""
    client = await make_client(max_body_bytes=1000)
    error = await _expect_error(client, 413, {"script": "hello.sh", "stdin": "x" * 5000},
                                "too_large")
    assert "1000" in error["message"]
    assert await _count(client) == 0


async def test_unknown_task_ids(client):
    """Unknown and malformed ids are 404 on every task route."""
    for path in ("/tasks/0f1c0000-0000-4000-8000-000000000000", "/tasks/not-a-uuid",
                 "/tasks/0f1c0000-0000-4000-8000-000000000000/output",
                 "/tasks/x/logs", "/tasks/x/ws"):
        response = await client.get(path)
        assert response.status == 404, path
        assert "error" in await response.json()
    response = await client.post("/tasks/0f1c0000-0000-4000-8000-000000000000/cancel")
    assert response.status == 404


async def test_spawn_failure_is_recorded(client):
    """A script the kernel cannot execute ends `failed` with a clear error; the worker lives on."""
    task = await submit(client, "noshebang.sh")
    done = await wait_final(client, task["id"])
    assert done["status"] == "failed" and "exec format error" in done["error"]
    after = await submit(client, "hello.sh")
    assert (await wait_final(client, after["id"]))["status"] == "success"


async def test_page_and_its_files_are_served(client):
    """/ serves the page; its own files are revalidated; unknown routes get a JSON 404."""
    page = await client.get("/")
    assert page.status == 200 and "xterm" in (await page.text()).lower()
    script = await client.get("/static/app.js")
    assert script.status == 200 and script.headers["Cache-Control"] == "no-cache"
    missing = await client.get("/no/such/route")
    assert missing.status == 404 and (await missing.json())["error"] == "not_found"
