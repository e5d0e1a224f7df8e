"""GET /nodes (the cluster's nodes, or this server alone as "local"), /readyz's `redis`
check in cluster mode (issue 16), and a submission passed on to a node that has its script."""

from __future__ import annotations

import random
import time
from typing import Any

import aiohttp
from aiohttp import web

from remoterun.api import AUTH, DB, READINESS, SCHEDULER, SETTINGS, identity, json_response
from remoterun.api.guard import presented_token
from remoterun.api.monitor import NotReady
from remoterun.errors import Relayed, Unavailable
from remoterun.state import TaskStatus
from remoterun.store import Membership
from remoterun.wire import rfc3339

routes = web.RouteTableDef()
PASSED_ON = "X-RemoteRun-Passed-On"  # set by the node that passed a submission on: never again
PASS_ON_TIMEOUT_S = 30.0


def node_json(row: dict[str, Any]) -> dict[str, Any]:
    """A node's row as GET /nodes shows it."""
    return {"name": row["name"], "alive": row["alive"], "labels": list(row["labels"]),
            "workers": row["workers"], "running": row["running"],
            "last_seen": rfc3339(row["seen_at"]), "scripts": len(row["scripts"]),
            "url": row["url"], "started_at": rfc3339(row["started_at"]),
            "lost_at": rfc3339(row["lost_at"]), "lost_by": row["lost_by"]}


def members(app: web.Application) -> Membership:
    """The cluster's nodes, as the store keeps them (cluster mode: the PostgreSQL store)."""
    db = app[DB]
    if not isinstance(db, Membership):
        raise Unavailable("this server's store keeps no nodes", code="not_a_cluster")
    return db


@routes.get("/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    """Every node the cluster knows, alive or not, by name; without [cluster], this one."""
    identity(request).require("viewer")
    app = request.app
    settings = app[SETTINGS]
    cluster = settings.cluster
    if cluster is None:
        running = sum(1 for s in app[SCHEDULER].tasks.values()
                      if s.task.status is TaskStatus.RUNNING)
        return json_response({"node": "local", "nodes": [{
            "name": "local", "alive": True, "labels": [], "workers": settings.workers,
            "running": running, "last_seen": rfc3339(time.time())}]})
    rows = await members(app).nodes(cluster.node_timeout_s)
    return json_response({"node": cluster.node, "nodes": [node_json(r) for r in rows]})


def setup_cluster(app: web.Application) -> None:
    """The redis readiness check."""
    async def redis() -> None:
        relay = app[SCHEDULER].peers.relay  # type: ignore[attr-defined]
        try:
            await relay.ping()
        except Exception as exc:
            raise NotReady(f"redis cannot be reached: {exc}") from exc
    app[READINESS].add("redis", redis)


async def pass_on_submission(request: web.Request, body: dict[str, Any], script: str
                             ) -> dict[str, Any] | None:
    """A submission of a script this node's scripts/ lacks, passed on to a live node that has
    it (the one it is pinned to first, else one at random), with the caller's token: that
    node checks and records it as its own, and its answer is this one's (201: the task; an
    error: raised as it came). None (this node's 404 stands) without [cluster], for a
    submission that was passed on already, when no live node has the script, or for a caller
    known here by a session cookie (sessions are each node's own: a token is passed on)."""
    app = request.app
    cluster = app[SETTINGS].cluster
    if cluster is None or PASSED_ON in request.headers:
        return None
    who = identity(request)
    who.require_task(script, "operator")  # the token's list is checked before anything leaves
    token, _ = presented_token(request)
    if app[AUTH].enabled and token is None:
        return None
    rows = await members(app).nodes(cluster.node_timeout_s)
    having = [r for r in rows if r["alive"] and r["name"] != cluster.node
              and script in r["scripts"] and r["url"]]
    random.shuffle(having)
    having.sort(key=lambda r: r["name"] != body.get("node"))
    headers = {PASSED_ON: cluster.node}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    timeout = aiohttp.ClientTimeout(total=PASS_ON_TIMEOUT_S)
    problem = ""
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for row in having:
            try:
                async with http.post(f"{row['url'].rstrip('/')}/tasks", json=body,
                                     headers=headers) as response:
                    answer = await response.json(content_type=None)
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                problem = f"node {row['name']} has it but could not be reached: {exc}"
                continue
            if response.status == 201 and isinstance(answer, dict):
                return answer
            if not isinstance(answer, dict):
                answer = {"error": "bad_gateway", "message": f"node {row['name']} answered "
                          f"{response.status} without a JSON error"}
            raise Relayed(response.status, answer)
    if problem:
        raise Unavailable(problem, code="node_unreachable", retry_after_s=1.0)
    return None
