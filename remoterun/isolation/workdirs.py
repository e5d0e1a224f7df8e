"""Attempts' work folders: found and removed under the work root, and one undone at its end."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import structlog

from remoterun.isolation.launch import Launch
from remoterun.isolation.limits import Counters

log = structlog.get_logger(__name__)


# An attempt's work folder: tempfile.mkdtemp(prefix="{task id}-{attempt}-") in the work root.
_WORK_FOLDER = re.compile(r"(?P<task>[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12})-(?P<attempt>\d+)-"
                          r"[^/]+")


def work_folders(root: Path) -> list[tuple[Path, str, int]]:
    """(folder, task id, attempt) of each attempt work folder under `root`: real folders only,
    never a symlink named like one (blocking)."""
    found = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                named = _WORK_FOLDER.fullmatch(entry.name)
                if named and entry.is_dir(follow_symlinks=False):
                    found.append((Path(entry.path), named["task"], int(named["attempt"])))
    except FileNotFoundError:
        return []
    return found


def remove_work_folders(folders: Sequence[Path]) -> int:
    """Remove each folder and what it holds (blocking); how many went. rmtree works by file
    descriptor here (`avoids_symlink_attacks`): a symlink inside is unlinked, never followed,
    and one put in a folder's place is refused; a folder still mounted on is left."""
    removed = 0
    for folder in folders:
        if os.path.ismount(folder):  # a live disk quota (a dead server's went at start)
            log.warning("work_folder_mounted", path=str(folder))
            continue
        try:
            shutil.rmtree(folder)
            removed += 1
        except OSError as exc:
            log.warning("work_folder_not_removed", path=str(folder), error=str(exc))
    return removed


def clean(launch: Launch) -> Counters:
    """The cgroups' counters once they are removed (and with them every process of the
    task); whether its quota was full; the work folder removed (blocking)."""
    counters = launch.cgroup.close() if launch.cgroup is not None else Counters()
    if launch.quota is not None:
        counters.disk_full = launch.quota.close()
    else:
        shutil.rmtree(launch.workdir, ignore_errors=True)
    return counters
