"""One attempt's mechanics for the scheduler: its limits and archive, starting its process
under the task's protections, its segment rows once it ended, and the delay of a retry."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import structlog

from remoterun import store
from remoterun.archive import Segment, TaskArchive, deflate_of, settle
from remoterun.archive.compressor import Compressor
from remoterun.catalogue import Catalogue, MetadataError, Script
from remoterun.config import Settings
from remoterun.engine.attempt import (
    Attempt,
    Limits,
    archive_failure_text,
    archive_kept_text,
    build_spec,
)
from remoterun.engine.hub import TaskHub
from remoterun.engine.protect import Protection
from remoterun.errors import IntegrityFailed, NotFound
from remoterun.isolation.sandbox import Sandbox
from remoterun.metrics import Metrics
from remoterun.runner import NOT_STARTED, RunResult, SpawnError, start_problem
from remoterun.spawn import Children
from remoterun.state import Task
from remoterun.vault import SecretsUnavailable

log = structlog.get_logger(__name__)


def limits_for(settings: Settings, task: Task, script: Script | None) -> Limits:
    """What bounds the task's attempt: the request's, else the script's, else the server's."""
    cap = (script.extra.get("max_output_bytes") if script else None) \
        or settings.max_output_bytes or None
    timeout: float | None = settings.default_timeout_s
    if task.timeout is not None:
        timeout = float(task.timeout)
    elif script is not None and script.timeout_s is not None:
        timeout = float(script.timeout_s)
    return Limits(timeout_s=timeout, output_cap=cap,
                  stdin_buffer_bytes=settings.stdin_buffer_bytes,
                  read_chunk=settings.read_chunk_bytes, kill_grace_s=settings.kill_grace_s,
                  drain_grace_s=settings.drain_grace_s, coalesce_s=settings.coalesce_ms / 1000)


def new_attempt(settings: Settings, task: Task, script: Script | None, hub: TaskHub,
                first_segment: int | None, compressor: Compressor, children: Children,
                metrics: Metrics, sandbox: Sandbox) -> Attempt:
    """The task's next attempt, its archive open at `first_segment` (None: listed later)."""
    archive = TaskArchive(settings.archive_dir, task.logs_path, compressor,
                          deflate=deflate_of(settings),
                          segment_max_bytes=settings.segment_max_bytes,
                          segment_max_age_s=settings.segment_max_age_s or None,
                          first_number=first_segment)
    def on_bytes(stream: str, n: int) -> None:
        metrics.child(metrics.output_bytes, stream).inc(n)

    return Attempt(task, archive, hub, limits_for(settings, task, script), children,
                   on_bytes=on_bytes, on_paused=metrics.output_paused.inc,
                   collect=compressor.collect, sandbox=sandbox,
                   output_bytes=task.output_bytes, last_seq=task.last_seq)


async def run_attempt(attempt: Attempt, catalogue: Catalogue, protection: Protection,
                      sandbox: Sandbox) -> tuple[RunResult | None, str | None]:
    """Start the process and wait for its end; (result, None) or (None, why not)."""
    task = attempt.task
    copy: Path | None = None
    try:
        if attempt.stop.done():
            raise SpawnError("cancelled before it started")
        script = catalogue.resolve(task.script)
        secrets, script, copy = await protection.prepare(task, script)
        attempt.masker = protection.masker(secrets)
        policy = sandbox.policy(script.sandbox, script.limits, script.env)
        # A CRLF #! line or a missing interpreter: named here, since inside bwrap it would
        # read as bwrap's own "execvp: No such file" (an image has interpreters of its own).
        problem = None if policy.mode == "docker" else await asyncio.to_thread(
            start_problem, script.path)
        if problem is not None:
            attempt.retryable = False
            return RunResult(NOT_STARTED), problem
        run = await attempt.start(build_spec(task, script, catalogue.root, (), secrets), policy)
        attempt.pid = run.pid  # persisted by the next flush tick
        log.debug("task_started", pid=run.pid, script=task.script)
        return await attempt.wait(), None
    except (IntegrityFailed, SecretsUnavailable, MetadataError) as exc:  # so would a retry
        attempt.retryable = False
        log.warning("attempt_refused", script=task.script, error=str(exc))
        return None, str(exc)
    except NotFound as exc:
        return None, f"script {task.script!r} is no longer runnable: {exc.message}"
    except SpawnError as exc:
        attempt.transient = exc.transient
        return None, str(exc)
    except Exception as exc:  # a bug of ours must not leave the task running
        log.exception("run_crashed")
        return None, f"internal error: {exc}"
    finally:
        await protection.discard(copy)


async def segment_rows(settings: Settings, attempt: Attempt) -> list[store.Statement]:
    """The attempt's segment rows; after an archive failure, as the disk really has them
    (the output up to the failure), and the attempt's counts set from that."""
    archive, task_id = attempt.archive, attempt.task.id
    if archive.failure is None:
        return [store.upsert_segment(task_id, s) for s in archive.take_dirty()]
    if attempt.archive_error is None:  # failed as the run ended: nothing stopped it
        attempt.stop_reason = "archive"
    segs = archive.segments
    found: list[Segment] = await asyncio.to_thread(
        settle, settings.archive_dir, [s.path for s in segs], deflate_of(settings))
    attempt.output_bytes -= sum(s.raw_bytes for s in segs) - sum(s.raw_bytes for s in found)
    if segs:
        attempt.last_seq = max([segs[0].first_seq - 1,
                                *(s.last_seq for s in found if s.raw_bytes)])
    # Frames are published before the compressor thread writes them: say which were lost.
    attempt.archive_error = archive_failure_text(archive) + archive_kept_text(
        attempt.last_seq, attempt.hub.next_seq - 1)
    return [store.upsert_segment(task_id, s) for s in found]


def backoff(settings: Settings, task: Task, script: Script | None) -> float:
    """Seconds before the retry of the attempt that just ended (exponential, jittered)."""
    base = settings.retry_base_s
    if script is not None:
        base = float(script.extra.get("retry_base_s", base))
    delay = min(settings.retry_cap_s, base * 2 ** (task.attempt - 1))
    return float(delay * random.uniform(0.5, 1.0))
