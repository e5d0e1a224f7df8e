"""What `serve` says when it runs with no config: where it keeps what, and how to begin."""

from __future__ import annotations

import os
from pathlib import Path

from remoterun import config
from remoterun.vault import KEY_ENV, KEY_FILE_NAME


def key_path(settings: config.Settings) -> Path:
    """Where the server's secret key file is (or will be made)."""
    return settings.secret_key_path or settings.db_path.parent / KEY_FILE_NAME


def check_scripts(settings: config.Settings, first_run: bool) -> bool:
    """Make the scripts folder on a first run (no config); True if made. Otherwise a missing
    or wrong folder is a config error that says what to create."""
    folder = settings.scripts_dir
    if first_run and not folder.exists():
        folder.mkdir(parents=True)
        return True
    if not folder.exists():
        raise config.ConfigError(f"paths.scripts: {folder} does not exist; create it "
                                 f"(mkdir -p {folder}) and put executable scripts in it")
    if not folder.is_dir():
        raise config.ConfigError(f"paths.scripts: {folder} is not a directory")
    return False


def message(settings: config.Settings, url: str, made_scripts: bool) -> str:
    """The lines printed at a start with no config file: absolute paths, a first step, the page."""
    head = ("first run here: no config.toml, so RemoteRun keeps everything in this folder"
            if made_scripts else "no config.toml: RemoteRun keeps everything here")
    key = (f"from ${KEY_ENV}" if os.environ.get(KEY_ENV) else str(key_path(settings)))
    example = settings.scripts_dir / "hello.sh"
    return "\n".join([
        f"remoterun: {head}:",
        f"  scripts     {settings.scripts_dir}" + (" (made, empty)" if made_scripts else ""),
        f"  database    {settings.db_path}",
        f"  archive     {settings.archive_dir}",
        f"  secret key  {key}",
        "  add a script: printf '#!/bin/sh\\necho hello\\n' > "
        f"{example} && chmod +x {example}",
        f"  the page:   {url}",
        "  to keep these elsewhere, write config.toml ([paths]; see the README's Configuration)",
    ])
