"""The scripts directory: which files may run, their metadata and parameter schemas."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from remoterun.config import (
    ConfigError,
    ResourceLimits,
    SandboxConfig,
    loader_variable,
    parse_env,
    parse_limits,
    parse_sandbox,
)
from remoterun.errors import BadMetadata, BadRequest, InvalidParams, NotFound

KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # \Z: "$" would let "k\n" through
MAX_NAME_CHARS = 1024  # a script name; one path part is at most 255 bytes on Linux
MAX_PART_BYTES = 255
SIDECAR_SUFFIX = ".toml"
RESOLVE_CACHE_S = 1.0
PARAM_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool}
_PARAM_KEYS = {"type", "required", "default", "enum", "pattern", "secret", "description",
               "min", "max"}
_META_KEYS = {"description", "timeout_s", "max_concurrency", "roles", "cwd", "params",
              "max_retries", "retry_base_s", "max_output_bytes"}
_ISOLATION_KEYS = {"sandbox": parse_sandbox, "limits": parse_limits, "env": parse_env}
_META_KEYS |= {"sha256"}  # integrity (issue 13 B): the digest the script's bytes must have
SIG_SUFFIX = ".sig"  # a script's signature file (integrity.py), never itself a script
# How strongly a mode isolates: a sidecar may not choose a weaker one than config.toml's.
MODE_STRENGTH = {"none": 0, "auto": 1, "bwrap": 2, "docker": 2, "gvisor": 3}
CONFIG_ONLY = "may be set only in config.toml"

Scalar = str | int | float | bool


@dataclass(frozen=True)
class Param:
    """One declared parameter of a script."""

    name: str
    type: str = "string"
    required: bool = False
    default: Scalar | None = None
    enum: tuple[Scalar, ...] | None = None
    pattern: str | None = None
    secret: bool = False
    description: str = ""
    min: float | None = None
    max: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The schema entry as GET /scripts shows it."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "required": self.required}
        for key in ("default", "enum", "pattern", "description", "min", "max"):
            value = getattr(self, key)
            if value not in (None, ""):
                out[key] = list(value) if key == "enum" else value
        if self.secret:
            out["secret"] = True
            out.pop("default", None)
        return out


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
        if not isinstance(params, dict):
            raise BadRequest("params must be a JSON object", details=[
                {"field": "params", "message": "expected an object"}])
        if self.params is None:
            return _free_form(params)
        problems = _case_collisions(params)
        known = {p.name: p for p in self.params}
        for key in params:
            if key not in known:
                problems.append({"field": f"params.{key}", "message": "unknown parameter"})
        out: dict[str, Scalar] = {}
        for p in self.params:
            if p.name in params:
                message = _check(p, params[p.name])
                if message:
                    problems.append({"field": f"params.{p.name}", "message": message})
                else:
                    out[p.name] = params[p.name]
            elif p.default is not None:
                out[p.name] = p.default
            elif p.required:
                problems.append({"field": f"params.{p.name}", "message": "required"})
        if problems:
            raise InvalidParams("params do not match the script's schema", details=problems)
        return out


def _scalar_problem(value: Any) -> str | None:
    """Why a param value cannot reach a script's argv and environment, if it cannot."""
    if isinstance(value, str) and "\x00" in value:
        return "must not contain a NUL byte"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    return None


def _case_collisions(keys: Any) -> list[dict[str, str]]:
    """Keys that differ only in case would set the same RR_PARAM_ variable."""
    seen: dict[str, str] = {}
    problems = []
    for key in keys:
        other = seen.setdefault(str(key).upper(), key)
        if other != key:
            problems.append({"field": f"params.{key}",
                             "message": f"differs from {other!r} only in case"})
    return problems


def _free_form(params: dict[str, Any]) -> dict[str, Scalar]:
    problems = _case_collisions(params)
    for key, value in params.items():
        if not KEY_RE.match(key):
            problems.append({"field": f"params.{key}", "message": "key must match "
                             + KEY_RE.pattern})
        elif value is None or not isinstance(value, str | int | float | bool):
            problems.append({"field": f"params.{key}",
                             "message": "value must be a string, number or boolean"})
        elif (problem := _scalar_problem(value)) is not None:
            problems.append({"field": f"params.{key}", "message": problem})
    if problems:
        raise InvalidParams("params must be flat scalars with simple keys", details=problems)
    return {key: params[key] for key in sorted(params)}


def _check(p: Param, value: Any) -> str | None:
    if p.type == "boolean":
        ok = isinstance(value, bool)
    elif p.type == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif p.type == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:  # a secret's value is never shown back, not even a wrong one
        return f"expected {p.type}" if p.secret else f"expected {p.type}, got {json.dumps(value)}"
    problem = _scalar_problem(value)
    if problem is not None:
        return problem
    if p.enum is not None and value not in p.enum:
        return f"must be one of {list(p.enum)}"
    if p.pattern is not None and not re.fullmatch(p.pattern, value):
        return f"must match {p.pattern}"
    if p.min is not None and value < p.min:
        return f"must be >= {p.min}"
    if p.max is not None and value > p.max:
        return f"must be <= {p.max}"
    return None


def param_value(value: Scalar) -> str:
    """A param as PROTOCOL.md passes it: strings as they are, other scalars as JSON writes them."""
    return value if isinstance(value, str) else json.dumps(value)


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
    if param.default is not None and _check(param, param.default):
        raise MetadataError(f"{where}.params.{name}.default: {_check(param, param.default)}")
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
        clash = _case_collisions(raw["params"])
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


class Catalogue:
    """The scripts directory, confined: nothing outside it ever resolves."""

    def __init__(self, root: Path, config_meta: Mapping[str, Mapping[str, Any]] | None = None,
                 sandbox: SandboxConfig | None = None, limits: ResourceLimits | None = None):
        """`sandbox` and `limits` are config.toml's: what a sidecar may not weaken."""
        self.root = root.resolve()
        self._config_meta = dict(config_meta or {})
        self._sandbox = sandbox or SandboxConfig()
        self._limits = limits or ResourceLimits()
        self._cache: dict[str, tuple[float, Script]] = {}

    def _confine(self, name: str) -> tuple[str, Path]:
        if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
            raise NotFound(f"no script named {name[:100]!r}", code="unknown_script")
        if len(name) > MAX_NAME_CHARS or any(
                len(part.encode("utf-8", "surrogatepass")) > MAX_PART_BYTES
                for part in name.split("/")):
            raise NotFound(f"no script named {name[:100]!r}... (names are at most "
                           f"{MAX_NAME_CHARS} characters, {MAX_PART_BYTES} bytes a part)",
                           code="unknown_script")
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts:
            raise NotFound(f"{name!r} is outside the scripts directory", code="unknown_script")
        parts = [p for p in pure.parts if p != "."]
        if not parts or any(p.startswith(".") for p in parts) or name.endswith(
                (SIDECAR_SUFFIX, SIG_SUFFIX)):
            raise NotFound(f"no script named {name!r}", code="unknown_script")
        clean = "/".join(parts)
        try:
            real = (self.root / clean).resolve()
            runnable = real.is_file() and os.access(real, os.X_OK)
        except (OSError, ValueError):  # a loop of links, a name the OS refuses
            raise NotFound(f"no script named {name!r}", code="unknown_script") from None
        if not real.is_relative_to(self.root):
            raise NotFound(f"{name!r} leads outside the scripts directory", code="unknown_script")
        if not runnable:
            raise NotFound(f"{name!r} is not executable: chmod +x it in the scripts directory"
                           if real.is_file() else f"no executable script named {name!r}",
                           code="unknown_script")
        return clean, real

    def resolve(self, name: str) -> Script:
        """The script called `name`, with its metadata; NotFound for anything not runnable.

        A resolution is reused for RESOLVE_CACHE_S: it costs a realpath walk and a few stats,
        and a task resolves its script several times (submit, start, timeout, retry). A script
        changed or removed is seen within that time; one removed since fails at spawn.
        """
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        _, real = self._confine(name)
        # A symlink alias inside the directory is its target: one name, the target's
        # metadata (roles, schema, secrets, limits), the target's entry in script lists.
        target = real.relative_to(self.root).as_posix()
        script = Script(name=target, path=real, **self._metadata(target))
        if len(self._cache) >= 1024:
            self._cache.clear()
        self._cache[name] = (now + RESOLVE_CACHE_S, script)
        return script

    def _metadata(self, name: str) -> dict[str, Any]:
        if name in self._config_meta:
            return parse_metadata(f"scripts.{name!r}", self._config_meta[name])
        where = name + SIDECAR_SUFFIX  # the sidecar's path in the scripts directory
        sidecar = self.root / where
        if not sidecar.is_file():
            return {}
        data = sidecar.read_bytes()  # read once: what is parsed is what a signature covers
        try:
            raw = tomllib.loads(data.decode())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise MetadataError(f"{where}: not valid TOML: {exc}") from exc
        try:
            meta = parse_metadata(where, raw)
        except (TypeError, ValueError, re.error) as exc:  # e.g. enum = 5: a value of a wrong kind
            raise MetadataError(f"{where}: {exc}") from exc
        check_sidecar(where, meta, self._sandbox, self._limits)
        return {**meta, "sidecar_sha256": hashlib.sha256(data).hexdigest()}

    def names(self) -> list[str]:
        """Every runnable script name, sorted."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel = Path(dirpath).relative_to(self.root)
            for filename in filenames:
                name = (rel / filename).as_posix()
                try:
                    self._confine(name)
                except NotFound:
                    continue
                found.append(name)
        return sorted(found)

    def scripts(self) -> list[Script]:
        """Every runnable script with its metadata; one whose metadata is malformed is listed
        with its `error` instead (and never runs: resolve refuses it)."""
        out: dict[str, Script] = {}
        for name in self.names():
            try:
                script = self.resolve(name)
            except MetadataError as exc:
                script = self.broken(name, exc)
            except NotFound:  # removed since names() saw it
                continue
            out.setdefault(script.name, script)  # an alias is listed as its target
        return list(out.values())

    def broken(self, name: str, exc: MetadataError) -> Script:
        """The listing of a script whose metadata is malformed: its name and the error."""
        _, real = self._confine(name)
        return Script(name=real.relative_to(self.root).as_posix(), path=real, error=str(exc))

    def check(self) -> list[Script]:
        """Raise MetadataError for config.toml's first malformed script table (the server's own
        configuration); return the scripts whose sidecars are broken (those only warn)."""
        for name in self._config_meta:
            parse_metadata(f"scripts.{name!r}", self._config_meta[name])
        return [s for s in self.scripts() if s.error is not None]
