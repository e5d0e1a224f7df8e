"""GET /nodes (the cluster's nodes, or this server alone as "local"), and /readyz's `redis`
check in cluster mode (issue 16)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from remoterun.api import DB, READINESS, SCHEDULER, SETTINGS, identity, json_response
from remoterun.api.monitor import NotReady
from remoterun.state import TaskStatus
from remoterun.wire import rfc3339

routes = web.RouteTableDef()


def node_json(row: dict[str, Any]) -> dict[str, Any]:
    """A node's row as GET /nodes shows it."""
    return {"name": row["name"], "alive": row["alive"], "labels": list(row["labels"]),
            "workers": row["workers"], "running": row["running"],
            "last_seen": rfc3339(row["seen_at"]), "scripts": len(row["scripts"]),
            "url": row["url"], "started_at": rfc3339(row["started_at"]),
            "lost_at": rfc3339(row["lost_at"]), "lost_by": row["lost_by"]}


@routes.get("/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    """Every node the cluster knows, alive or not, by name; without [cluster], this one."""
    identity(request).require("viewer")
    app = request.app
    settings = app[SETTINGS]
    cluster = settings.cluster
    if cluster is None:
        running = sum(1 for s in app[SCHEDULER].tasks.values()
                      if s.row["status"] == TaskStatus.RUNNING)
        return json_response({"node": "local", "nodes": [{
            "name": "local", "alive": True, "labels": [], "workers": settings.workers,
            "running": running, "last_seen": rfc3339(time.time())}]})
    rows = await app[DB].nodes(cluster.node_timeout_s)  # type: ignore[attr-defined]
    return json_response({"node": cluster.node, "nodes": [node_json(r) for r in rows]})


def setup_cluster(app: web.Application) -> None:
    """The redis readiness check."""
    async def redis() -> None:
        relay = app[SCHEDULER].relay  # type: ignore[attr-defined]
        try:
            await relay.ping()
        except Exception as exc:
            raise NotReady(f"redis cannot be reached: {exc}") from exc
    app[READINESS].add("redis", redis)
