"""The real peer, adnanh/webhook, started on loopback to run the same scripts."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from bench.lib import Context, free_port
from bench.server import spawn_logged, terminate, wait_ready


class Webhook:
    """A `webhook` process serving one hook per script, output included in the response."""

    def __init__(self, ctx: Context, hooks: dict[str, Path]):
        self.folder = ctx.work / "webhook"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hooks = hooks
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Whether the `webhook` binary is installed."""
        return shutil.which("webhook") is not None

    def url(self, hook: str) -> str:
        """The URL that runs a hook."""
        return f"http://127.0.0.1:{self.port}/hooks/{hook}"

    async def __aenter__(self) -> Webhook:
        spec = [{"id": name, "execute-command": str(path),
                 "command-working-directory": str(path.parent),
                 "include-command-output-in-response": True}
                for name, path in self.hooks.items()]
        hooks_file = self.folder / "hooks.json"
        hooks_file.write_text(json.dumps(spec))
        self.port = free_port()
        self.proc = spawn_logged(["webhook", "-hooks", str(hooks_file), "-ip", "127.0.0.1",
                                  "-port", str(self.port)], self.folder / "webhook.log")
        # webhook answers 200 on its root once it listens
        await wait_ready(f"http://127.0.0.1:{self.port}/", self.proc, 10.0, "webhook")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None:
            terminate(self.proc)
