"""Incoming webhooks (`[[hooks]]`): each hook's settings, its signature check, its `match`
rules and its `params` mapping, as pure functions of a request's parts (PROTOCOL.md "Hooks").

Nothing here touches a socket or the engine: `api/hooks.py` reads the request and submits the
task. A hook's secrets live only in `Hook.secrets` (never in its repr), are compared in
constant time, and are never put into a message, a log line or an answer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIGNATURES = ("github", "gitlab", "hmac-sha256")
MODES = ("async", "wait", "stream")
SOURCES = ("body", "header", "query")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MISSING = object()  # a source the request does not have
_KEYS = {"name", "script", "signature", "secrets", "secrets_file", "signature_header",
         "timestamp_header", "max_age_s", "delivery_header", "match", "params", "mode",
         "wait_s", "priority", "timeout"}
_DEFAULT_HEADER = {"github": "X-Hub-Signature-256", "gitlab": "X-Gitlab-Token"}


class HookConfigError(ValueError):
    """A `[[hooks]]` entry cannot be used; the message names the key (never a secret)."""


@dataclass(frozen=True)
class Hook:
    """One `[[hooks]]` entry: who may call it (the signature) and what it starts."""

    name: str
    script: str
    signature: str
    secrets: tuple[str, ...] = field(repr=False)
    signature_header: str = ""
    timestamp_header: str = ""
    max_age_s: float = 300.0
    delivery_header: str = ""
    match: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # (source key, accepted values)
    params: tuple[tuple[str, str], ...] = ()  # (param name, source key)
    mode: str = "async"
    wait_s: float = 30.0
    priority: int = 0
    timeout: float | None = None

    def describe(self) -> dict[str, Any]:
        """The hook as `GET /hooks` shows it (what a sender needs to sign for it): no secret,
        not even how many there are."""
        return {"name": self.name, "script": self.script, "signature": self.signature,
                "mode": self.mode, "signature_header": self.signature_header,
                "timestamp_header": self.timestamp_header or None,
                "delivery_header": self.delivery_header or None}


# Configuration ---------------------------------------------------------------------------------

def parse_hooks(raw: Any, base: Path) -> tuple[Hook, ...]:
    """The `[[hooks]]` array of tables; `secrets_file` paths are taken from `base`."""
    if not isinstance(raw, list):
        raise HookConfigError(f"hooks: expected an array of tables ([[hooks]]), got {raw!r}")
    hooks = tuple(_hook(f"hooks[{i}]", item, base) for i, item in enumerate(raw))
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise HookConfigError(f"hooks: two hooks share a name ({sorted(names)})")
    return hooks


def _hook(where: str, item: Any, base: Path) -> Hook:
    if not isinstance(item, dict):
        raise HookConfigError(f"{where}: expected a table")
    unknown = set(item) - _KEYS
    if unknown:
        raise HookConfigError(f"{where}.{sorted(unknown)[0]}: unknown key")
    name, script = item.get("name"), item.get("script")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise HookConfigError(f"{where}.name: expected a name matching {NAME_RE.pattern}, "
                              f"got {name!r}")
    if not isinstance(script, str) or not script:
        raise HookConfigError(f"{where}.script: expected a script name")
    signature = item.get("signature")
    if signature not in SIGNATURES:
        raise HookConfigError(f"{where}.signature: one of {list(SIGNATURES)}, got {signature!r}")
    headers = _headers(where, item, signature)
    mode = item.get("mode", "async")
    if mode not in MODES:
        raise HookConfigError(f"{where}.mode: one of {list(MODES)}, got {mode!r}")
    return Hook(name=name, script=script, signature=signature,
                secrets=_secrets(where, item, base), mode=mode,
                match=_match(where, item.get("match", {})),
                params=_params(where, item.get("params", {})),
                max_age_s=_number(where, item, "max_age_s", 300.0),
                wait_s=_number(where, item, "wait_s", 30.0),
                timeout=_number(where, item, "timeout", None),
                priority=_priority(where, item.get("priority", 0)), **headers)


def _headers(where: str, item: dict[str, Any], signature: str) -> dict[str, str]:
    """signature_header, timestamp_header and delivery_header, checked."""
    found: dict[str, str] = {}
    for key in ("signature_header", "timestamp_header", "delivery_header"):
        value = item.get(key, "")
        if not isinstance(value, str) or (value and not re.fullmatch(r"[A-Za-z0-9-]+", value)):
            raise HookConfigError(f"{where}.{key}: expected a header name, got {value!r}")
        found[key] = value
    if signature == "hmac-sha256" and not found["signature_header"]:
        raise HookConfigError(f"{where}.signature_header: required for hmac-sha256")
    if signature != "hmac-sha256" and (found["signature_header"] or found["timestamp_header"]):
        raise HookConfigError(f"{where}: signature_header and timestamp_header are for "
                              f"hmac-sha256 ({signature} names its own header and signs no time)")
    found["signature_header"] = found["signature_header"] or _DEFAULT_HEADER.get(signature, "")
    return found


def _secrets(where: str, item: dict[str, Any], base: Path) -> tuple[str, ...]:
    """`secrets` or the lines of `secrets_file`: at least one, none empty."""
    given, path = item.get("secrets"), item.get("secrets_file")
    if (given is None) == (path is None):
        raise HookConfigError(f"{where}: give exactly one of secrets or secrets_file")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise HookConfigError(f"{where}.secrets_file: expected a path string")
        try:
            text = (base / path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise HookConfigError(f"{where}.secrets_file: cannot read {base / path}: "
                                  f"{type(exc).__name__}") from None
        given = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(given, list) or not given or not all(
            isinstance(s, str) and s for s in given):
        raise HookConfigError(f"{where}.secrets: expected a non-empty array of non-empty "
                              f"strings")  # the values are never repeated
    return tuple(given)


def _source(where: str, key: Any) -> str:
    """A source key, `body:dotted.path`, `header:NAME` or `query:NAME`, checked."""
    kind, _, name = key.partition(":") if isinstance(key, str) else ("", "", "")
    if kind not in SOURCES or not name:
        raise HookConfigError(f"{where}: expected body:PATH, header:NAME or query:NAME, "
                              f"got {key!r}")
    return key  # type: ignore[no-any-return]


def _match(where: str, raw: Any) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if not isinstance(raw, dict):
        raise HookConfigError(f"{where}.match: expected a table of source = value")
    rules = []
    for key, value in raw.items():
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values or not all(isinstance(v, str | int | float | bool) for v in values):
            raise HookConfigError(f"{where}.match.{key}: expected a value or a list of values")
        rules.append((_source(f"{where}.match.{key}", key), values))
    return tuple(rules)


def _params(where: str, raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict):
        raise HookConfigError(f"{where}.params: expected a table of param = source")
    return tuple((name, _source(f"{where}.params.{name}", source))
                 for name, source in raw.items())


def _number(where: str, item: dict[str, Any], key: str, default: float | None) -> Any:
    value = item.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise HookConfigError(f"{where}.{key}: expected a positive number, got {value!r}")
    return float(value)


def _priority(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 1_000_000:
        raise HookConfigError(f"{where}.priority: expected an integer within ±1000000, "
                              f"got {value!r}")
    return int(value)


# Requests --------------------------------------------------------------------------------------

def _digest(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _any_equal(given: str, expected: list[str]) -> bool:
    """Whether `given` equals one of `expected`, each compared in constant time (digests of
    equal length, so not even the length leaks), every one of them compared."""
    mine = hashlib.sha256(given.encode()).digest()
    found = False
    for value in expected:
        found |= hmac.compare_digest(mine, hashlib.sha256(value.encode()).digest())
    return found


def verify(hook: Hook, headers: Mapping[str, str], body: bytes, now: float) -> str | None:
    """Why the request is not signed by one of the hook's secrets (for the audit and the log,
    never the answer), or None when it is."""
    given = headers.get(hook.signature_header)
    if not given:
        return "signature missing"
    if hook.signature == "gitlab":
        return None if _any_equal(given, list(hook.secrets)) else "signature wrong"
    message = body
    if hook.timestamp_header:
        stamp = headers.get(hook.timestamp_header, "")
        try:
            sent = float(stamp)
        except ValueError:
            return "timestamp missing or not unix seconds"
        if not abs(now - sent) <= hook.max_age_s:  # not: NaN is never in the window
            return "timestamp outside max_age_s"
        message = stamp.encode() + b"." + body
    hexes = given.strip().lower()
    if hook.signature == "github" and not hexes.startswith("sha256="):
        return "signature wrong"
    hexes = hexes.removeprefix("sha256=")
    return None if _any_equal(hexes, [_digest(s, message) for s in hook.secrets]) \
        else "signature wrong"


@dataclass(frozen=True)
class Delivery:
    """The parts of a signed request that `match` and `params` read."""

    headers: Mapping[str, str]
    query: Mapping[str, str]
    body: Any  # the JSON body, or MISSING when there is none or it is not JSON

    def get(self, key: str) -> Any:
        """The value a source key names, or MISSING."""
        kind, _, name = key.partition(":")
        if kind == "header":
            return self.headers.get(name, MISSING)
        if kind == "query":
            return self.query.get(name, MISSING)
        value = self.body
        for part in name.split("."):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return MISSING
        return value


def unmatched(hook: Hook, delivery: Delivery) -> str | None:
    """The first `match` key the delivery does not satisfy, or None when all are."""
    for key, accepted in hook.match:
        value = delivery.get(key)
        if value is MISSING or not any(_same(value, a) for a in accepted):
            return key
    return None


def _same(value: Any, accepted: Any) -> bool:
    """Equal, with true never equal to 1 (JSON keeps them apart, so must we)."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return value is accepted
    return bool(value == accepted)


def mapped_params(hook: Hook, delivery: Delivery) -> dict[str, Any]:
    """The task's params from the delivery, as the sender wrote them (no conversion, no
    quoting): the script's schema checks them like any submission's. A source the request
    lacks is left out (a default or `required` then applies)."""
    params = {}
    for name, key in hook.params:
        value = delivery.get(key)
        if value is not MISSING:
            params[name] = value
    return params
