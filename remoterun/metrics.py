"""Prometheus metrics, in a registry per app so that several apps can live in one process.

Names follow Prometheus's conventions (`_total` counters, `_seconds` and `_bytes` units) and
every label is bounded: scripts (a directory's files), statuses, streams, reasons, channels,
and HTTP routes by their canonical path, never the raw URL. No series has a `_created`
sample: the timestamps cost a series per child and no dashboard reads them.
"""

from __future__ import annotations

import copy
import os
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from remoterun import __version__
from remoterun.state import TaskStatus

CONTENT_TYPE = CONTENT_TYPE_LATEST
S = TaskStatus

# Process-wide in prometheus_client; no registry of ours wants them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# From 10 ms to 8 hours: a 265 s backup lands in a bucket, not only in +Inf.
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                    300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)
DB_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
              0.5, 1.0, 5.0)
CLIENT_KINDS = ("websocket", "sse")
ALERT_RESULTS = ("sent", "failed", "dropped", "folded")


def failure_reason(status: str, exit_code: int | None, error: str | None) -> str:
    """Why an attempt failed, as a label with few values (the error text has many)."""
    text = error or ""
    if status == S.TIMEOUT or text.startswith("killed after running past"):
        return "timeout"
    if not text:
        return "exit_code"
    if "max_output_bytes" in text:
        return "output_cap"
    if "the server" in text:  # shut down during the run, or stopped (a crash) during it
        return "server_stopped"
    if text.startswith("internal error"):
        return "internal"
    return "spawn" if exit_code is None else "error"


@dataclass
class Metrics:
    """The server's counters, gauges and histograms."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._tasks_series()
        self._server_series()

    def _tasks_series(self) -> None:
        r = self.registry
        self.submitted = Counter("remoterun_tasks_submitted", "Tasks accepted.", ["script"],
                                 registry=r)
        self.started = Counter("remoterun_tasks_started", "Attempts started.", ["script"],
                               registry=r)
        self.finished = Counter("remoterun_tasks_finished", "Tasks that reached a final state.",
                                ["script", "status"], registry=r)
        self.failures = Counter("remoterun_task_failures",
                                "Attempts that failed or timed out, retried or not, by reason.",
                                ["script", "reason"], registry=r)
        self.retries = Counter("remoterun_task_retries", "Retries scheduled.", ["script"],
                               registry=r)
        self.running = Gauge("remoterun_tasks_running", "Tasks running now.", ["script"],
                             registry=r)
        self.waiting = Gauge("remoterun_tasks_waiting",
                             "Tasks waiting to run now (queued, or a retry not yet due).",
                             ["script"], registry=r)
        self.output_bytes = Counter("remoterun_output_bytes", "Bytes of output read.",
                                    ["stream"], registry=r)
        self.duration = Histogram("remoterun_task_duration_seconds",
                                  "Seconds from start to end of an attempt.", ["script"],
                                  buckets=DURATION_BUCKETS, registry=r)
        self.queue_wait = Histogram("remoterun_task_queue_wait_seconds",
                                    "Seconds from submission to the first attempt's start.",
                                    ["script"], buckets=DURATION_BUCKETS, registry=r)
        self.output_paused = Counter("remoterun_output_paused",
                                     "Times a task's output reading paused while its archive "
                                     "caught up.", registry=r)
        self._live: set[str] = set()  # scripts the running/waiting gauges have shown
        # Schedules (issue 29): `schedule` is bounded by the schedules defined.
        self.schedule_runs = Counter("remoterun_schedule_runs",
                                     "Schedule slots by outcome (started, skipped_overlap, "
                                     "queued, replaced, missed, failed_to_submit).",
                                     ["schedule", "outcome"], registry=r)
        self.schedule_lag = Histogram("remoterun_schedule_lag_seconds",
                                      "Seconds from a slot to its task's first start.",
                                      buckets=DURATION_BUCKETS, registry=r)

    def _server_series(self) -> None:
        r = self.registry
        self.clients = Gauge("remoterun_stream_clients", "Attached WebSocket and SSE clients.",
                             ["kind"], registry=r)
        for kind in CLIENT_KINDS:
            self.child(self.clients, kind)
        self.slow_clients = Counter("remoterun_slow_clients_closed",
                                    "Clients closed because their queue overflowed (1013).",
                                    registry=r)
        self.archive_bytes = Gauge("remoterun_archive_bytes",
                                   "Bytes of archived output on disk (segments not pruned).",
                                   registry=r)
        self.archive_free = Gauge("remoterun_archive_free_bytes",
                                  "Bytes free to the server on the archive's filesystem.",
                                  registry=r)
        self.archive_capacity = Gauge("remoterun_archive_capacity_bytes",
                                      "Size of the archive's filesystem.", registry=r)
        self.db_write = Histogram("remoterun_db_write_seconds",
                                  "Seconds a database write transaction took, commit included.",
                                  buckets=DB_BUCKETS, registry=r)
        self.http_requests = Counter("remoterun_http_requests",
                                     "HTTP requests answered, by route, method and status.",
                                     ["route", "method", "status"], registry=r)
        self.http_duration = Histogram("remoterun_http_request_duration_seconds",
                                       "Seconds from a request's arrival to its response's end.",
                                       ["route", "method"], buckets=HTTP_BUCKETS, registry=r)
        self.alerts = Counter("remoterun_alert_deliveries",
                              "Alert messages by channel and result: sent, failed (one attempt),"
                              " dropped (given up, or the queue was full), folded (de-duplicated"
                              " into a later message).", ["channel", "result"], registry=r)
        self.hook_requests = Counter("remoterun_hook_requests",
                                     "Requests to a configured hook, by result: accepted, "
                                     "duplicate, skipped, invalid, denied, limited.",
                                     ["hook", "result"], registry=r)
        build = Gauge("remoterun_build_info", "The running server's version (the value is 1).",
                      ["version", "python"], registry=r)
        build.labels(__version__, platform.python_version()).set(1)
        ProcessCollector(registry=r)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus_client takes a lock and builds
        a key on each call, and the scheduler asks several times per task and per output read."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def on_transition(self, row: Mapping[str, Any], old: TaskStatus, new: TaskStatus) -> None:
        """Count a task's state change (the scheduler has committed it)."""
        script = row["script"]
        self._live.add(script)
        if new is S.RUNNING:
            self.child(self.started, script).inc()
            if row["attempt"] == 1 and row["started_at"] is not None:
                wait = max(row["started_at"] - row["created_at"], 0.0)
                self.child(self.queue_wait, script).observe(wait)
                if row.get("scheduled_for") is not None:
                    self.schedule_lag.observe(max(row["started_at"] - row["scheduled_for"], 0))
        elif new in (S.FAILED, S.TIMEOUT) or (new is S.PENDING and old is S.RUNNING):
            reason = failure_reason(new, row["exit_code"], row["error"])
            self.child(self.failures, script, reason).inc()

    def set_live(self, counts: Iterable[Mapping[str, Any]]) -> None:
        """Set the running and waiting gauges from (script, status, n) rows; scripts seen
        before and absent now go to 0 rather than vanish."""
        now: dict[tuple[str, str], int] = {(c["script"], c["status"]): c["n"] for c in counts}
        self._live.update(script for script, _ in now)
        for script in self._live:
            self.child(self.running, script).set(now.get((script, S.RUNNING), 0))
            self.child(self.waiting, script).set(now.get((script, S.PENDING), 0))

    def set_archive(self, on_disk: int, fs: os.statvfs_result) -> None:
        """Set the archive gauges: bytes of segments, and the filesystem's free and total."""
        self.archive_bytes.set(on_disk)
        self.archive_free.set(fs.f_bavail * fs.f_frsize)
        self.archive_capacity.set(fs.f_blocks * fs.f_frsize)

    def alert(self, channel: str, result: str) -> None:
        """Count one alert delivery outcome."""
        self.child(self.alerts, channel, result).inc()

    def render(self, shows: Callable[[str], bool] | None = None) -> bytes:
        """The text exposition; with `shows`, without the series of scripts it refuses (a
        token's script list)."""
        if shows is None:
            return generate_latest(self.registry)
        return generate_latest(_ScriptsShown(self.registry, shows))


class _ScriptsShown(CollectorRegistry):
    """A registry's metrics without the samples of the scripts `shows` refuses."""

    def __init__(self, source: CollectorRegistry, shows: Callable[[str], bool]):
        super().__init__(auto_describe=False)
        self.source = source
        self.shows = shows

    def collect(self) -> Iterator[Metric]:
        """The source's metrics, each with only the samples of shown scripts (or of none)."""
        for metric in self.source.collect():
            kept = copy.copy(metric)
            kept.samples = [s for s in metric.samples
                            if "script" not in s.labels or self.shows(s.labels["script"])]
            yield kept
