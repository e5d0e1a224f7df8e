"""The engine's protections of a task (issue 13 B): its secrets sealed and opened, its output's
Masker, and its script checked (at submit and at each attempt) and run from a checked copy.

The scheduler owns one `Protection` and calls it at the few points of a task's life where it
applies; the rules themselves live in `vault` (the key and the boxes), `redact` (masking) and
`integrity` (pins, signatures, copies). Nothing here writes state: what must be committed (the
rows an older server left with secrets in clear) is handed back as statements.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import structlog

from remoterun import store
from remoterun.catalogue import Scalar, Script, param_value
from remoterun.config import Settings
from remoterun.integrity import Integrity
from remoterun.redact import MIN_SECRET_CHARS, Masker, Redactor
from remoterun.runner import SpawnError
from remoterun.state import FINAL, Task
from remoterun.vault import KEY_FILE_NAME, NONE, Vault, load_key, take_env_key

log = structlog.get_logger(__name__)


class Protection:
    """Secrets at rest, output masking and script integrity, for one server."""

    def __init__(self, settings: Settings):
        self.key_path = settings.secret_key_path or settings.db_path.parent / KEY_FILE_NAME
        self.redactor = Redactor(settings.redaction_patterns)
        # The checked copies that run: a folder of this database's own, as SQLite's -wal is.
        self.integrity = Integrity(settings.integrity_public_keys,
                                   settings.db_path.with_name(settings.db_path.name + "-run"))
        self._vault: Vault | None = None
        # Now, before the scheduler encodes the environment its children inherit.
        self._env_key = take_env_key()

    @property
    def vault(self) -> Vault:
        """The key's vault (open() must have been awaited)."""
        assert self._vault is not None, "Protection.open() was not awaited"
        return self._vault

    async def open_key(self) -> Vault:
        """Read (or make, on first start) the key and empty the run folder of a previous
        server's copies (a cluster node's start: every node must be given the same key)."""
        key, source = await asyncio.to_thread(load_key, self.key_path, self._env_key)
        self._vault = vault = Vault(key, source)
        await asyncio.to_thread(self.integrity.clear)
        log.info("secret_key", source=source, fingerprint=vault.kid)
        return vault

    async def open(self, db: store.Store) -> list[store.Statement]:
        """Read (or make, on first start) the key, empty the run folder of a previous server's
        copies; the statements that seal what an older server stored in clear (dropping it for
        tasks that ended)."""
        vault = await self.open_key()
        return [store.update_task(row["id"], {
            "secret_params": NONE if row["status"] in FINAL else
            vault.seal(row["id"], json.loads(row["secret_params"]))})
            for row in await db.secrets_in_clear()]

    def seal(self, task_id: str, script: Script, params: Mapping[str, Scalar]
             ) -> tuple[str, str]:
        """A new task's params as stored: (the JSON shown, secrets as "***"; the sealed box)."""
        secret = script.secret_keys
        shown = json.dumps({k: "***" if k in secret else v for k, v in params.items()})
        return shown, self.vault.seal(task_id, {k: v for k, v in params.items() if k in secret})

    async def check(self, script: Script) -> None:
        """IntegrityFailed unless the script passes its checks (none apply: nothing read)."""
        if self.integrity.required(script.sha256):
            await asyncio.to_thread(self.integrity.verified, script.name, script.path,
                                    script.sha256, script.sidecar_sha256)

    async def prepare(self, task: Task, script: Script
                      ) -> tuple[dict[str, Scalar], Script, Path | None]:
        """An attempt's secret values (SecretsUnavailable if they do not open), and the script
        to run: when a check applies, a private copy of the bytes just checked (IntegrityFailed
        if they fail), with that copy's path to discard() after the run."""
        secrets = self.vault.open(task.id, task.secret_params)
        short = sorted(k for k, v in secrets.items() if len(param_value(v)) < MIN_SECRET_CHARS)
        if short:
            log.info("secret_not_masked", params=short,
                     reason=f"shorter than {MIN_SECRET_CHARS} characters")
        if not self.integrity.required(script.sha256):
            return secrets, script, None
        try:
            copy = await asyncio.to_thread(self.integrity.private_copy, script.name,
                                           script.path, script.sha256,
                                           f"{task.id}-{task.attempt}",
                                           script.sidecar_sha256)
        except OSError as exc:  # a full disk, a folder we may not write: retried as any spawn
            raise SpawnError(f"the checked copy of {script.name!r} could not be written: "
                             f"{exc.strerror or exc}") from exc
        return secrets, dataclasses.replace(script, path=copy), copy

    def masker(self, secrets: Mapping[str, Scalar]) -> Masker | None:
        """The attempt's Masker (None: nothing to mask). Booleans are not masked: masking every
        "true" of the output would be noise, and hide nothing."""
        return self.redactor.masker(param_value(v) for v in secrets.values()
                                    if not isinstance(v, bool))

    async def discard(self, copy: Path | None) -> None:
        """Remove an attempt's checked copy, if it had one."""
        if copy is not None:
            await asyncio.to_thread(self.integrity.discard, copy)
