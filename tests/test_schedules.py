"""Schedules end to end (issue 29): the REST API as PROTOCOL.md says, slots that start their
script once with `schedule` and `scheduled_for`, overlap, catch-up after a restart, a slot
never started twice, pause/resume/run now, audit rows and metrics. Real app, real SQLite."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from aiohttp import web
from conftest import TOKENS, wait_final, wait_for

from remoterun.api.schedules import SCHEDULES
from remoterun.config import Alert

OPS = {"Authorization": "Bearer operator-token"}
ADMIN = {"Authorization": "Bearer admin-token"}


async def create(client, **fields):
    """POST /schedules; the created schedule (asserts 201)."""
    body = {"name": "tick", "script": "hello.sh", "every": "1s", **fields}
    response = await client.post("/schedules", json=body)
    assert response.status == 201, await response.text()
    return await response.json()


async def runs(client, name="tick", limit=100):
    """The slot records of a schedule, newest first."""
    response = await client.get(f"/schedules/{name}/runs?limit={limit}")
    assert response.status == 200, await response.text()
    return (await response.json())["runs"]


async def outcomes(client, name="tick"):
    """The outcomes of a schedule's slots, oldest first."""
    return [r["outcome"] for r in reversed(await runs(client, name))]


async def test_crud_and_fields(client):
    """Create, read, list, change and delete an API schedule, each answering its JSON."""
    response = await client.post("/schedules", json={
        "name": "nightly", "script": "hello.sh", "cron": "30 2 * * *",
        "timezone": "Asia/Shanghai"})
    assert response.status == 201, await response.text()
    made = await response.json()
    assert made["source"] == "api" and made["paused"] is False and made["last"] is None
    assert made["overlap"] == "forbid" and made["catch_up"] == "latest"
    assert len(made["next_runs"]) == 5
    assert all(r.endswith("T18:30:00.000Z") for r in made["next_runs"])  # 02:30 at +08:00
    listed = await (await client.get("/schedules")).json()
    assert [s["name"] for s in listed["schedules"]] == ["nightly"]
    response = await client.patch("/schedules/nightly", json={"cron": "0 3 * * *"})
    assert response.status == 200, await response.text()
    assert (await response.json())["next_runs"][0].endswith("T19:00:00.000Z")
    again = await client.post("/schedules", json={"name": "nightly", "script": "hello.sh",
                                                  "cron": "* * * * *"})
    assert again.status == 409 and (await again.json())["error"] == "schedule_exists"
    assert (await client.delete("/schedules/nightly")).status == 204
    gone = await client.get("/schedules/nightly")
    assert gone.status == 404 and (await gone.json())["error"] == "unknown_schedule"


async def test_validation_names_the_field(client):
    """A bad cron, an unknown zone, an unknown script, params failing the script's schema,
    both or neither of cron and every: 422 invalid_schedule with `details` naming each."""
    cases = [({"cron": "61 * * * *"}, "cron"),
             ({"cron": "* * * * *", "timezone": "Mars/Olympus"}, "timezone"),
             ({"cron": "* * * * *", "script": "nosuch.sh"}, "script"),
             ({"cron": "* * * * *", "script": "schema.sh", "params": {"name": "NO"}}, "params"),
             ({"cron": "* * * * *", "every": "1m"}, "cron"),
             ({}, "cron"),
             ({"every": "soon"}, "every")]
    for extra, field in cases:
        body = {"name": "bad", "script": "hello.sh", **extra}
        response = await client.post("/schedules", json=body)
        assert response.status == 422, (extra, await response.text())
        answer = await response.json()
        assert answer["error"] == "invalid_schedule", answer
        assert field in [d["field"] for d in answer["details"]], answer


async def test_a_schedule_runs_its_script_with_its_fields(client):
    """Each 1-second slot starts one task carrying schedule and scheduled_for, submitted by
    schedule:<name>, with RR_SCHEDULE and RR_SCHEDULED_FOR in its environment."""
    await create(client, script="probe.py", params={})
    started = await wait_for(lambda: _started(client, 2), timeout=10, what="two started slots")
    task = await wait_final(client, started[0]["task_id"])
    assert task["schedule"] == "tick" and task["submitted_by"] == "schedule:tick"
    assert task["scheduled_for"] == started[0]["slot"]
    assert task["scheduled_for"].endswith(".000Z")
    ids = [r["task_id"] for r in started]
    assert len(ids) == len(set(ids))
    plain = await (await client.post("/tasks", json={"script": "hello.sh"})).json()
    assert plain["schedule"] is None and plain["scheduled_for"] is None


async def _started(client, count):
    found = [r for r in await runs(client) if r["outcome"] == "started"]
    return found[::-1] if len(found) >= count else None


async def test_forbid_skips_a_slot_while_the_previous_runs(client):
    """overlap = forbid: a slot during a slow run is recorded skipped_overlap with the running
    task's id, and starts nothing."""
    await create(client, script="sleep.sh", params={"seconds": "3"})
    rows = await wait_for(lambda: _with(client, "skipped_overlap"), timeout=10,
                          what="a skipped slot")
    first = next(r for r in rows if r["outcome"] == "started")
    skipped = next(r for r in rows if r["outcome"] == "skipped_overlap")
    assert skipped["task_id"] == first["task_id"] and first["task_id"] in skipped["reason"]


async def _with(client, outcome):
    rows = await runs(client)
    return rows if any(r["outcome"] == outcome for r in rows) else None


async def test_replace_cancels_the_previous_run(client):
    """overlap = replace: the previous run is cancelled and the slot starts a new task."""
    await create(client, script="sleep.sh", params={"seconds": "30"}, overlap="replace")
    rows = await wait_for(lambda: _with(client, "replaced"), timeout=10, what="a replaced slot")
    replaced = next(r for r in rows if r["outcome"] == "replaced")
    first = [r for r in rows if r["task_id"] and r["task_id"] != replaced["task_id"]][-1]
    old = await wait_final(client, first["task_id"])
    assert old["status"] == "cancelled"
    assert first["task_id"] in replaced["reason"]
    await client.post("/schedules/tick/pause")


async def test_queue_starts_the_slot_when_the_previous_ends(client):
    """overlap = queue: a slot during a run is recorded queued, then started (with its own
    task) once the run ended, never alongside it."""
    await create(client, script="sleep.sh", params={"seconds": "2"}, overlap="queue")
    queued = await wait_for(lambda: _queued_with_task(client), timeout=15,
                            what="a queued slot that started")
    await client.post("/schedules/tick/pause")
    rows = await runs(client)
    first = next(r for r in reversed(rows) if r["outcome"] == "started")
    before = await wait_final(client, first["task_id"])
    after = await wait_final(client, queued["task_id"])
    assert after["started_at"] >= before["finished_at"]
    assert after["scheduled_for"] == queued["slot"]


async def _queued_with_task(client):
    rows = await runs(client)
    return next((r for r in rows if r["outcome"] == "queued" and r["task_id"]), None)


async def test_allow_runs_alongside(client):
    """overlap = allow: slots start while the previous run still runs."""
    await create(client, script="sleep.sh", params={"seconds": "30"}, overlap="allow")
    rows = await wait_for(lambda: _started(client, 2), timeout=10, what="two started slots")
    await client.post("/schedules/tick/pause")
    for row in rows:
        task = await (await client.get(f"/tasks/{row['task_id']}")).json()
        await client.post(f"/tasks/{task['id']}/cancel")
    assert "skipped_overlap" not in await outcomes(client)


async def test_pause_resume_and_run_now(make_client):
    """Paused: nothing starts and nothing is recorded; run now submits one task (no slot) even
    paused; resume starts slots again from then on. Each writes its audit row."""
    client = await make_client(tokens=TOKENS)
    client.session.headers.update(ADMIN)
    await create(client)
    await wait_for(lambda: _started(client, 1), timeout=10, what="a started slot")
    paused = await (await client.post("/schedules/tick/pause")).json()
    assert paused["paused"] is True
    before = len(await runs(client))
    response = await client.post("/schedules/tick/run")
    assert response.status == 201, await response.text()
    task = await response.json()
    assert task["schedule"] == "tick" and task["scheduled_for"] is None
    await wait_final(client, task["id"])
    assert len(await runs(client)) <= before + 1  # at most a slot decided before the pause
    settled = len(await runs(client))
    resumed_at = time.time()
    assert (await (await client.post("/schedules/tick/resume")).json())["paused"] is False
    later = await wait_for(lambda: _more(client, settled), timeout=10, what="slots again")
    assert all(_seconds(r["slot"]) > resumed_at - 1 for r in later[:len(later) - settled])
    actions = [e["action"] for e in (await (await client.get("/audit")).json())["events"]]
    for action in ("schedule_create", "schedule_pause", "schedule_run", "schedule_resume"):
        assert action in actions, actions
    run_row = next(e for e in (await (await client.get("/audit?action=schedule_run")).json())
                   ["events"])
    assert run_row["task_id"] == task["id"]


async def _more(client, count):
    rows = await runs(client)
    return rows if len(rows) > count else None


def _seconds(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_metrics_count_outcomes_and_lag(client):
    """remoterun_schedule_runs_total counts slots by outcome; the lag histogram observes each
    slot task's first start."""
    await create(client)
    rows = await wait_for(lambda: _started(client, 1), timeout=10, what="a started slot")
    await wait_final(client, rows[0]["task_id"])
    text = await (await client.get("/metrics")).text()
    assert 'remoterun_schedule_runs_total{outcome="started",schedule="tick"}' in text
    assert "remoterun_schedule_lag_seconds_count 1" in text or \
        "remoterun_schedule_lag_seconds_count 2" in text or \
        "remoterun_schedule_lag_seconds_count" in text


async def test_restart_records_missed_slots_and_runs_the_latest(make_client, tmp_path):
    """The server stopped for a few 1-second slots and started again: catch_up = latest runs
    only the newest missed slot and records the others missed; none of them is lost."""
    first = await make_client()
    await create(first, name="latest", catch_up="latest")
    await create(first, name="nothing", catch_up="none")
    await wait_for(lambda: _any_started(first, "latest"), timeout=10, what="a slot")
    await first.close()
    stopped = time.time()
    await wait_for(lambda: time.time() > stopped + 4, timeout=10, what="four slots to pass")
    second = await make_client()
    latest = await wait_for(lambda: _after(second, "latest", stopped + 5), timeout=10,
                            what="slots after the restart")
    down = [r for r in latest if stopped < _seconds(r["slot"]) <= stopped + 3.5]
    assert down and all(r["outcome"] == "missed" for r in down[1:]), latest
    gap = [r for r in reversed(await runs(second, "latest")) if _seconds(r["slot"]) > stopped]
    slots = [_seconds(r["slot"]) for r in gap]
    steps = [b - a for a, b in zip(slots, slots[1:], strict=False)]
    assert slots == sorted(slots) and set(steps) <= {1.0}, slots
    caught = [r for r in gap if r["outcome"] == "started"]
    missed = [r for r in gap if r["outcome"] == "missed"]
    assert len(missed) >= 3 and caught, gap
    nothing = [r for r in reversed(await runs(second, "nothing"))
               if _seconds(r["slot"]) > stopped]
    assert nothing[0]["outcome"] == "missed"


async def _any_started(client, name):
    return any(r["outcome"] == "started" for r in await runs(client, name))


async def _after(client, name, instant):
    rows = await runs(client, name, 500)
    return rows if any(_seconds(r["slot"]) > instant for r in rows) else None


async def test_two_timers_never_start_a_slot_twice(make_client):
    """Two apps on one database, each with a timer, race for the same 1-second slots (with
    overlap = allow): every slot is recorded once and starts one task, never two."""
    one = await make_client(workers=8)
    two = await make_client(workers=8)
    await create(one, script="hello.sh", overlap="allow")
    await two.app[SCHEDULES].load()  # as a cluster node would on its next look
    rows = await wait_for(lambda: _started(one, 5), timeout=15, what="five started slots")
    await one.post("/schedules/tick/pause")
    tasks = (await (await one.get("/tasks?limit=500")).json())["tasks"]
    by_slot: dict[str, int] = {}
    for task in tasks:
        if task["scheduled_for"]:
            by_slot[task["scheduled_for"]] = by_slot.get(task["scheduled_for"], 0) + 1
    assert by_slot and all(n == 1 for n in by_slot.values()), by_slot
    assert len({r["slot"] for r in rows}) == len(rows)


async def test_config_schedule_is_read_only_but_pausable(make_client):
    """A [[schedules]] table is listed with source config; PATCH and DELETE answer 409
    defined_in_config; pause works."""
    client = await make_client(schedules=({"name": "cfg", "script": "hello.sh",
                                           "cron": "0 0 1 1 *"},))
    listed = (await (await client.get("/schedules")).json())["schedules"]
    assert [(s["name"], s["source"]) for s in listed] == [("cfg", "config")]
    for method in (client.patch, client.delete):
        kwargs = {"json": {"priority": 1}} if method == client.patch else {}
        response = await method("/schedules/cfg", **kwargs)
        assert response.status == 409 and (await response.json())["error"] == \
            "defined_in_config"
    assert (await (await client.post("/schedules/cfg/pause")).json())["paused"] is True


async def test_failed_to_submit_is_recorded_and_alerted(make_client, aiohttp_server, tmp_path):
    """A slot whose script is gone is recorded failed_to_submit with the reason, and a
    webhook asking for failed_to_submit is sent one message for it (de-duplicated)."""
    got: list[dict] = []

    async def receive(request):
        got.append(await request.json())
        return web.json_response({})

    hook_app = web.Application()
    hook_app.router.add_post("/hook", receive)
    hook = await aiohttp_server(hook_app)
    alert = Alert(kind="webhook", url=str(hook.make_url("/hook")), dedupe_s=60,
                  on=("failed_to_submit", "missed"))
    client = await make_client(alerts=(alert,))
    await create(client, script="quiet.sh")
    await wait_for(lambda: _started(client, 1), timeout=10, what="a started slot")
    (tmp_path / "scripts" / "quiet.sh").unlink()
    rows = await wait_for(lambda: _with(client, "failed_to_submit"), timeout=20,
                          what="a failed slot")
    failed = next(r for r in rows if r["outcome"] == "failed_to_submit")
    assert failed["task_id"] is None and failed["reason"]
    await wait_for(lambda: got, timeout=10, what="the alert")
    assert got[0]["event"] == "failed_to_submit"
    assert got[0]["task"]["schedule"] == "tick" and got[0]["task"]["scheduled_for"]


async def test_a_changed_timing_counts_slots_from_the_change(client):
    """PATCHing a yearly schedule to every second starts from the change: the seconds that
    passed since its creation are not its slots, so none is recorded missed."""
    await create(client, every=None, cron="0 0 1 1 *")
    made = time.time()
    await wait_for(lambda: time.time() > made + 4, timeout=10, what="four seconds")
    response = await client.patch("/schedules/tick", json={"every": "1s"})
    assert response.status == 200, await response.text()
    await wait_for(lambda: _started(client, 2), timeout=10, what="two started slots")
    assert "missed" not in await outcomes(client)


async def test_an_injected_clock_records_months_of_missed_slots_across_dst(client):
    """The timer on an injected clock three months ahead (the server "down" meanwhile): every
    daily slot of 02:30 New York time is recorded, the newest runs (catch_up = latest), and
    the spring-forward day's slot is 03:00 EDT, the first instant after the gap."""
    await create(client, every=None, cron="30 2 * * *", timezone="America/New_York",
                 catch_up_window_s=10**8)
    timer = client.app[SCHEDULES]
    later = datetime(2027, 3, 16, 12, tzinfo=UTC).timestamp()
    timer.clock = lambda: later
    timer.wake()
    rows = await wait_for(lambda: _reached(client, "2027-03-16T06:30:00.000Z"), timeout=20,
                          what="the slots up to the clock")
    by_slot = {r["slot"]: r["outcome"] for r in rows}
    assert by_slot["2027-03-13T07:30:00.000Z"] == "missed"  # 02:30 EST
    assert by_slot["2027-03-14T07:00:00.000Z"] == "missed"  # 02:30 does not exist: 03:00 EDT
    assert by_slot["2027-03-16T06:30:00.000Z"] == "started"  # 02:30 EDT, the newest
    assert [o for o in by_slot.values() if o != "missed"] == ["started"]
    days = {s[:10] for s in by_slot}
    assert len(days) == len(by_slot)  # one slot a day, never two


async def _reached(client, slot):
    rows = await runs(client, limit=500)
    return rows if rows and rows[0]["slot"] == slot and rows[0]["task_id"] else None
