"""Secret params at rest: the server's key, and each task's secret values sealed with it.

A task's secret params are stored in its row as one AES-256-GCM box, bound to the task's id (the
associated data), so a copy of the database alone reveals nothing and a box moved to another
row does not open. The key is 32 random bytes the server makes on its first start, in a file
only its user may read (`<database folder>/remoterun-secret.key`, mode 0600, or
`paths.secret_key`), or given in `REMOTERUN_SECRET_KEY` (base64 or hex). A box names its key by a
short fingerprint, so a task sealed under another key fails with that said, not as a corrupt row.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from remoterun.config import ConfigError

KEY_ENV = "REMOTERUN_SECRET_KEY"
KEY_FILE_NAME = "remoterun-secret.key"  # distinct: the folder may be shared (/var/lib)
KEY_BYTES = 32
NONCE_BYTES = 12
PREFIX = "rr1"  # the box format: rr1:<key fingerprint>:<base64 of nonce + ciphertext>
NONE = "{}"  # a task without secret params (or whose box was dropped once it ended)


class SecretsUnavailable(Exception):
    """A task's sealed secrets cannot be opened (another key, or a damaged box); the message
    says which, and never holds a value."""


def fingerprint(key: bytes) -> str:
    """A short public name of a key (the first 8 hex digits of its SHA-256)."""
    return hashlib.sha256(b"remoterun-secret-key:" + key).hexdigest()[:8]


def parse_key(text: str, where: str) -> bytes:
    """A key as written in the key file or the environment: base64 (standard or URL-safe) or
    64 hex digits of 32 bytes. ConfigError names `where`, never the value."""
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 2 * KEY_BYTES:
        with contextlib.suppress(ValueError):
            raw = bytes.fromhex(text)
    if raw is None:
        with contextlib.suppress(binascii.Error, ValueError):
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    if raw is None or len(raw) != KEY_BYTES:
        raise ConfigError(f"{where}: expected {KEY_BYTES} bytes as base64 or hex "
                          f"(make one with `openssl rand -base64 32`)")
    return raw


def take_env_key() -> str | None:
    """`REMOTERUN_SECRET_KEY`, taken out of the server's environment so that no task's process
    (which starts from that environment unless a sandbox builds its own) ever inherits it."""
    return os.environ.pop(KEY_ENV, None) or None


def load_key(path: Path, env_key: str | None = None) -> tuple[bytes, str]:
    """The server's key and where it came from: `env_key` (REMOTERUN_SECRET_KEY's value) if
    given, else the file at `path`, created (0600, exclusively) on first start. Blocking: call
    it off the loop."""
    if env_key:
        return parse_key(env_key, KEY_ENV), KEY_ENV
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_key_file(path), str(path)
    key = os.urandom(KEY_BYTES)
    with os.fdopen(fd, "w") as fh:
        fh.write(base64.b64encode(key).decode() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return key, str(path)


def _read_key_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        os.chmod(path, 0o600)  # readable by others: that is no secret; ours to tighten
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the secret key: {exc}") from exc
    return parse_key(text, str(path))


class Vault:
    """Seals and opens the secret params of tasks with one key."""

    def __init__(self, key: bytes, source: str = ""):
        self._aead = AESGCM(key)
        self.kid = fingerprint(key)
        self.source = source  # where the key came from, for messages
        self._key = key

    def derive(self, purpose: bytes) -> bytes:
        """A key of its own for another use of this secret (HMAC-SHA256 of `purpose`): the
        cluster's controls are signed with one, never with the sealing key itself."""
        return hmac.new(self._key, purpose, hashlib.sha256).digest()

    def seal(self, task_id: str, values: dict[str, Any]) -> str:
        """The box to store for a task's secret values ("{}" for none: no crypto at all)."""
        if not values:
            return NONE
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(values, separators=(",", ":")).encode()
        box = self._aead.encrypt(nonce, plain, task_id.encode())
        return f"{PREFIX}:{self.kid}:{base64.urlsafe_b64encode(nonce + box).decode()}"

    def open(self, task_id: str, stored: str) -> dict[str, Any]:
        """The secret values of a task from its stored box; SecretsUnavailable if it cannot
        be opened. A "{...}" in clear (a row written before boxes existed) is read as is."""
        if not stored or stored == NONE:
            return {}
        if stored.startswith("{"):
            return dict(json.loads(stored))
        try:
            prefix, kid, body = stored.split(":", 2)
        except ValueError:
            raise SecretsUnavailable("its secret params are stored in an unknown form") from None
        if prefix != PREFIX:
            raise SecretsUnavailable("its secret params are stored in an unknown form")
        if kid != self.kid:
            raise SecretsUnavailable(
                f"its secret params were sealed with another secret key ({kid}; this "
                f"server's, from {self.source or 'its key'}, is {self.kid}): submit it again, "
                f"or restore the key it was sealed with")
        try:
            raw = base64.urlsafe_b64decode(body)
            plain = self._aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], task_id.encode())
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretsUnavailable("its secret params do not open with this server's key "
                                     "(the stored box is damaged)") from None
        return dict(json.loads(plain))

    def sealed(self, stored: str) -> bool:
        """Whether a stored value holds secrets (sealed or, from an older server, in clear)."""
        return bool(stored) and stored != NONE
