"""The schedules' timer: an owned loop that sleeps until the next slot is due, then records
each due slot with its outcome and submits its task through `Scheduler.submit`.

A slot's record and its task are one transaction, and the record's key is (schedule, slot):
a slot another node (or this server before a restart) recorded fails its guard, and no task
is made. What the loop decides per slot is pure (`cron.choose`); what it writes is here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from remoterun import store
from remoterun.catalogue import Catalogue, MetadataError
from remoterun.config import ConfigError, Settings
from remoterun.engine.cron import choose
from remoterun.engine.schedule_spec import Spec, local_zone, parse
from remoterun.engine.scheduler import Scheduler
from remoterun.errors import RemoteRunError
from remoterun.metrics import Metrics
from remoterun.state import FINAL, TaskStatus
from remoterun.store import statements

log = structlog.get_logger(__name__)
MAX_SLOTS_PER_TICK = 10_000  # missed slots recorded at once; older ones are counted in a log
RECHECK_S = 2.0  # while a slot is queued, or in a cluster (others' schedules), look this often
RETRY_S = 1.0  # after a tick that failed (a busy database)


@dataclass
class Entry:
    """One schedule as the timer holds it."""

    spec: Spec
    paused: bool
    since: float  # slots after this count (creation, or the last resume)
    created_at: float
    cursor: float  # the newest slot decided
    last: dict[str, Any] | None = None  # the newest slot record
    due: float = 0.0  # when its next slot starts (jitter included); inf: never

    @property
    def active(self) -> bool:
        """Whether its slots start."""
        return self.spec.enabled and not self.paused

    def advance(self, cursor: float) -> None:
        """Its slots up to `cursor` are decided: find when the next one starts."""
        self.cursor = cursor
        upcoming = self.spec.timing.next(cursor, 1)
        self.due = upcoming[0] + self.spec.offset_s if upcoming else math.inf


class Schedules:
    """Every schedule, config's and the API's, and the loop that starts their slots."""

    def __init__(self, settings: Settings, db: store.Store, scheduler: Scheduler,
                 catalogue: Catalogue, metrics: Metrics, clock: Callable[[], float] = time.time):
        self.settings, self.db, self.scheduler = settings, db, scheduler
        self.catalogue, self.metrics, self.clock = catalogue, metrics, clock
        self.zone = "UTC"  # the default zone, read in start()
        self.entries: dict[str, Entry] = {}
        self._wake = asyncio.Event()
        # Told of each slot that started nothing and is worth an alert (set by api/app.py's
        # side: the engine does not import the alerts); it must not block or raise.
        self.on_unstarted: Callable[[str, str, float, str, str | None], None] = \
            lambda schedule, script, slot, outcome, reason: None
        self._loop: asyncio.Task[None] | None = None
        self.up_since = clock()

    # Life --------------------------------------------------------------------------------------

    def config_specs(self) -> list[Spec]:
        """The `[[schedules]]` of config.toml; ConfigError naming the first bad one."""
        specs: list[Spec] = []
        for i, table in enumerate(self.settings.schedules):
            try:
                specs.append(parse(dict(table), self.zone, source="config"))
            except RemoteRunError as exc:
                detail = (exc.details or [{}])[0]
                raise ConfigError(f"schedules[{i}].{detail.get('field', '')}: "
                                  f"{detail.get('message', exc.message)}") from None
        names = [s.name for s in specs]
        if len(names) != len(set(names)):
            raise ConfigError("schedules: two schedules share a name")
        return specs

    async def start(self) -> None:
        """Read the schedules and their last slots, then start the loop."""
        self.up_since = self.clock()
        self.zone = await asyncio.to_thread(local_zone, self.settings.timezone)
        await self.load()
        self._loop = asyncio.create_task(self._run(), name="schedules")

    async def load(self) -> None:
        """(Re)read every schedule: config's (kept in the database for pauses) and the API's."""
        now = self.clock()
        config = {s.name: s for s in await asyncio.to_thread(self.config_specs)}
        rows = {r["name"]: r for r in await self.db.schedule_rows()}
        if await self._save_config(config, rows, now):
            rows = {r["name"]: r for r in await self.db.schedule_rows()}
        latest = await self.db.latest_slots()
        stored = await asyncio.to_thread(self._stored_specs, list(rows.values()))
        entries: dict[str, Entry] = {}
        for name, row in rows.items():
            spec = config.get(name) if row["source"] == "config" else stored.get(name)
            if spec is None:
                continue  # a config schedule no longer in config.toml, or unreadable
            last = latest.get(name)
            cursor = max(row["since"], last["slot"] if last else row["since"])
            old = self.entries.get(name)
            entry = Entry(spec, bool(row["paused"]), row["since"], row["created_at"], cursor,
                          last)
            if old is not None and old.since == row["since"] and old.spec is spec and \
                    old.cursor >= cursor:
                entry.cursor, entry.due = old.cursor, old.due  # unchanged: no cron to step
            else:
                entry.advance(cursor)
            entries[name] = entry
        self.entries = entries
        self.wake()

    async def _save_config(self, config: dict[str, Spec], rows: dict[str, dict[str, Any]],
                           now: float) -> bool:
        """Keep a row for each config schedule (its pauses live there); one whose timing
        changed in config.toml counts its slots from now. Whether anything was written."""
        fresh = [statements.save_schedule(_row(spec, now)) for name, spec in config.items()
                 if name not in rows]
        changed = [statements.change_schedule(name, {"spec": timing_of(spec), "since": now,
                                                     "updated_at": now})
                   for name, spec in config.items() if name in rows and
                   rows[name]["source"] == "config" and rows[name]["spec"] != timing_of(spec)]
        try:
            if fresh:
                await self.scheduler.commit(fresh)  # one transaction for a new config's all
        except store.StaleWrite:  # another node made some meanwhile: each on its own
            for each in fresh:
                with contextlib.suppress(store.StaleWrite):
                    await self.scheduler.commit([each])
        for each in changed:
            with contextlib.suppress(store.StaleWrite):  # removed meanwhile
                await self.scheduler.commit([each])
        return bool(fresh or changed)

    def _stored_specs(self, rows: list[dict[str, Any]]) -> dict[str, Spec]:
        """The API schedules' specs (parsed on a thread: a zone is read from disk)."""
        specs: dict[str, Spec] = {}
        for row in rows:
            if row["source"] != "api":
                continue
            old = self.entries.get(row["name"])
            if old is not None and old.spec.fields() == {
                    **json.loads(row["spec"]), "name": row["name"]}:
                specs[row["name"]] = old.spec  # unchanged: its timing already made
                continue
            try:
                specs[row["name"]] = parse({**json.loads(row["spec"]), "name": row["name"]},
                                           self.zone)
            except (ValueError, RemoteRunError) as exc:
                log.error("schedule_unreadable", schedule=row["name"], error=str(exc))
        return specs

    @property
    def alive(self) -> bool:
        """Whether the loop runs."""
        return self._loop is not None and not self._loop.done()

    async def close(self) -> None:
        """Stop the loop and wait for it."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None

    def wake(self) -> None:
        """Look at the schedules again (one was made, changed, resumed; a task ended)."""
        self._wake.set()

    def on_transition(self, row: dict[str, Any], new: TaskStatus) -> None:
        """A task of a schedule ended: a slot queued behind it may start."""
        if new in FINAL and row.get("schedule"):
            self.wake()

    # The loop ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        reloaded = self.clock()
        while True:
            self._wake.clear()
            try:
                if self.settings.cluster is not None and self.clock() - reloaded >= RECHECK_S:
                    await self.load()  # schedules made, paused or resumed on other nodes
                    reloaded = self.clock()
                wait_s = await self.tick()
            except Exception:
                log.exception("schedules_tick_failed")
                wait_s = RETRY_S
            if self.settings.cluster is not None:
                wait_s = min(wait_s, RECHECK_S)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()

    async def tick(self) -> float:
        """Decide every due slot; seconds until the next one is due (at most an hour)."""
        now = self.clock()
        wait_s = 3600.0
        if await self._queued():
            wait_s = RECHECK_S
        # Only the schedules due are stepped: 10,000 idle ones cost a comparison each.
        for entry in list(self.entries.values()):
            if not entry.active or not self.scheduler.accepting:
                continue
            if entry.due <= now:
                await self._due(entry, now)
            wait_s = min(wait_s, max(entry.due - self.clock(), 0.0))
        return wait_s

    async def _due(self, entry: Entry, now: float) -> None:
        """Record and start what came due for one schedule since its cursor."""
        spec = entry.spec
        due = spec.timing.between(entry.cursor, now - spec.offset_s, MAX_SLOTS_PER_TICK + 1)
        if len(due) > MAX_SLOTS_PER_TICK:
            log.warning("schedule_slots_not_recorded", schedule=spec.name, detail=(
                "more slots passed than one tick records; the oldest are left out"))
            due = spec.timing.between(due[-1] - 1, now - spec.offset_s, MAX_SLOTS_PER_TICK)
        choices = choose(due, now=now, offset_s=spec.offset_s, up_since=self.up_since,
                         catch_up=spec.catch_up, window_s=spec.catch_up_window_s)
        for choice in choices:
            if choice.run:
                await self.fire(entry, choice.slot)
            else:
                await self._record(entry, choice.slot, "missed", None, choice.reason)
            entry.cursor = choice.slot
        entry.advance(entry.cursor)

    async def fire(self, entry: Entry, slot: float) -> None:
        """Start a slot as its overlap policy says: started, skipped_overlap, queued or
        replaced."""
        spec = entry.spec
        busy = [] if spec.overlap == "allow" else await self.db.schedule_active(spec.name)
        if not busy:
            await self.submit(entry, slot, "started")
        elif spec.overlap == "forbid":
            await self._record(entry, slot, "skipped_overlap", busy[-1]["id"],
                               f"task {busy[-1]['id']} is still {busy[-1]['status']}")
        elif spec.overlap == "queue":
            await self._record(entry, slot, "queued", None, f"after task {busy[-1]['id']}")
        else:
            for row in busy:
                with contextlib.suppress(RemoteRunError):  # it ended meanwhile
                    await self.scheduler.cancel(row["id"])
            await self.submit(entry, slot, "replaced",
                              f"replaced task {', '.join(r['id'] for r in busy)}")

    async def submit(self, entry: Entry, slot: float | None, outcome: str,
                     reason: str | None = None, was: str | None = None,
                     audit: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Submit the schedule's task, its slot's record in the same transaction (none for a
        run now, `slot` None); a refusal is recorded `failed_to_submit`. The task, or None."""
        spec = entry.spec
        name = spec.name

        def slot_row(task_id: str) -> list[store.Statement]:
            if slot is None:
                return []
            if was is not None:
                return [statements.settle_slot(name, slot, was, outcome, task_id, reason)]
            return [statements.record_slot(name, slot, outcome, task_id, reason)]

        try:
            script = self.catalogue.resolve(spec.script)
            task = await self.scheduler.submit(
                script, {**spec.request(), "scheduled_for": slot}, f"schedule:{name}",
                audit=audit, extra=slot_row)
        except store.StaleWrite:
            log.info("schedule_slot_taken", schedule=name, slot=slot)  # elsewhere, or before
            return None
        except (RemoteRunError, MetadataError) as exc:
            if slot is None or not self.scheduler.accepting:
                raise
            message = getattr(exc, "message", str(exc))
            if was is not None:
                await self._settle(entry, slot, was, message)
            else:
                await self._record(entry, slot, "failed_to_submit", None, message)
            return None
        if slot is not None and was is None:
            self._counted(entry, slot, outcome, task["id"], reason)
        log.info("schedule_slot_started", schedule=name, slot=slot, task_id=task["id"],
                 outcome=outcome)
        return task

    async def _record(self, entry: Entry, slot: float, outcome: str, task_id: str | None,
                      reason: str | None) -> None:
        """Record a slot that starts nothing (yet): missed, skipped, queued, failed."""
        try:
            await self.scheduler.commit([statements.record_slot(
                entry.spec.name, slot, outcome, task_id, reason)])
        except store.StaleWrite:
            return  # recorded already, by another node or before a restart
        self._counted(entry, slot, outcome, task_id, reason)
        log.info("schedule_slot_recorded", schedule=entry.spec.name, slot=slot,
                 outcome=outcome, reason=reason)

    async def _settle(self, entry: Entry, slot: float, was: str, reason: str) -> None:
        with contextlib.suppress(store.StaleWrite):
            await self.scheduler.commit([statements.settle_slot(
                entry.spec.name, slot, was, "failed_to_submit", None, reason)])
            self._counted(entry, slot, "failed_to_submit", None, reason)

    def _counted(self, entry: Entry, slot: float, outcome: str, task_id: str | None,
                 reason: str | None) -> None:
        self.metrics.child(self.metrics.schedule_runs, entry.spec.name, outcome).inc()
        if outcome in ("missed", "failed_to_submit"):
            self.on_unstarted(entry.spec.name, entry.spec.script, slot, outcome, reason)
        if entry.last is None or slot >= entry.last["slot"]:
            entry.last = {"schedule": entry.spec.name, "slot": slot, "outcome": outcome,
                          "task_id": task_id, "reason": reason}

    async def _queued(self) -> bool:
        """Start the oldest queued slot of each schedule whose previous run ended; whether
        any slot is still queued."""
        rows = await self.db.queued_slots()
        waiting = False
        seen: set[str] = set()
        for row in rows:
            entry = self.entries.get(row["schedule"])
            if entry is None or row["schedule"] in seen:
                waiting = waiting or entry is not None
                continue
            seen.add(row["schedule"])
            if entry.active and not await self.db.schedule_active(row["schedule"]):
                await self.submit(entry, row["slot"], "queued", row["reason"], was="queued")
            waiting = True
        return waiting


TIMING = ("cron", "every", "timezone", "enabled")  # what changes which slots are its


def timing_of(spec: Spec) -> str:
    """A config schedule's timing as its row keeps it: a change counts slots from then on."""
    return json.dumps({key: getattr(spec, key) for key in TIMING}, sort_keys=True)


def _row(spec: Spec, now: float) -> dict[str, Any]:
    """A schedule's new database row (an API one's whole definition; a config one's timing)."""
    stored = timing_of(spec) if spec.source == "config" else json.dumps(
        {k: v for k, v in spec.fields().items() if k != "name"})
    return {"name": spec.name, "source": spec.source, "spec": stored,
            "paused": False, "created_at": now, "updated_at": now, "since": now}


def new_row(spec: Spec, now: float) -> dict[str, Any]:
    """The row an API schedule is created with."""
    return _row(spec, now)
