"""Archive upkeep: the retention sweeper, and `archive verify` of the database against the disk.

The sweeper deletes the archived output of ended tasks that ended more than `max_age_days` ago
and, while the archive is over `max_total_bytes`, of the earliest ended first; a task that is
running or waiting for a retry is never touched, as its archive may still grow. The segment rows
are marked pruned in one transaction before the files go, so a crash between the two leaves
files that `verify --repair` deletes, never rows that point at nothing; the task row stays.

The server holds an advisory lock on `<archive>/.remoterun.lock` for as long as its sweeper
runs, so that `verify` knows whether the open segments it sees are being written right now (and
leaves them alone) or were left open by a crash (and `--repair` finalizes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from remoterun import archive
from remoterun import store as dbm
from remoterun.archive import segments
from remoterun.archive.scan import scan
from remoterun.config import Settings
from remoterun.state import FINAL
from remoterun.wire import rfc3339

log = structlog.get_logger(__name__)
LOCK_NAME = ".remoterun.lock"
_PRUNE_BATCH = 500


# The lock --------------------------------------------------------------------------------------

@contextlib.contextmanager
def archive_lock(root: Path) -> Iterator[bool]:
    """Hold the archive's advisory lock while inside; yields whether we got it."""
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # no archive directory: nobody can be writing in it
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(fd)  # releases the lock


# Retention -------------------------------------------------------------------------------------

def _remove_folder(root: Path, logs_path: str) -> None:
    """Delete a task's archive folder, then the day, month and year folders left empty."""
    folder = (root / logs_path).resolve()
    if not folder.is_relative_to(root.resolve()) or folder == root.resolve():
        raise ValueError(f"refusing to delete {folder}: not a task folder under {root}")
    shutil.rmtree(folder, ignore_errors=True)
    for parent in folder.parents:
        if parent == root.resolve():
            break
        try:
            parent.rmdir()
        except OSError:
            break  # not empty


class Sweeper:
    """Applies the retention policy every `retention_interval_s`; run() is owned by the app."""

    def __init__(self, settings: Settings, db: dbm.Store):
        self.settings = settings
        self.db = db

    async def run(self) -> None:
        """Hold the archive lock and sweep until cancelled."""
        with archive_lock(self.settings.archive_dir) as locked:
            if not locked:
                log.warning("archive_lock_held", archive=str(self.settings.archive_dir),
                            hint="another server uses this archive")
            while True:
                try:
                    await self.sweep()
                except Exception:
                    log.exception("retention_sweep_failed")
                await asyncio.sleep(self.settings.retention_interval_s)

    async def sweep(self, now: float | None = None) -> list[str]:
        """Prune what the policy says now; the ids of the tasks whose output was deleted."""
        settings = self.settings
        now = time.time() if now is None else now
        doomed: list[dict[str, Any]] = []
        if settings.retention_max_age_days:
            cutoff = now - settings.retention_max_age_days * 86400
            doomed += await self.db.prunable(ended_before=cutoff)
        if settings.retention_max_total_bytes:
            doomed += await self._to_fit(doomed)
        for start in range(0, len(doomed), _PRUNE_BATCH):
            await self._prune(doomed[start : start + _PRUNE_BATCH])
        return [row["task_id"] for row in doomed]

    async def _to_fit(self, doomed: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The earliest ended tasks to prune besides `doomed` to get under max_total_bytes."""
        excess = await self.db.archive_bytes() - self.settings.retention_max_total_bytes
        excess -= sum(row["gz_bytes"] for row in doomed)
        if excess <= 0:
            return []
        chosen = {row["task_id"] for row in doomed}
        more = []
        for row in await self.db.prunable():
            if excess <= 0:
                break
            if row["task_id"] not in chosen:
                more.append(row)
                excess -= row["gz_bytes"]
        return more

    async def _prune(self, rows: list[dict[str, Any]]) -> None:
        await self.db.commit([dbm.mark_pruned(row["task_id"]) for row in rows], 30.0)
        root = self.settings.archive_dir
        for row in rows:
            await asyncio.to_thread(_remove_folder, root, row["logs_path"])
            log.info("archive_pruned", task_id=row["task_id"], gz_bytes=row["gz_bytes"],
                     ended=rfc3339(row["ended"]))


# Verify ----------------------------------------------------------------------------------------

@dataclass
class Finding:
    """One disagreement between the database and the disk."""

    kind: str  # missing, incomplete, stale_row, stray, pruned_present, leftover, no_task
    path: str  # relative to the archive root
    detail: str
    repaired: bool = False

    def line(self) -> str:
        """The finding as `archive verify` prints it."""
        return f"{self.kind:<15} {self.path}  {self.detail}" + ("  [repaired]" * self.repaired)


@dataclass
class Report:
    """What `archive verify` found and did."""

    live: bool  # a server holds the archive: its open segments were not judged
    segments: int = 0
    files: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing is left wrong."""
        return all(f.repaired for f in self.findings)


class _Verifier:
    """One pass of `archive verify`: rows against files, then files against rows."""

    def __init__(self, settings: Settings, db: dbm.Store, repair: bool, live: bool):
        self.root = settings.archive_dir
        self.deflate = archive.deflate_of(settings)
        self.db = db
        self.repair = repair
        self.live = live
        self.findings: list[Finding] = []
        self.statements: list[dbm.Statement] = []

    def note(self, kind: str, path: str, detail: str, repaired: bool = False) -> None:
        self.findings.append(Finding(kind, path, detail, repaired))

    def busy(self, status: str | None) -> bool:
        """Whether a live server may be writing this task's archive right now."""
        return self.live and status is not None and status not in FINAL

    def check_row(self, row: dict[str, Any]) -> None:
        path = row["path"]
        log_path = self.root / path
        pair = [p for p in (log_path, segments.index_path(log_path)) if p.exists()]
        if row["pruned"]:
            if pair:
                if self.repair:
                    for p in pair:
                        p.unlink()
                self.note("pruned_present", path, "pruned by retention, yet still on disk",
                          self.repair)
            return
        if row["task_status"] is None:
            self.note("no_task", path, f"the row names task {row['task_id']}, which is unknown")
        if self.busy(row["task_status"]):
            return
        found = scan(log_path)
        if found.missing and all(p.stat().st_size == 0 for p in pair):
            # Cut by a kill as the segment was opened (rotation): it never held a frame.
            if self.repair:
                for p in pair:
                    p.unlink()
                self.statements.append(dbm.delete_segment(path))
            self.note("empty", path, "an empty segment a kill left at its opening", self.repair)
        elif found.missing:
            self.note("missing", path, "; ".join(found.problems))
        elif not found.complete:
            if self.repair:
                segment, _ = archive.finalize(self.root, path, self.deflate)
                self.statements.append(dbm.upsert_segment(row["task_id"], segment))
            self.note("incomplete", path, "; ".join(found.problems), self.repair)
        elif (found.last_seq, found.raw_bytes) != (row["last_seq"], row["raw_bytes"]) \
                or row["closed_at"] is None:
            detail = (f"row says last_seq {row['last_seq']}, {row['raw_bytes']} bytes"
                      f"{', open' if row['closed_at'] is None else ''}; the files hold "
                      f"{found.last_seq}, {found.raw_bytes} bytes")
            if self.repair:
                segment, _ = archive.finalize(self.root, path, self.deflate)
                self.statements.append(dbm.upsert_segment(row["task_id"], segment))
            self.note("stale_row", path, detail, self.repair)

    def check_file(self, path: Path, known: set[str],
                   folders: dict[str, tuple[str, str]]) -> None:
        rel = path.relative_to(self.root).as_posix()
        if path.name.endswith(".tmp"):
            if self.repair:
                path.unlink()
            self.note("leftover", rel, "a temporary file of an interrupted repair", self.repair)
            return
        if segments.parse_name(path.name) is None:
            return
        log_path = path
        if path.name.endswith(segments.INDEX_SUFFIX):
            log_path = path.with_name(path.name[: -len(segments.INDEX_SUFFIX)]
                                      + segments.LOG_SUFFIX)
            if log_path.exists():
                return  # judged with its log
        if log_path.relative_to(self.root).as_posix() in known:
            return
        owner = folders.get(path.parent.relative_to(self.root).as_posix())
        if owner is not None and self.busy(owner[1]):
            return  # its row is written at the next flush tick
        adopt = (self.repair and owner is not None and path == log_path
                 and segments.index_path(path).exists())
        if adopt:
            assert owner is not None
            segment, _ = archive.finalize(self.root, rel, self.deflate)
            self.statements.append(dbm.upsert_segment(owner[0], segment))
        who = f"task {owner[0]}'s folder" if owner else "no task's folder"
        self.note("stray", rel, f"no row records this file ({who})", adopt)


def _archive_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME)


async def verify(settings: Settings, db: dbm.Store, repair: bool = False) -> Report:
    """Check every segment row against its files and every file against the rows."""
    with archive_lock(settings.archive_dir) as locked:
        live = not locked and settings.archive_dir.is_dir()
        checker = _Verifier(settings, db, repair, live)
        rows = await db.all_segments()
        folders = await db.task_folders()
        for row in rows:
            await asyncio.to_thread(checker.check_row, row)
        known = {row["path"] for row in rows}
        files = await asyncio.to_thread(_archive_files, settings.archive_dir)
        for path in files:
            await asyncio.to_thread(checker.check_file, path, known, folders)
        if checker.statements:
            await db.commit(checker.statements, 30.0)
    return Report(live=live, segments=len(rows), files=len(files),
                  findings=checker.findings)
