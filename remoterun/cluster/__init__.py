"""Cluster mode (issue 16): nodes sharing PostgreSQL (state, queue), Redis (live output,
controls) and the archive folder; see docs/cluster.md."""

from __future__ import annotations

from remoterun.archive.compressor import Compressor
from remoterun.catalogue import Catalogue
from remoterun.cluster.relay import Relay
from remoterun.cluster.scheduler import ClusterScheduler
from remoterun.config import Settings
from remoterun.metrics import Metrics
from remoterun.spawn import Children
from remoterun.store.postgres import PostgresDatabase

__all__ = ["ClusterScheduler", "PostgresDatabase", "Relay", "open_node"]


async def open_node(settings: Settings, catalogue: Catalogue, metrics: Metrics,
                    compressor: Compressor) -> tuple[PostgresDatabase, ClusterScheduler]:
    """Connect to the cluster's engines; the database and this node's scheduler (not started)."""
    assert settings.cluster is not None
    db = PostgresDatabase(settings.cluster.database_url, observe_write=metrics.db_write.observe,
                          max_size=max(10, settings.workers + 6))
    await db.open()
    relay = Relay(settings.cluster.redis_url)
    return db, ClusterScheduler(settings, db, catalogue, metrics, compressor, Children(), relay)
