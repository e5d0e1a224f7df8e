"""A script's metadata (config.toml's table or a sidecar): the Script it describes, checked."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remoterun.catalogue.params import (
    KEY_RE,
    PARAM_TYPES,
    Param,
    Scalar,
    case_collisions,
    check_params,
    check_value,
)
from remoterun.config import (
    ConfigError,
    ResourceLimits,
    SandboxConfig,
    loader_variable,
    parse_env,
    parse_limits,
    parse_sandbox,
)
from remoterun.errors import BadMetadata

_PARAM_KEYS = {"type", "required", "default", "enum", "pattern", "secret", "description",
               "min", "max"}
_META_KEYS = {"description", "timeout_s", "max_concurrency", "roles", "cwd", "params",
              "max_retries", "retry_base_s", "max_output_bytes"}
_ISOLATION_KEYS = {"sandbox": parse_sandbox, "limits": parse_limits, "env": parse_env}
_META_KEYS |= {"sha256"}  # integrity (issue 13 B): the digest the script's bytes must have
# How strongly a mode isolates: a sidecar may not choose a weaker one than config.toml's.
MODE_STRENGTH = {"none": 0, "auto": 1, "bwrap": 2, "docker": 2, "gvisor": 3}
CONFIG_ONLY = "may be set only in config.toml"


@dataclass(frozen=True)
class Script:
    """A runnable file under the scripts directory, with its metadata."""

    name: str
    path: Path
    description: str = ""
    params: tuple[Param, ...] | None = None  # None: free-form params
    timeout_s: float | None = None
    max_concurrency: int | None = None
    roles: tuple[str, ...] | None = None
    cwd: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Isolation (issue 13), as the metadata gives them; sandbox.Sandbox.policy merges them.
    sandbox: Mapping[str, Any] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    sha256: str | None = None  # pinned by its metadata: its bytes must have this digest
    # The SHA-256 of the sidecar bytes this metadata was parsed from (None: no sidecar read):
    # a signature covers the script and these bytes together (integrity.py).
    sidecar_sha256: str | None = None
    # Why its metadata is unusable (MetadataError's text): listed with it, never run.
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry of GET /scripts (`error` only for a script whose metadata is broken)."""
        out = {
            "name": self.name,
            "description": self.description,
            "params": None if self.params is None else [p.to_json() for p in self.params],
            "timeout": self.timeout_s,
            "max_concurrency": self.max_concurrency,
            "roles": None if self.roles is None else list(self.roles),
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    @property
    def secret_keys(self) -> frozenset[str]:
        """Names of params never shown back to clients."""
        return frozenset(p.name for p in self.params or () if p.secret)

    def validate(self, params: Any) -> dict[str, Scalar]:
        """Check params against the schema; return them complete, in the order to pass them."""
        return check_params(self.params, params)


class MetadataError(BadMetadata):
    """A script's metadata (config.toml or sidecar) is malformed; names the script and key.

    A sidecar's never stops the server nor hides the script: the script is listed with this
    text as its `error`, and a submission or an attempt is refused with it (422)."""


def _parse_param(where: str, name: str, raw: Any) -> Param:
    if not isinstance(raw, dict):
        raise MetadataError(f"{where}.params.{name}: expected a table")
    unknown = set(raw) - _PARAM_KEYS
    if unknown:
        raise MetadataError(f"{where}.params.{name}.{sorted(unknown)[0]}: unknown key")
    kind = raw.get("type", "string")
    if kind not in PARAM_TYPES:
        raise MetadataError(f"{where}.params.{name}.type: expected one of {list(PARAM_TYPES)}")
    if not KEY_RE.match(name):
        raise MetadataError(f"{where}.params.{name}: name must match {KEY_RE.pattern}")
    param = Param(
        name=name, type=kind, required=bool(raw.get("required", False)),
        default=raw.get("default"), enum=tuple(raw["enum"]) if "enum" in raw else None,
        pattern=raw.get("pattern"), secret=bool(raw.get("secret", False)),
        description=str(raw.get("description", "")), min=raw.get("min"), max=raw.get("max"),
    )
    if param.default is not None and check_value(param, param.default):
        raise MetadataError(f"{where}.params.{name}.default: {check_value(param, param.default)}")
    return param


def parse_metadata(where: str, raw: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a metadata table; return the keyword arguments of Script it describes."""
    unknown = set(raw) - _META_KEYS - set(_ISOLATION_KEYS)
    if unknown:
        raise MetadataError(f"{where}.{sorted(unknown)[0]}: unknown key")
    out: dict[str, Any] = {"description": str(raw.get("description", ""))}
    if "params" in raw:
        if not isinstance(raw["params"], dict):
            raise MetadataError(f"{where}.params: expected a table of parameters")
        out["params"] = tuple(_parse_param(where, k, v) for k, v in raw["params"].items())
        clash = case_collisions(raw["params"])
        if clash:
            raise MetadataError(f"{where}.{clash[0]['field']}: {clash[0]['message']}")
    for key, kind in (("timeout_s", (int, float)), ("max_concurrency", (int,)),
                      ("max_output_bytes", (int,))):
        if key in raw:
            if isinstance(raw[key], bool) or not isinstance(raw[key], kind) or raw[key] <= 0:
                raise MetadataError(f"{where}.{key}: expected a positive number, got {raw[key]!r}")
            out[key] = raw[key]
    if "roles" in raw:
        out["roles"] = tuple(raw["roles"])
    if "cwd" in raw:
        out["cwd"] = Path(raw["cwd"])
    for key, parser in _ISOLATION_KEYS.items():  # sandbox.py merges them with the config's
        if key in raw:
            try:
                out[key] = parser(f"{where}.{key}", raw[key])
            except ConfigError as exc:
                raise MetadataError(str(exc)) from None
    if "sha256" in raw:
        if not isinstance(raw["sha256"], str) or not re.fullmatch(r"[0-9a-fA-F]{64}",
                                                                    raw["sha256"]):
            raise MetadataError(f"{where}.sha256: expected 64 hex digits, got {raw['sha256']!r}")
        out["sha256"] = raw["sha256"].lower()
    out["extra"] = {k: raw[k] for k in ("max_retries", "retry_base_s") if k in raw}
    if "max_output_bytes" in out:
        out["extra"]["max_output_bytes"] = out.pop("max_output_bytes")
    return out


def check_sidecar(where: str, meta: Mapping[str, Any], sandbox: SandboxConfig,
                  limits: ResourceLimits) -> None:
    """MetadataError if a sidecar's metadata (parsed) weakens what config.toml sets for every
    task, or sets a variable that changes what programs load: whoever can write beside a
    script may tighten its isolation, never loosen it."""
    for name in meta.get("env", {}):
        if loader_variable(name):
            raise MetadataError(f"{where}.env.{name}: a variable that changes what programs "
                                f"load or run (LD_*, BASH_ENV, ENV, PATH, PYTHON*...) "
                                f"{CONFIG_ONLY}")
    box = meta.get("sandbox", {})
    if MODE_STRENGTH[box.get("mode", sandbox.mode)] < MODE_STRENGTH[sandbox.mode]:
        raise MetadataError(f"{where}.sandbox.mode: {box['mode']!r} is weaker than "
                            f"[sandbox] mode {sandbox.mode!r}: a weaker mode {CONFIG_ONLY}")
    if box.get("network") is True and not sandbox.network:
        raise MetadataError(f"{where}.sandbox.network: [sandbox] network is false; turning "
                            f"it on {CONFIG_ONLY}")
    if box.get("run_as", sandbox.run_as) != sandbox.run_as:
        raise MetadataError(f"{where}.sandbox.run_as: the user a script runs as {CONFIG_ONLY}")
    seccomp = box.get("seccomp", sandbox.seccomp)
    if seccomp != sandbox.seccomp and not (seccomp == "default" and sandbox.seccomp == "off"):
        raise MetadataError(f"{where}.sandbox.seccomp: {seccomp!r} is not [sandbox] seccomp "
                            f"{sandbox.seccomp!r}: turning the filter off or choosing a "
                            f"profile {CONFIG_ONLY}")
    for key, value in meta.get("limits", {}).items():
        base = getattr(limits, key)
        if base and (value == 0 or value > base):
            raise MetadataError(f"{where}.limits.{key}: {value} lifts or raises [limits] "
                                f"{key} = {base}: a sidecar may only lower it; more "
                                f"{CONFIG_ONLY}")

