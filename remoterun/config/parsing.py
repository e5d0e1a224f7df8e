"""config.toml read into Settings: each `section.key` mapped to its field and checked, then
command-line overrides applied; relative paths are taken from the file's folder."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from remoterun.config.sections import (
    coerce_monitoring,
    coerce_secrets,
    coerce_security,
    parse_alert,
    parse_cluster,
    parse_env,
    parse_limits,
    parse_sandbox,
    parse_tokens,
    parse_zone,
)
from remoterun.config.settings import ConfigError, ResourceLimits, SandboxConfig, Settings
from remoterun.hooks import HookConfigError, parse_hooks

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


def _coerce(key: str, name: str, value: Any) -> Any:
    kind = _FIELD_TYPES[name]
    if name in ("secret_key_path", "redaction_patterns", "integrity_public_keys"):
        return coerce_secrets(key, name, value)
    if name in ("metrics_public", "public_url"):
        return coerce_monitoring(key, name, value)
    if name == "timezone":
        return parse_zone(key, value)
    if name in ("allowed_origins", "allowed_hosts", "tls_cert", "tls_key"):
        return coerce_security(key, name, value)
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


def parse(data: Mapping[str, Any], base: Path) -> Settings:
    """Build Settings from parsed TOML; relative paths are taken from `base`."""
    values: dict[str, Any] = {}
    for section, body in data.items():
        if section == "tokens":
            values["tokens"] = parse_tokens(body)
            continue
        if section == "alerts":
            if not isinstance(body, list):
                raise ConfigError(f"alerts: expected an array of tables ([[alerts]]), got {body!r}")
            values["alerts"] = tuple(parse_alert(i, item) for i, item in enumerate(body))
            continue
        if section in ("sandbox", "limits"):
            values[section] = _isolation(section, body)
            continue
        if section == "engine" and isinstance(body, dict) and "env" in body:
            body = dict(body)
            values["env"] = parse_env("engine.env", body.pop("env"))
        if section == "cluster":
            values["cluster"] = parse_cluster(body)
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
