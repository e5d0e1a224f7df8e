"""The archive is the server's alone: its folders 0700 and its files 0600 whatever the umask.

`private_folder` and `private_open` make them so; `make_private` tightens an archive found open.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import structlog

FOLDER_MODE, FILE_MODE = 0o700, 0o600
log = structlog.get_logger(__name__)


def private_folder(folder: Path) -> None:
    """Make a folder and any missing parents, each 0700 (Path.mkdir gives parents the umask's
    mode)."""
    try:
        folder.mkdir(mode=FOLDER_MODE)
    except FileExistsError:
        pass
    except FileNotFoundError:
        private_folder(folder.parent)
        folder.mkdir(mode=FOLDER_MODE, exist_ok=True)


def private_open(path: str, flags: int) -> int:
    """An opener for open(): a file created 0600."""
    return os.open(path, flags, FILE_MODE)


def make_private(root: Path) -> int:
    """Make the archive's root (and missing parents) 0700; if the root was open to others (a folder
    that existed before the first start, an older server's), every folder under it 0700 and
    every file 0600 too. How many modes were changed. Start-up: blocking."""
    private_folder(root)
    if not stat.S_IMODE(root.stat().st_mode) & 0o077:
        return 0  # closed: nobody else reaches what is inside, whatever its modes
    changed = 0
    for folder, _, filenames in os.walk(root):  # every folder comes once as `folder`
        changed += _tighten(folder, FOLDER_MODE)
        changed += sum(_tighten(os.path.join(folder, name), FILE_MODE) for name in filenames)
    log.warning("archive_mode_tightened", path=str(root), changed=changed)
    return changed


def _tighten(path: str, mode: int) -> bool:
    """Give a path (never a link's target) `mode` if it has another; whether it did."""
    try:
        found = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(found) or stat.S_IMODE(found) == mode:
        return False
    os.chmod(path, mode)
    return True
