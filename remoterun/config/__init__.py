"""Settings: frozen dataclasses read from config.toml; every error names the key at fault.

settings.py holds the types, sections.py the checks of each table, parsing.py `parse` and `load`.
"""

from remoterun.config.parsing import COMPRESSORS, LOG_LEVELS, load, parse
from remoterun.config.sections import (
    ENV_NAME_RE,
    LOADER_ENV,
    LOADER_ENV_PREFIXES,
    MIN_TOKEN_CHARS,
    loader_variable,
    parse_env,
    parse_limits,
    parse_sandbox,
)
from remoterun.config.settings import (
    ALERT_EVENTS,
    ALERT_KINDS,
    LIMIT_KEYS,
    ROLES,
    SANDBOX_MODES,
    Alert,
    Cluster,
    ConfigError,
    ResourceLimits,
    SandboxConfig,
    Settings,
    Token,
)

__all__ = [
    "ALERT_EVENTS", "ALERT_KINDS", "COMPRESSORS", "ENV_NAME_RE", "LIMIT_KEYS", "LOADER_ENV",
    "LOADER_ENV_PREFIXES", "LOG_LEVELS", "MIN_TOKEN_CHARS", "ROLES", "SANDBOX_MODES", "Alert",
    "Cluster", "ConfigError", "ResourceLimits", "SandboxConfig", "Settings", "Token", "load",
    "loader_variable", "parse", "parse_env", "parse_limits", "parse_sandbox",
]
