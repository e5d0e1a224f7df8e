"""Cluster mode (issue 16): nodes sharing PostgreSQL (state, queue), Redis (live output,
controls) and the archive folder; see docs/cluster.md. It provides the parts the engine's one
`Scheduler` is built with on a node: a claim queue, a membership and a publish hook."""

from __future__ import annotations

import functools

from remoterun.catalogue import Catalogue
from remoterun.cluster.claims import ClaimQueue
from remoterun.cluster.node import Node
from remoterun.cluster.relay import Relay, RelaySink
from remoterun.config import Settings
from remoterun.engine.scheduler import Publish
from remoterun.metrics import Metrics
from remoterun.store.postgres import PostgresDatabase

__all__ = ["ClaimQueue", "Node", "PostgresDatabase", "Relay", "open_node"]


async def open_node(settings: Settings, catalogue: Catalogue, metrics: Metrics
                    ) -> tuple[PostgresDatabase, ClaimQueue, Node, Publish]:
    """Connect to the cluster's PostgreSQL: the database, and this node's queue, membership
    and publish hook (the relay to Redis, started when the node joins)."""
    assert settings.cluster is not None
    db = PostgresDatabase(settings.cluster.database_url, observe_write=metrics.db_write.observe,
                          max_size=max(10, settings.workers + 6))
    await db.open()
    relay = Relay(settings.cluster.redis_url)
    node = Node(settings, db, relay, catalogue)
    return db, ClaimQueue(settings, db, node), node, functools.partial(RelaySink, relay)
