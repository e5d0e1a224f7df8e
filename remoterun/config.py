"""Settings: frozen dataclasses read from config.toml; every error names the key at fault."""

from __future__ import annotations

import base64
import dataclasses
import re
import socket
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from remoterun.hooks import Hook, HookConfigError, parse_hooks

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
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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


def parse_limits(where: str, raw: Any) -> dict[str, int]:
    """A `limits` table's keys, checked: positive integers, or 0 (not limited)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of {list(LIMIT_KEYS)}")
    out = {}
    for key, value in raw.items():
        if key not in LIMIT_KEYS:
            raise ConfigError(f"{where}.{key}: unknown key (one of {list(LIMIT_KEYS)})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{where}.{key}: expected a whole number >= 0, got {value!r}")
        out[key] = value
    return out


def parse_sandbox(where: str, raw: Any) -> dict[str, Any]:
    """A `sandbox` table's keys, checked."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table (mode, network, image, run_as, seccomp)")
    for key, value in raw.items():
        if key == "mode" and value not in SANDBOX_MODES:
            raise ConfigError(f"{where}.mode: one of {list(SANDBOX_MODES)}, got {value!r}")
        if key == "network" and not isinstance(value, bool):
            raise ConfigError(f"{where}.network: expected true or false, got {value!r}")
        if key in ("image", "run_as") and not isinstance(value, str):
            raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")
        if key == "seccomp" and (not isinstance(value, str) or not value):
            raise ConfigError(f"{where}.seccomp: \"default\", \"off\" or a profile's path, "
                              f"got {value!r}")
        if key not in ("mode", "network", "image", "run_as", "seccomp"):
            raise ConfigError(f"{where}.{key}: unknown key")
    return dict(raw)


# Variables that change what a program loads or runs before its own code: the dynamic loader's,
# shells' start-up files and search paths, interpreters' module paths and options. Only
# config.toml may set them for a task (a sidecar beside a script may not: issue 26).
LOADER_ENV = frozenset({
    "BASH_ENV", "ENV", "PATH", "HOME", "IFS", "CDPATH", "SHELLOPTS", "BASHOPTS", "PS4",
    "GLOBIGNORE", "ZDOTDIR", "GCONV_PATH", "LOCPATH", "NLSPATH", "GLIBC_TUNABLES",
    "HOSTALIASES", "CLASSPATH"})
LOADER_ENV_PREFIXES = ("LD_", "DYLD_", "PYTHON", "PERL", "RUBY", "GEM_", "BUNDLE_", "NODE_",
                       "NPM_CONFIG_", "JAVA_", "_JAVA_", "JDK_JAVA_", "LUA_", "BASH_FUNC_",
                       "MALLOC_", "GIT_", "OPENSSL_", "SSL_", "TCL", "R_LIBS")


def loader_variable(name: str) -> bool:
    """Whether setting `name` changes what programs load or run (LOADER_ENV)."""
    upper = name.upper()
    return upper in LOADER_ENV or upper.startswith(LOADER_ENV_PREFIXES)


def parse_env(where: str, raw: Any) -> dict[str, str]:
    """An `env` table: variable names to string values, added to a task's environment."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table of NAME = \"value\"")
    for key, value in raw.items():
        if not ENV_NAME_RE.match(key) or key.startswith("RR_"):
            raise ConfigError(f"{where}.{key}: a variable name matching "
                              f"{ENV_NAME_RE.pattern}, not RR_* (those are the server's)")
        if not isinstance(value, str) or "\x00" in value:
            raise ConfigError(f"{where}.{key}: expected a string without NUL, got {value!r}")
    return dict(raw)


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
    max_pending: int = 10000  # waiting tasks; past it a submission gets 503 queue_full
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


_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _cluster(body: Any) -> Cluster:
    if not isinstance(body, dict):
        raise ConfigError(f"cluster: expected a table, got {body!r}")
    unknown = set(body) - {"database_url", "redis_url", "node", "labels", "node_timeout_s"}
    if unknown:
        raise ConfigError(f"cluster.{sorted(unknown)[0]}: unknown key")
    values: dict[str, Any] = {}
    for key, schemes in (("database_url", ("postgresql://", "postgres://")),
                         ("redis_url", ("redis://", "rediss://", "unix://"))):
        value = body.get(key)
        if not isinstance(value, str) or not value.startswith(schemes):
            shown = re.sub(r":[^:@/]*@", ":***@", value) if isinstance(value, str) else value
            raise ConfigError(f"cluster.{key}: expected a URL starting {' or '.join(schemes)}, "
                              f"got {shown!r}")  # never a password
        values[key] = value
    if "node" in body:
        if not isinstance(body["node"], str) or not _NODE_RE.fullmatch(body["node"]):
            raise ConfigError(f"cluster.node: expected a name of letters, digits, '.', '_' or "
                              f"'-', got {body['node']!r}")
        values["node"] = body["node"]
    if "labels" in body:
        values["labels"] = tuple(sorted(set(_strings("cluster.labels", body["labels"]))))
    if "node_timeout_s" in body:
        value = body["node_timeout_s"]
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 1:
            raise ConfigError(f"cluster.node_timeout_s: expected seconds (at least 1), "
                              f"got {value!r}")
        values["node_timeout_s"] = float(value)
    return Cluster(**values)


# Monitoring and alerts (issue 14) -------------------------------------------------------------

ALERT_KINDS = ("webhook", "dingtalk", "email")
ALERT_EVENTS = ("success", "failed", "timeout", "cancelled", "retry", "retries_exhausted",
                "missed", "failed_to_submit")  # the last two: a schedule's slots (issue 29)
_ALERT_KEYS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "url": (str,), "secret": (str,), "on": (list,), "scripts": (list,),
    "dedupe_s": (int, float), "timeout_s": (int, float), "retries": (int,),
    "backoff_s": (int, float), "tail_lines": (int,), "smtp_host": (str,), "smtp_port": (int,),
    "starttls": (bool,),
    "username": (str,), "password": (str,), "from": (str,), "to": (list, str),
}
_ALERT_REQUIRED = {"webhook": ("url",), "dingtalk": ("url",),
                   "email": ("smtp_host", "from", "to")}


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


def _alert(i: int, item: Any) -> Alert:
    where = f"alerts[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a table, got {item!r}")
    for key, value in item.items():
        types = _ALERT_KEYS.get(key)
        if types is None:
            raise ConfigError(f"{where}.{key}: unknown key")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{where}.{key}: expected {' or '.join(t.__name__ for t in types)}"
                              f", got {value!r}")
    kind = item.get("kind")
    if kind not in ALERT_KINDS:
        raise ConfigError(f"{where}.kind: one of {list(ALERT_KINDS)}, got {kind!r}")
    for key in _ALERT_REQUIRED[kind]:
        if not item.get(key):
            raise ConfigError(f"{where}.{key}: required for kind = {kind!r}")
    on = item.get("on", ["failed", "timeout"])
    bad = [e for e in on if e not in ALERT_EVENTS]
    if bad or not on:
        raise ConfigError(f"{where}.on: events among {list(ALERT_EVENTS)}, got {on!r}")
    scripts = item.get("scripts")
    if scripts is not None and not all(isinstance(s, str) for s in scripts):
        raise ConfigError(f"{where}.scripts: expected an array of glob patterns")
    for key in ("dedupe_s", "timeout_s", "retries", "backoff_s", "tail_lines"):
        if item.get(key, 0) < 0 or (key == "timeout_s" and item.get(key, 1) == 0):
            raise ConfigError(f"{where}.{key}: must be positive, got {item[key]!r}")
    to = item.get("to", [])
    fields = {k: float(v) if k in ("dedupe_s", "timeout_s", "backoff_s") else v
              for k, v in item.items() if k not in ("on", "scripts", "from", "to")}
    return Alert(**{**fields, "kind": kind, "on": tuple(on),
                    "scripts": None if scripts is None else tuple(scripts),
                    "from_addr": item.get("from", ""),
                    "to": (to,) if isinstance(to, str) else tuple(to)})


def _coerce_monitoring(key: str, name: str, value: Any) -> Any:
    """The [server] keys of issue 14 that are not plain positive numbers."""
    if name == "metrics_public":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if not isinstance(value, str) or (value and not value.startswith(("http://", "https://"))):
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


# config.toml section.key -> Settings field
_KEYS: dict[tuple[str, str], str] = {
    ("server", "host"): "host",
    ("server", "port"): "port",
    ("server", "max_body_bytes"): "max_body_bytes",
    ("server", "max_ws_message_bytes"): "max_ws_message_bytes",
    ("server", "shutdown_grace_s"): "shutdown_grace_s",
    ("server", "heartbeat_s"): "heartbeat_s",
    ("server", "stream_max_s"): "stream_max_s",
    ("server", "log_level"): "log_level",
    ("server", "metrics_public"): "metrics_public",
    ("server", "min_free_bytes"): "min_free_bytes",
    ("server", "public_url"): "public_url",
    ("server", "timezone"): "timezone",
    ("server", "allowed_origins"): "allowed_origins",
    ("server", "allowed_hosts"): "allowed_hosts",
    ("server", "session_ttl_s"): "session_ttl_s",
    ("server", "auth_fail_limit"): "auth_fail_limit",
    ("server", "auth_fail_window_s"): "auth_fail_window_s",
    ("server", "max_connections"): "max_connections",
    ("server", "header_timeout_s"): "header_timeout_s",
    ("server", "tls_cert"): "tls_cert",
    ("server", "tls_key"): "tls_key",
    ("paths", "secret_key"): "secret_key_path",
    ("redaction", "patterns"): "redaction_patterns",
    ("integrity", "public_keys"): "integrity_public_keys",
    ("paths", "scripts"): "scripts_dir",
    ("paths", "archive"): "archive_dir",
    ("paths", "db"): "db_path",
    ("paths", "work"): "work_dir",
    ("engine", "workers"): "workers",
    ("engine", "default_timeout_s"): "default_timeout_s",
    ("engine", "kill_grace_s"): "kill_grace_s",
    ("engine", "drain_grace_s"): "drain_grace_s",
    ("engine", "max_retries_limit"): "max_retries_limit",
    ("engine", "retry_base_s"): "retry_base_s",
    ("engine", "retry_cap_s"): "retry_cap_s",
    ("engine", "aging_s"): "aging_s",
    ("engine", "reaper_interval_s"): "reaper_interval_s",
    ("engine", "db_retry_s"): "db_retry_s",
    ("engine", "max_pending"): "max_pending",
    ("stream", "stdin_buffer_bytes"): "stdin_buffer_bytes",
    ("stream", "replay_readers"): "replay_readers",
    ("stream", "stall_timeout_s"): "stall_timeout_s",
    ("stream", "client_queue_bytes"): "client_queue_bytes",
    ("stream", "replay_memory_bytes"): "replay_memory_bytes",
    ("stream", "search_budget_s"): "search_budget_s",
    ("stream", "read_chunk_bytes"): "read_chunk_bytes",
    ("stream", "coalesce_ms"): "coalesce_ms",
    ("archive", "segment_max_bytes"): "segment_max_bytes",
    ("archive", "flush_interval_s"): "flush_interval_s",
    ("archive", "gzip_level"): "gzip_level",
    ("archive", "compressor"): "archive_compressor",
    ("archive", "segment_max_age_s"): "segment_max_age_s",
    ("archive", "max_output_bytes"): "max_output_bytes",
    ("retention", "max_age_days"): "retention_max_age_days",
    ("retention", "max_total_bytes"): "retention_max_total_bytes",
    ("retention", "interval_s"): "retention_interval_s",
}

LOG_LEVELS = ("debug", "info", "warning", "error")
COMPRESSORS = ("isal", "zlib")  # segments.COMPRESSORS: a leaf does not import another
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Settings)}
# Limits that 0 turns off.
_OFF_AT_ZERO = frozenset({"segment_max_age_s", "max_output_bytes", "retention_max_age_days",
                          "retention_max_total_bytes", "min_free_bytes"})


MIN_TOKEN_CHARS = 16
_ORIGIN_RE = re.compile(r"https?://[^/?#\s]+")


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected an array of strings, got {value!r}")
    return tuple(value)


def _coerce_security(key: str, name: str, value: Any) -> Any:
    """The [server] keys of access control: lists of origins and hosts, TLS files."""
    if name == "allowed_origins":
        origins = _strings(key, value)
        for origin in origins:
            if not _ORIGIN_RE.fullmatch(origin):
                raise ConfigError(f"{key}: expected origins like \"https://host:port\", "
                                  f"got {origin!r}")
        return tuple(o.lower() for o in origins)
    if name == "allowed_hosts":
        return tuple(h.lower() for h in _strings(key, value))
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a path string, got {value!r}")
    return Path(value)


# Ed25519 public keys in DER (SubjectPublicKeyInfo, as `openssl pkey -pubout` writes inside
# its PEM) are this prefix and the 32 raw bytes.
_ED25519_SPKI = bytes.fromhex("302a300506032b6570032100")


def _public_key(where: str, text: Any) -> bytes:
    """An Ed25519 public key given as base64 or hex of its 32 bytes, or its PEM / DER form."""
    raw: bytes | None = None
    if isinstance(text, str):
        body = "".join(line for line in text.strip().splitlines() if not line.startswith("-----"))
        try:
            raw = bytes.fromhex(body) if re.fullmatch(r"[0-9a-fA-F]{64}", body) \
                else base64.b64decode(body, validate=True)
        except ValueError:
            raw = None
    if raw is not None and len(raw) == 44 and raw.startswith(_ED25519_SPKI):
        raw = raw[len(_ED25519_SPKI):]
    if raw is None or len(raw) != 32:
        raise ConfigError(f"{where}: expected an Ed25519 public key (base64 or hex of 32 bytes, "
                          f"or PEM), got {str(text)[:80]!r}")
    return raw


def _coerce_secrets(key: str, name: str, value: Any) -> Any:
    """[paths] secret_key, [redaction] patterns, [integrity] public_keys."""
    if name == "secret_key_path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        return Path(value)
    items = _strings(key, value)
    if name == "integrity_public_keys":
        return tuple(_public_key(f"{key}[{i}]", item) for i, item in enumerate(items))
    for i, pattern in enumerate(items):
        try:
            compiled = re.compile(pattern.encode())
        except re.error as exc:
            raise ConfigError(f"{key}[{i}]: not a regular expression: {exc}") from None
        if compiled.search(b"") is not None:
            raise ConfigError(f"{key}[{i}]: {pattern!r} matches the empty string, so it would "
                              f"mask between every byte")
    return items


def _coerce(key: str, name: str, value: Any) -> Any:
    kind = _FIELD_TYPES[name]
    if name in ("secret_key_path", "redaction_patterns", "integrity_public_keys"):
        return _coerce_secrets(key, name, value)
    if name in ("metrics_public", "public_url"):
        return _coerce_monitoring(key, name, value)
    if name == "timezone":
        return _zone(key, value)
    if name in ("allowed_origins", "allowed_hosts", "tls_cert", "tls_key"):
        return _coerce_security(key, name, value)
    if name.endswith("_dir") or name == "db_path":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        return Path(value)
    if name == "host":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a host name or address, got {value!r}")
        return value
    if name == "log_level":
        if value not in LOG_LEVELS:
            raise ConfigError(f"{key}: one of {list(LOG_LEVELS)}, got {value!r}")
        return value
    if name == "archive_compressor":
        if value not in COMPRESSORS:
            raise ConfigError(f"{key}: one of {list(COMPRESSORS)}, got {value!r}")
        return value
    if name == "default_timeout_s" and value in (0, False):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if kind == "int" and not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if value == 0 and name in _OFF_AT_ZERO:
        return 0.0 if kind.startswith("float") else 0
    if value < 0 or (value == 0 and name not in ("drain_grace_s", "kill_grace_s", "port",
                                                  "coalesce_ms", "aging_s")):
        raise ConfigError(f"{key}: must be positive, got {value!r}")
    if name == "gzip_level" and not 1 <= value <= 9:
        raise ConfigError(f"{key}: must be 1..9, got {value!r}")
    return float(value) if kind.startswith("float") else value


def _expiry(where: str, value: Any) -> float | None:
    """A token's `expires`: a TOML date-time or an RFC 3339 string; naive means UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            value = None
    if not isinstance(value, datetime):
        raise ConfigError(f"{where}.expires: expected a date-time such as "
                          f"2027-01-01T00:00:00Z, got {value!r}")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def _token(where: str, item: Any) -> Token:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a table, got {item!r}")
    unknown = set(item) - {"name", "token", "sha256", "role", "scripts", "expires"}
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    if not isinstance(item.get("name"), str) or not item["name"]:
        raise ConfigError(f"{where}.name: expected a non-empty string")
    if item.get("role") not in ROLES:
        raise ConfigError(f"{where}.role: expected one of {ROLES}, got {item.get('role')!r}")
    clear, digest = item.get("token"), item.get("sha256")
    if (clear is None) == (digest is None):
        raise ConfigError(f"{where}: give exactly one of token or sha256")
    if clear is not None and (not isinstance(clear, str) or len(clear) < MIN_TOKEN_CHARS):
        raise ConfigError(f"{where}.token: must be at least {MIN_TOKEN_CHARS} characters "
                          f"(make one with `remoterun token create`)")
    if digest is not None and (not isinstance(digest, str)
                               or not re.fullmatch(r"[0-9a-fA-F]{64}", digest)):
        raise ConfigError(f"{where}.sha256: expected 64 hex digits, got {digest!r}")
    scripts = item.get("scripts")
    if scripts is not None and (
        not isinstance(scripts, list) or not all(isinstance(s, str) for s in scripts)
    ):
        raise ConfigError(f"{where}.scripts: expected an array of script names or globs")
    return Token(item["name"], clear or "", item["role"],
                 None if scripts is None else tuple(scripts),  # [] allows no script
                 sha256=(digest or "").lower(), expires_at=_expiry(where, item.get("expires")))


def _tokens(raw: Any) -> tuple[Token, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"tokens: expected an array of tables ([[tokens]]), got {raw!r}")
    tokens = tuple(_token(f"tokens[{i}]", item) for i, item in enumerate(raw))
    clear = [t.token for t in tokens if t.token]
    if len(set(clear)) != len(clear) or len({t.sha256 for t in tokens if t.sha256}) != len(
            [t for t in tokens if t.sha256]):
        raise ConfigError("tokens: two entries share the same token")
    return tokens


def parse(data: Mapping[str, Any], base: Path) -> Settings:
    """Build Settings from parsed TOML; relative paths are taken from `base`."""
    values: dict[str, Any] = {}
    for section, body in data.items():
        if section == "tokens":
            values["tokens"] = _tokens(body)
            continue
        if section == "alerts":
            if not isinstance(body, list):
                raise ConfigError(f"alerts: expected an array of tables ([[alerts]]), got {body!r}")
            values["alerts"] = tuple(_alert(i, item) for i, item in enumerate(body))
            continue
        if section in ("sandbox", "limits"):
            values[section] = _isolation(section, body)
            continue
        if section == "engine" and isinstance(body, dict) and "env" in body:
            body = dict(body)
            values["env"] = parse_env("engine.env", body.pop("env"))
        if section == "cluster":
            values["cluster"] = _cluster(body)
            continue
        if section == "hooks":
            try:
                values["hooks"] = parse_hooks(body, base)
            except HookConfigError as exc:
                raise ConfigError(str(exc)) from None
            continue
        if section == "schedules":
            if not isinstance(body, list) or not all(isinstance(v, dict) for v in body):
                raise ConfigError("schedules: expected an array of tables ([[schedules]])")
            values["schedules"] = tuple(body)
            continue
        if section == "scripts":
            if not isinstance(body, dict) or not all(isinstance(v, dict) for v in body.values()):
                raise ConfigError("scripts: expected tables such as [scripts.\"name.sh\"]")
            values["scripts"] = body
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: unknown top-level key")
        for key, value in body.items():
            name = _KEYS.get((section, key))
            if name is None:
                raise ConfigError(f"{section}.{key}: unknown key")
            values[name] = _coerce(f"{section}.{key}", name, value)
    for name in ("scripts_dir", "archive_dir", "db_path", "tls_cert", "tls_key", "work_dir",
                 "secret_key_path"):
        if name in values and not values[name].is_absolute():
            values[name] = base / values[name]
    if ("tls_cert" in values) != ("tls_key" in values):
        raise ConfigError("server.tls_cert: tls_cert and tls_key go together")
    return Settings(**values)


def _zone(key: str, value: Any) -> str:
    """An IANA time zone name that this system knows."""
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigError(f"{key}: expected an IANA time zone name such as "
                          f"\"Europe/Berlin\", got {value!r}") from None
    return str(value)


def _isolation(section: str, body: Any) -> SandboxConfig | ResourceLimits:
    """`[sandbox]` or `[limits]`; a limit of 0 is no limit."""
    if section == "sandbox":
        return SandboxConfig(**parse_sandbox("sandbox", body))
    return ResourceLimits(**{k: v or None for k, v in parse_limits("limits", body).items()})


def load(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Read config.toml (if given) and apply command-line overrides."""
    if path is None:  # the defaults are relative to the current folder: say so, absolutely
        cwd = Path.cwd()
        settings = Settings(scripts_dir=cwd / "scripts", archive_dir=cwd / "archive",
                            db_path=cwd / "remoterun.db")
    else:
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        settings = dataclasses.replace(parse(data, path.resolve().parent),
                                       config_path=path.resolve())
    changes = {k: v for k, v in (overrides or {}).items() if v is not None}
    return dataclasses.replace(settings, **changes)
