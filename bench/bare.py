"""A bare aiohttp server answering POST /tasks with a task-sized JSON body: the HTTP floor."""

from __future__ import annotations

import sys
import uuid

from aiohttp import web


async def post_task(request: web.Request) -> web.Response:
    """Parse the body, answer 201 with a body shaped like RemoteRun's, store nothing."""
    body = await request.json()
    task_id = str(uuid.uuid4())
    task = {"id": task_id, "script": body.get("script"), "params": body.get("params", {}),
            "status": "pending", "priority": 0, "timeout": None, "max_retries": 0, "attempt": 1,
            "pty": False, "interactive": False, "exit_code": None, "error": None,
            "created_at": "2026-11-29T01:02:03.456Z", "updated_at": "2026-11-29T01:02:03.456Z",
            "started_at": None, "finished_at": None, "submitted_by": "anonymous",
            "logs_path": f"2026/11/29/{task_id}", "output_bytes": 0}
    return web.json_response(task, status=201, headers={"Location": f"/tasks/{task_id}"})


async def healthz(request: web.Request) -> web.Response:
    """Ready probe."""
    return web.json_response({"status": "ok"})


def main() -> None:
    """Serve on 127.0.0.1:<port given as the first argument>."""
    app = web.Application()
    app.router.add_post("/tasks", post_task)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
