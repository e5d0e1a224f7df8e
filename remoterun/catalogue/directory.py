"""The scripts directory: which files may run, their metadata and parameter schemas."""

from __future__ import annotations

import hashlib
import os
import re
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from remoterun.catalogue.metadata import MetadataError, Script, check_sidecar, parse_metadata
from remoterun.config import ResourceLimits, SandboxConfig
from remoterun.errors import NotFound

MAX_NAME_CHARS = 1024  # a script name; one path part is at most 255 bytes on Linux
MAX_PART_BYTES = 255
SIDECAR_SUFFIX = ".toml"
SIG_SUFFIX = ".sig"  # a script's signature file (integrity.py), never itself a script
RESOLVE_CACHE_S = 1.0


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
