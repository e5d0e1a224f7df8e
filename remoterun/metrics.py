"""Prometheus metrics, in a registry per app so that several apps can live in one process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


@dataclass
class Metrics:
    """The server's counters, gauges and histograms."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.submitted = Counter("remoterun_tasks_submitted", "Tasks accepted.", ["script"],
                                 registry=r)
        self.finished = Counter("remoterun_tasks_finished", "Tasks that reached a final state.",
                                ["script", "status"], registry=r)
        self.retries = Counter("remoterun_task_retries", "Retries scheduled.", ["script"],
                               registry=r)
        self.running = Gauge("remoterun_tasks_running", "Tasks running now.", registry=r)
        self.pending = Gauge("remoterun_tasks_pending", "Tasks waiting to run.", registry=r)
        self.output_bytes = Counter("remoterun_output_bytes", "Bytes of output read.",
                                    ["stream"], registry=r)
        self.duration = Histogram("remoterun_task_duration_seconds",
                                  "Seconds from start to end of an attempt.", ["script"],
                                  registry=r)
        self.clients = Gauge("remoterun_stream_clients", "Attached WebSocket and SSE clients.",
                             ["kind"], registry=r)
        self.output_paused = Counter("remoterun_output_paused",
                                     "Times a task's output reading paused while its archive "
                                     "caught up.", registry=r)
        self.slow_clients = Counter("remoterun_slow_clients_closed",
                                    "Clients closed because their queue overflowed.", registry=r)

    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus_client takes a lock and builds
        a key on each call, and the scheduler asks several times per task and per output read."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def render(self) -> bytes:
        """The text exposition."""
        return generate_latest(self.registry)
