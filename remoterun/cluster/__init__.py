"""Cluster mode (issue 16): nodes sharing PostgreSQL (state, queue), Redis (live output,
controls) and the archive folder; see docs/cluster.md. It provides the parts the engine's one
`Scheduler` is built with on a node: a claim queue, a membership and a publish hook."""

from __future__ import annotations

import functools
import urllib.parse

import structlog

from remoterun.catalogue import Catalogue
from remoterun.cluster.claims import ClaimQueue
from remoterun.cluster.node import Node
from remoterun.cluster.relay import Relay, RelaySink
from remoterun.config import Settings
from remoterun.engine.streams import Publish
from remoterun.metrics import Metrics
from remoterun.spawn import Children
from remoterun.store.postgres import PostgresDatabase

__all__ = ["ClaimQueue", "Node", "PostgresDatabase", "Relay", "open_node"]
log = structlog.get_logger(__name__)


async def open_node(settings: Settings, catalogue: Catalogue, metrics: Metrics,
                    children: Children) -> tuple[PostgresDatabase, ClaimQueue, Node, Publish]:
    """Connect to the cluster's PostgreSQL: the database, and this node's queue, membership
    and publish hook (the relay to Redis, started when the node joins)."""
    assert settings.cluster is not None
    _warn_open_doors(settings)
    db = PostgresDatabase(settings.cluster.database_url, observe_write=metrics.db_write.observe,
                          max_size=max(10, settings.workers + 6),
                          idle_in_transaction_s=settings.cluster.node_timeout_s)
    await db.open()
    relay = Relay(settings.cluster.redis_url)
    node = Node(settings, db, relay, catalogue, children)
    return db, ClaimQueue(settings, db, node), node, functools.partial(RelaySink, relay)


def _warn_open_doors(settings: Settings) -> None:
    """Say at start what lets a task reach the cluster's engines (SECURITY.md): a Redis
    without a password, or tasks that run unsandboxed and so can read the config."""
    assert settings.cluster is not None
    if not urllib.parse.urlsplit(settings.cluster.redis_url).password:
        log.warning("redis_without_password", detail="any task or host that reaches Redis "
                    "reads every task's output: give cluster.redis_url a user and password")
    if settings.sandbox.mode == "none":
        log.warning("cluster_tasks_unsandboxed", detail="tasks can read the config and the "
                    "secret key, so reach PostgreSQL and Redis and sign controls")
