"""The checks of config.toml's tables and values that are more than a number: each error names
the key at fault and the bad value (a sidecar's `limits`, `sandbox` and `env` tables use them too).
"""

from __future__ import annotations

import base64
import re
import zoneinfo
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from remoterun.config.settings import (
    ALERT_EVENTS,
    ALERT_KINDS,
    LIMIT_KEYS,
    ROLES,
    SANDBOX_MODES,
    Alert,
    Cluster,
    ConfigError,
    Token,
)

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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


_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def parse_cluster(body: Any) -> Cluster:
    """`[cluster]`, checked (its URLs shown without their passwords)."""
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


_ALERT_KEYS: dict[str, tuple[type, ...]] = {
    "kind": (str,), "url": (str,), "secret": (str,), "on": (list,), "scripts": (list,),
    "dedupe_s": (int, float), "timeout_s": (int, float), "retries": (int,),
    "backoff_s": (int, float), "tail_lines": (int,), "smtp_host": (str,), "smtp_port": (int,),
    "starttls": (bool,),
    "username": (str,), "password": (str,), "from": (str,), "to": (list, str),
}
_ALERT_REQUIRED = {"webhook": ("url",), "dingtalk": ("url",),
                   "email": ("smtp_host", "from", "to")}


def parse_alert(i: int, item: Any) -> Alert:
    """The i-th `[[alerts]]` table, checked."""
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


def coerce_monitoring(key: str, name: str, value: Any) -> Any:
    """The [server] keys of issue 14 that are not plain positive numbers."""
    if name == "metrics_public":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if not isinstance(value, str) or (value and not value.startswith(("http://", "https://"))):
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


MIN_TOKEN_CHARS = 16
_ORIGIN_RE = re.compile(r"https?://[^/?#\s]+")


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key}: expected an array of strings, got {value!r}")
    return tuple(value)


def coerce_security(key: str, name: str, value: Any) -> Any:
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


def coerce_secrets(key: str, name: str, value: Any) -> Any:
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


def parse_tokens(raw: Any) -> tuple[Token, ...]:
    """`[[tokens]]`, checked: no two share a token."""
    if not isinstance(raw, list):
        raise ConfigError(f"tokens: expected an array of tables ([[tokens]]), got {raw!r}")
    tokens = tuple(_token(f"tokens[{i}]", item) for i, item in enumerate(raw))
    clear = [t.token for t in tokens if t.token]
    if len(set(clear)) != len(clear) or len({t.sha256 for t in tokens if t.sha256}) != len(
            [t for t in tokens if t.sha256]):
        raise ConfigError("tokens: two entries share the same token")
    return tokens


def parse_zone(key: str, value: Any) -> str:
    """An IANA time zone name that this system knows."""
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigError(f"{key}: expected an IANA time zone name such as "
                          f"\"Europe/Berlin\", got {value!r}") from None
    return str(value)

