"""Cluster mode's routes and checks: GET /nodes, and /readyz's `redis` (issue 16)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from remoterun.api import DB, READINESS, SCHEDULER, SETTINGS, identity, json_response
from remoterun.api.monitor import NotReady
from remoterun.wire import rfc3339


def node_json(row: dict[str, Any]) -> dict[str, Any]:
    """A node's row as GET /nodes shows it."""
    return {"name": row["name"], "alive": row["alive"], "labels": list(row["labels"]),
            "workers": row["workers"], "scripts": len(row["scripts"]), "url": row["url"],
            "started_at": rfc3339(row["started_at"]), "seen_at": rfc3339(row["seen_at"]),
            "lost_at": rfc3339(row["lost_at"]), "lost_by": row["lost_by"]}


async def list_nodes(request: web.Request) -> web.Response:
    """Every node the cluster knows, alive or not, by name."""
    identity(request).require("viewer")
    app = request.app
    cluster = app[SETTINGS].cluster
    assert cluster is not None
    rows = await app[DB].nodes(cluster.node_timeout_s)  # type: ignore[attr-defined]
    return json_response({"node": cluster.node, "nodes": [node_json(r) for r in rows]})


def setup(app: web.Application) -> None:
    """Add GET /nodes and the redis readiness check."""
    async def redis() -> None:
        relay = app[SCHEDULER].relay  # type: ignore[attr-defined]
        try:
            await relay.ping()
        except Exception as exc:
            raise NotReady(f"redis cannot be reached: {exc}") from exc
    app[READINESS].add("redis", redis)
    app.router.add_get("/nodes", list_nodes)
