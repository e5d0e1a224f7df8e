"""The settings' types: frozen dataclasses, one per section that has its own, and their names."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remoterun.hooks import Hook

ROLES = ("viewer", "operator", "admin")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key and the bad value."""


@dataclass(frozen=True)
class Token:
    """One API token: who it is, what it may do, and which scripts it may run."""

    name: str
    token: str  # in clear; "" when the config gives only its sha256
    role: str
    scripts: tuple[str, ...] | None = None  # names or globs; None: every script; (): none
    sha256: str = ""  # hex digest of the token; computed from `token` when that is given
    expires_at: float | None = None  # epoch seconds; None: never


# Isolation and limits (issue 13: sandbox.py) ---------------------------------------------------

SANDBOX_MODES = ("auto", "bwrap", "docker", "gvisor", "none")
LIMIT_KEYS = ("memory_bytes", "processes", "cpu_seconds", "file_bytes", "open_files",
              "disk_bytes")


@dataclass(frozen=True)
class ResourceLimits:
    """What one attempt's processes may use; None: not limited."""

    memory_bytes: int | None = None
    processes: int | None = None
    cpu_seconds: int | None = None  # per process (RLIMIT_CPU)
    file_bytes: int | None = None  # largest file a process may write (RLIMIT_FSIZE)
    open_files: int | None = None  # descriptors per process (RLIMIT_NOFILE)
    disk_bytes: int | None = None  # the work folder and /tmp together (a tmpfs of this size)

    def over(self, base: ResourceLimits) -> ResourceLimits:
        """These limits where set, `base`'s elsewhere."""
        return ResourceLimits(**{k: getattr(self, k) if getattr(self, k) is not None
                                 else getattr(base, k) for k in LIMIT_KEYS})


@dataclass(frozen=True)
class SandboxConfig:
    """`[sandbox]` (or a script's `sandbox` table): how a task's process is isolated."""

    mode: str = "auto"  # auto: bwrap when it works here, else none (said at start)
    network: bool = True
    image: str = ""  # docker: the image each attempt runs in
    run_as: str = ""  # a user name the task runs as, when the server runs as root
    seccomp: str = "default"  # bwrap's filter: "default", "off" or a profile's path


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from config.toml and the command line."""

    host: str = "127.0.0.1"
    port: int = 8080
    scripts_dir: Path = Path("scripts")
    archive_dir: Path = Path("archive")
    db_path: Path = Path("remoterun.db")
    workers: int = 4
    default_timeout_s: float | None = 3600.0
    kill_grace_s: float = 5.0
    shutdown_grace_s: float = 30.0
    drain_grace_s: float = 0.5
    max_retries_limit: int = 20
    retry_base_s: float = 1.0
    retry_cap_s: float = 300.0
    aging_s: float = 60.0
    reaper_interval_s: float = 30.0
    db_retry_s: float = 30.0  # the engine's writes wait this long for a busy database per try
    max_pending: int = 10_000  # waiting tasks; past it submissions get 503 queue_full
    stdin_buffer_bytes: int = 1024 * 1024  # per task: stdin not yet read; more is refused
    replay_readers: int = 32  # clients reading the archive for a replay at once
    stall_timeout_s: float = 30.0  # a client that takes no byte for this long is closed (1013)
    max_body_bytes: int = 1024 * 1024
    max_ws_message_bytes: int = 1024 * 1024
    client_queue_bytes: int = 8 * 1024 * 1024
    replay_memory_bytes: int = 1024 * 1024
    search_budget_s: float = 2.0  # a search page's time; past it the page ends with a cursor
    read_chunk_bytes: int = 65536
    coalesce_ms: float = 4.0
    segment_max_bytes: int = 64 * 1024 * 1024
    segment_max_age_s: float = 3600.0  # 0: rotate by size only
    flush_interval_s: float = 1.0
    gzip_level: int = 1
    archive_compressor: str = "isal"  # or "zlib": both write standard gzip members
    max_output_bytes: int = 0  # per task; 0: no cap
    retention_max_age_days: float = 0.0  # 0: keep forever
    retention_max_total_bytes: int = 0  # 0: no limit
    retention_interval_s: float = 300.0
    heartbeat_s: float = 20.0
    # An SSE stream ends after this long; EventSource resumes at once with Last-Event-ID, so a
    # follower loses nothing, and no proxy or fuzzer holds a stream for ever.
    stream_max_s: float = 3600.0
    log_level: str = "info"
    # Secrets and integrity (issue 13 B; SECURITY.md).
    secret_key_path: Path | None = None  # None: remoterun-secret.key beside the database
    redaction_patterns: tuple[str, ...] = ()  # regexes masked as *** in every task's output
    integrity_public_keys: tuple[bytes, ...] = ()  # raw Ed25519 keys: every script signed
    # Access control and browser safety (issue 12; SECURITY.md).
    allowed_origins: tuple[str, ...] = ()  # besides the server's own origin
    allowed_hosts: tuple[str, ...] = ()  # Host names answered without tokens, besides loopback
    session_ttl_s: float = 12 * 3600.0
    auth_fail_limit: int = 20  # failed logins / 401s per address per window, then 429
    auth_fail_window_s: float = 60.0
    max_connections: int = 1000  # open client connections; more are closed at once
    header_timeout_s: float = 10.0  # each request's headers, and its body, must arrive by then
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tokens: tuple[Token, ...] = ()
    scripts: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Monitoring and alerts (issue 14).
    metrics_public: bool = False  # /metrics without a token, for scrapers
    min_free_bytes: int = 100 * 1024 * 1024  # /readyz fails with less free in the archive
    public_url: str = ""  # the server's address as users reach it, for links in alerts
    alerts: tuple[Alert, ...] = ()
    # Isolation and limits (issue 13).
    sandbox: SandboxConfig = SandboxConfig()
    limits: ResourceLimits = ResourceLimits()
    env: Mapping[str, str] = field(default_factory=dict)  # [engine] env, added for every task
    work_dir: Path | None = None  # per-attempt work folders go under it; None: the temp folder
    config_path: Path | None = None  # the file these came from (hidden from sandboxed tasks)
    cluster: Cluster | None = None  # [cluster] (issue 16); None: one node on SQLite
    hooks: tuple[Hook, ...] = ()  # [[hooks]] (issue 30): incoming webhooks
    # Schedules (issue 29): the [[schedules]] tables as written, checked when the server
    # starts (engine/schedules.py); [server] timezone is their default zone.
    schedules: tuple[Mapping[str, Any], ...] = ()
    timezone: str | None = None

    @property
    def auth_enabled(self) -> bool:
        """Whether any token is configured."""
        return bool(self.tokens)


# Cluster mode (issue 16) ----------------------------------------------------------------------

@dataclass(frozen=True)
class Cluster:
    """`[cluster]`: the shared PostgreSQL and Redis, and this node's name and labels."""

    database_url: str
    redis_url: str
    node: str = field(default_factory=socket.gethostname)
    labels: tuple[str, ...] = ()
    node_timeout_s: float = 15.0  # a node silent this long is lost; its running tasks end


# Monitoring and alerts (issue 14) -------------------------------------------------------------

ALERT_KINDS = ("webhook", "dingtalk", "email")
ALERT_EVENTS = ("success", "failed", "timeout", "cancelled", "retry", "retries_exhausted",
                "missed", "failed_to_submit")  # the last two: a schedule's slots (issue 29)


@dataclass(frozen=True)
class Alert:
    """One `[[alerts]]` channel: where to send, on which events, for which scripts."""

    kind: str
    on: tuple[str, ...] = ("failed", "timeout")
    scripts: tuple[str, ...] | None = None  # glob patterns; None: every script
    dedupe_s: float = 0.0  # one message per script and event per window; 0: every one
    timeout_s: float = 10.0  # per delivery attempt
    retries: int = 3  # further attempts after a failed one, with backoff
    backoff_s: float = 2.0  # before the first retry; doubled for each next one
    tail_lines: int = 20  # last lines of output in the message
    url: str = ""
    secret: str = ""
    smtp_host: str = ""
    smtp_port: int = 25
    starttls: bool = False
    username: str = ""
    password: str = ""
    from_addr: str = ""
    to: tuple[str, ...] = ()
