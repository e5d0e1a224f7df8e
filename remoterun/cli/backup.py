"""`remoterun backup DEST` and `remoterun restore SRC`: the database, the archive and the key.

A WAL-mode database copied with `cp` while the server writes can be torn (the -wal file holds
commits the main file lacks); SQLite's online backup API copies a consistent snapshot instead,
while the server runs on. The database is copied first, then the archive: every segment the
snapshot names was finished before it, so it is in the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from remoterun import __version__, config
from remoterun.cli.firstrun import key_path
from remoterun.vault import KEY_ENV, KEY_FILE_NAME

MANIFEST = "remoterun-backup.json"
DB_NAME = "remoterun.db"
ARCHIVE_NAME = "archive"


class BackupError(Exception):
    """A backup or restore that cannot go on; the message says why and what to do."""


def settings_from(args: argparse.Namespace) -> config.Settings:
    """The server's settings as `serve` would load them (--config, --db, --archive)."""
    path = Path(args.config) if args.config else (Path("config.toml")
                                                 if Path("config.toml").is_file() else None)
    overrides = {"archive_dir": Path(args.archive).resolve() if args.archive else None,
                 "db_path": Path(args.db).resolve() if args.db else None}
    return config.load(path, overrides)


def _private_folder(path: Path) -> None:
    """Make `path` (and its missing parents) 0700; a folder that exists is left as it is."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # whatever the umask


def _private_copy(source: Path, target: Path) -> None:
    """Copy one file to a new file that only its owner may read (0600)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "wb") as out, source.open("rb") as src:
        shutil.copyfileobj(src, out, 1 << 20)


def _copy_tree(source: Path, target: Path) -> int:
    """Copy a folder (folders 0700, files 0600); files that vanish meanwhile (pruned) are
    skipped. The number of files copied."""
    _private_folder(target)
    copied = 0
    for folder, dirs, files in os.walk(source):
        here = target / Path(folder).relative_to(source)
        for name in dirs:
            _private_folder(here / name)
        for name in files:
            try:
                _private_copy(Path(folder) / name, here / name)
                copied += 1
            except FileNotFoundError:
                continue
    return copied


def _copy_database(source: Path, target: Path) -> None:
    """A consistent snapshot of a live SQLite database, as one self-contained file (0600)."""
    if not source.is_file():
        raise BackupError(f"no database at {source}")
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    src = sqlite3.connect(f"file:{source}?mode=rw", uri=True, timeout=30)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # no -wal beside the copy
    finally:
        dst.close()
        src.close()


def _without_password(url: str) -> str:
    """A database URL fit to print."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = (f"{parts.username}@" if parts.username else "") + host + (
        f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def backup(settings: config.Settings, dest: Path) -> list[str]:
    """Copy the database, the archive and the key into `dest` (new or empty); what was done."""
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: back up into a new folder")
    _private_folder(dest)
    os.chmod(dest, 0o700)  # new or empty: ours
    done = []
    if settings.cluster is None:
        _copy_database(settings.db_path, dest / DB_NAME)
        done.append(f"database  {settings.db_path} -> {dest / DB_NAME} (SQLite online backup)")
    else:
        url = _without_password(settings.cluster.database_url)
        done.append(f"database  cluster mode: PostgreSQL is not copied; back it up with "
                    f"`pg_dump --format=custom --file={dest}/remoterun.pgdump '{url}'`")
    files = _copy_tree(settings.archive_dir, dest / ARCHIVE_NAME) if (
        settings.archive_dir.is_dir()) else 0
    done.append(f"archive   {settings.archive_dir} -> {dest / ARCHIVE_NAME} ({files} files)")
    done.append(_backup_key(settings, dest))
    manifest = {"version": __version__, "created": time.time(),
                "database": "sqlite" if settings.cluster is None else "postgres"}
    fd = os.open(dest / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(fd, "w") as fh:
        json.dump(manifest, fh)
    return done


def _backup_key(settings: config.Settings, dest: Path) -> str:
    """Copy the secret key file (the stored secrets are unreadable without it)."""
    source = key_path(settings)
    if source.is_file():
        _private_copy(source, dest / KEY_FILE_NAME)
        return f"key       {source} -> {dest / KEY_FILE_NAME}"
    return (f"key       none at {source} (if the server reads ${KEY_ENV}, keep that value "
            f"with this backup)")


def _refuse_existing(settings: config.Settings, key: Path) -> None:
    """A restore writes only into a fresh data folder: never over a live one."""
    db = settings.db_path
    paths = [db, db.with_name(db.name + "-wal")] if settings.cluster is None else []
    paths.append(key)
    for path in paths:
        if path.exists():
            raise BackupError(f"{path} already exists: restore into a fresh data folder "
                              f"(stop the server and move its data away, or choose other paths)")
    archive = settings.archive_dir
    if archive.exists() and any(archive.iterdir()):
        raise BackupError(f"{archive} already exists and is not empty: restore into a fresh "
                          f"data folder")


def restore(settings: config.Settings, src: Path) -> list[str]:
    """Copy a backup's database, archive and key to the paths `settings` names."""
    if not (src / MANIFEST).is_file():
        raise BackupError(f"{src} is not a remoterun backup (no {MANIFEST})")
    key = key_path(settings)
    _refuse_existing(settings, key)
    if settings.cluster is None:
        _private_folder(settings.db_path.parent)
        _private_copy(src / DB_NAME, settings.db_path)
        done = [f"database  {src / DB_NAME} -> {settings.db_path}"]
    else:
        done = ["database  cluster mode: restore PostgreSQL with pg_restore "
                f"(from {src}/remoterun.pgdump if you made it there)"]
    if (src / ARCHIVE_NAME).is_dir():
        files = _copy_tree(src / ARCHIVE_NAME, settings.archive_dir)
        done.append(f"archive   {src / ARCHIVE_NAME} -> {settings.archive_dir} ({files} files)")
    if (src / KEY_FILE_NAME).is_file():
        _private_folder(key.parent)
        _private_copy(src / KEY_FILE_NAME, key)
        done.append(f"key       {src / KEY_FILE_NAME} -> {key}")
    return done


def command(args: argparse.Namespace) -> int:
    """`remoterun backup DEST` / `remoterun restore SRC`: 0, 1 if refused, 2 on a bad config."""
    try:
        settings = settings_from(args)
    except config.ConfigError as exc:
        print(f"remoterun: config error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.verb == "backup":
            done = backup(settings, Path(args.dest).resolve())
        else:
            done = restore(settings, Path(args.src).resolve())
    except (BackupError, OSError, sqlite3.Error) as exc:
        print(f"remoterun: {args.verb}: {exc}", file=sys.stderr)
        return 1
    print("\n".join(done))
    return 0


def add_parsers(sub: Any, server_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `backup` and `restore` verbs."""
    b = sub.add_parser("backup", help="copy the database (safely, while the server runs), "
                                      "the archive and the secret key into DEST")
    b.add_argument("dest", metavar="DEST", help="a new or empty folder (made 0700)")
    r = sub.add_parser("restore", help="copy a backup into a fresh data folder "
                                       "(never over an existing database)")
    r.add_argument("src", metavar="SRC", help="a folder `remoterun backup` made")
    for p in (b, r):
        server_flags(p)
