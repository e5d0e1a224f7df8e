"""One attempt of a task: its Run, its archive and its hub, and how it ended as an Outcome value.

The attempt reads the process's output into numbered frames (the hub numbers, the archive keeps,
subscribers get them), holds clients' controls until the process exists, bounds what stdin may
queue, slows only itself when the compressor thread falls behind it, stops reading when its seq
reservation runs short, and stops the process when its archive cannot be written or its output
reaches its cap. It writes no state: `decide()` turns how it ended into an `Outcome`, which the
scheduler records.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remoterun.archive import TaskArchive
from remoterun.catalogue import Scalar, Script, param_value
from remoterun.engine.hub import TaskHub
from remoterun.errors import BadRequest
from remoterun.isolation.sandbox import Launch, Policy, Sandbox, SandboxError
from remoterun.redact import LINE_HOLD_S, Masker
from remoterun.runner import Run, RunResult, RunSpec, SpawnError, is_transient, spawn_message
from remoterun.spawn import Children
from remoterun.state import Task, TaskStatus
from remoterun.wire import Frame, rfc3339

S = TaskStatus
# A task whose output the compressor thread is this far behind on stops being read until it is
# under BACKLOG_LOW again (looked at every BACKLOG_POLL_S), so it alone waits for the thread;
# the compressor's own bound, which holds the whole loop, is the last resort.
BACKLOG_HIGH = 4 * 1024 * 1024
BACKLOG_LOW = 1024 * 1024
BACKLOG_POLL_S = 0.005
# Frames numbered past the reservation's end minus this stop the reading until the next block
# is committed: more than the few frames a read callback can still hand on after a pause.
SEQ_MARGIN = 256


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as the task should record it."""

    status: TaskStatus
    exit_code: int | None
    error: str | None
    retry: bool = False  # schedule attempt + 1 (status is then failed or timeout)


@dataclass
class Limits:
    """What bounds one attempt, from the settings and the script's metadata."""

    timeout_s: float | None
    output_cap: int | None
    stdin_buffer_bytes: int
    read_chunk: int
    kill_grace_s: float
    drain_grace_s: float
    coalesce_s: float


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a running attempt has got: what its task's row records at the next flush."""

    output_bytes: int
    last_seq: int
    pid: int | None


def decide(task: Task, output_bytes: int, result: RunResult | None, error: str | None,
           stop_reason: str | None, timeout_s: float | None,
           limit: str | None = None, retryable: bool = True) -> Outcome:
    """The outcome of an attempt from how its process ended and why it was stopped (`limit`:
    the resource limit it is known to have hit, named; `retryable` False: refused before it
    ran, which another attempt would be too; `output_bytes`: what it wrote)."""
    status, exit_code = S.FAILED, None
    if result is not None:
        exit_code = result.exit_code
        if stop_reason == "archive":
            pass  # error names the archive's failure
        elif result.stopped == "timeout":
            status, error = S.TIMEOUT, f"killed after running past its timeout of {timeout_s} s"
        elif stop_reason == "cancel":
            status, error = S.CANCELLED, None
        elif stop_reason == "shutdown":
            error = "the server shut down during the run"
        elif stop_reason == "output_cap":
            error = (f"stopped when its output reached the cap of {output_bytes} bytes "
                     f"(max_output_bytes); the output up to the cap is kept")
        elif limit is not None:
            error = limit
        elif exit_code == 0:
            status = S.SUCCESS
    elif stop_reason == "cancel":
        status, error = S.CANCELLED, None
    retry = status in (S.FAILED, S.TIMEOUT) and task.attempt <= task.max_retries and retryable
    return Outcome(status, exit_code, error, retry)


def archive_failure_text(archive: TaskArchive) -> str:
    """The task's `error` for an archive that failed: the failure and the disk it was on."""
    return f"the archive at {archive.root} could not be written: {archive.failure}"


def archive_kept_text(kept_seq: int, sent_seq: int) -> str:
    """What the `error` of an archive failure adds once the disk's segments are settled."""
    if sent_seq <= kept_seq:
        return f"; it holds the output up to seq {kept_seq}"
    return (f"; it holds the output up to seq {kept_seq}: seqs {kept_seq + 1} to {sent_seq} "
            f"were sent live but are not kept")


def build_spec(task: Task, script: Script, root: Path,
               inherited: Sequence[bytes], secrets: Mapping[str, Scalar] | None = None
               ) -> RunSpec:
    """The process to start for the task's current attempt. Secret params (their values
    opened from the task's box) go only into the environment, never into argv."""
    secrets = secrets or {}
    params = {k: v for k, v in json.loads(task.params).items() if k not in secrets}
    env = {f"RR_PARAM_{k.upper()}": param_value(v) for k, v in (*params.items(),
                                                                *secrets.items())}
    env.update(RR_TASK_ID=task.id, RR_ATTEMPT=str(task.attempt))
    if task.schedule:
        env.update(RR_SCHEDULE=task.schedule, RR_SCHEDULED_FOR=rfc3339(task.scheduled_for) or "")
    if task.pty:
        env["TERM"] = "xterm-256color"
    cwd = root
    if script.cwd is not None:
        cwd = script.cwd if script.cwd.is_absolute() else cwd / script.cwd
    return RunSpec(
        argv=[str(script.path), *(f"--{k}={param_value(v)}" for k, v in params.items())],
        env=env, cwd=cwd, pty=bool(task.pty), interactive=bool(task.interactive),
        stdin=task.stdin.encode(), inherited=inherited)


@dataclass(eq=False)
class Attempt:
    """A task's attempt from dispatch to the end of its process; it owns its progress."""

    task: Task  # as dispatched (the attempt reads it, never changes it)
    archive: TaskArchive
    hub: TaskHub
    limits: Limits
    children: Children
    on_bytes: Callable[[str, int], None]  # metrics: output bytes by stream
    on_paused: Callable[[], None]  # metrics: a pause for the compressor
    seq_reserved: int = 0  # frames up to this seq may be numbered (committed)
    reserve: Callable[[], None] = lambda: None  # ask for the next block (async, once)
    collect: Callable[[], None] = lambda: None  # bring archive backlogs up to date
    stop: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())
    stop_reason: str | None = None  # cancel, shutdown, output_cap, archive
    archive_error: str | None = None
    run: Run | None = None
    early: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    stdin_queued: int = 0  # bytes clients wrote before the process started
    _paused_for: set[str] = field(default_factory=set)  # why reading is paused
    _timer: asyncio.TimerHandle | None = None
    sandbox: Sandbox | None = None  # isolation and limits (None: the spec as it is)
    launch: Launch | None = None
    limit_error: str | None = None  # the limit the run hit, named (sandbox.finish)
    masker: Masker | None = None  # secrets and [redaction] patterns; None: nothing to mask
    retryable: bool = True  # False: refused before it ran (integrity, secrets)
    transient: bool = False  # the spawn met a shortage (EMFILE): the same attempt, again later
    _hold_timer: asyncio.TimerHandle | None = None  # releases held incomplete lines
    output_bytes: int = 0  # what its process wrote, its task's before it counted
    last_seq: int = 0  # of the last frame it numbered
    pid: int | None = None  # of its process, once started

    @property
    def progress(self) -> Progress:
        """How far it has got, as a value."""
        return Progress(self.output_bytes, self.last_seq, self.pid)

    def request_stop(self, reason: str) -> None:
        """Stop the process (its group: SIGTERM, then SIGKILL after the grace)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if not self.stop.done():
            self.stop.set_result(None)

    # Controls --------------------------------------------------------------------------------

    def control(self, method: str, *args: Any) -> None:
        """Call a Run control (write, close_stdin, resize, signal) now, or once it has started:
        a client that saw `running` may type before the spawn has returned."""
        if method == "write":
            self._check_stdin(len(args[0]))
        if self.run is None:
            if method == "write":
                self.stdin_queued += len(args[0])
            self.early.append((method, args))
        else:
            getattr(self.run, method)(*args)

    def _check_stdin(self, size: int) -> None:
        queued = self.run.stdin_pending if self.run is not None else self.stdin_queued
        if queued + size > self.limits.stdin_buffer_bytes:
            raise BadRequest(f"the task's stdin already holds {queued} bytes it has not read; "
                             f"the bound is {self.limits.stdin_buffer_bytes}",
                             code="stdin_full")

    # The run ---------------------------------------------------------------------------------

    async def start(self, spec: RunSpec, policy: Policy | None = None) -> Run:
        """Spawn the process (in its sandbox, by `policy`) and hand it the controls that came
        early; SpawnError if not."""
        try:
            if self.sandbox is not None and policy is not None:
                spec = await self._sandboxed(spec, policy)
            return await self._start(spec)
        except BaseException:
            await asyncio.shield(self._finish_launch(None))
            raise

    async def _sandboxed(self, spec: RunSpec, policy: Policy) -> RunSpec:
        assert self.sandbox is not None
        preparing = asyncio.ensure_future(self.sandbox.prepare(
            policy, spec.argv, spec.env, spec.cwd, spec.pty,
            f"{self.task.id}-{self.task.attempt}"))
        try:
            self.launch = launch = await asyncio.shield(preparing)
        except asyncio.CancelledError:  # it goes on in its thread: keep what it made, to undo
            with contextlib.suppress(Exception):
                self.launch = await preparing
            raise
        except SandboxError as exc:
            raise SpawnError(f"cannot start its sandbox ({policy.mode}): {exc}") from exc
        except OSError as exc:  # the script checked before bwrap's exec (see sandbox.prepare)
            raise SpawnError(spawn_message(str(spec.argv[0]), exc), is_transient(exc)) from exc
        return dataclasses.replace(
            spec, argv=launch.argv, env=launch.env, inherited=(), pass_fds=launch.pass_fds,
            started=launch.started if launch.hooked else None,
            group_ready=launch.group_ready if launch.hooked else None,
            take_ctty=launch.take_ctty,
            typed_signals=launch.typed_signals,
            signal_exit_codes=launch.signal_exit_codes)

    async def _finish_launch(self, result: RunResult | None) -> None:
        launch, self.launch = self.launch, None
        if launch is not None and self.sandbox is not None:
            self.limit_error = await self.sandbox.finish(
                launch, None if result is None else result.exit_code,
                None if result is None else result.stopped)

    async def _start(self, spec: RunSpec) -> Run:
        self.run = Run(spec, self._on_output, read_chunk=self.limits.read_chunk,
                       kill_grace_s=self.limits.kill_grace_s,
                       drain_grace_s=self.limits.drain_grace_s,
                       coalesce_s=self.limits.coalesce_s, children=self.children)
        try:
            await self.run.start()
        except BaseException:
            self.run = None
            raise
        for method, args in self.early:
            getattr(self.run, method)(*args)
        self.early.clear()
        return self.run

    async def wait(self) -> RunResult:
        """Until the process has exited and its pipes are drained."""
        assert self.run is not None
        result: RunResult | None = None
        try:
            result = await self.run.wait(self.limits.timeout_s, self.stop)
            return result
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await asyncio.shield(self._finish_launch(result))
            self._flush_masker()

    def _on_output(self, stream: str, data: bytes) -> None:
        masker = self.masker
        if masker is not None:
            data = masker.feed(stream, data)
            if masker.holding_lines and self._hold_timer is None:
                self._hold_timer = asyncio.get_running_loop().call_later(
                    LINE_HOLD_S, self._release_lines)
            if not data:
                return
        self._frame(stream, data)

    def _release_lines(self) -> None:
        """Frame the incomplete lines that waited LINE_HOLD_S; wake again for the others."""
        self._hold_timer = None
        masker = self.masker
        if masker is None:
            return
        now = time.monotonic()
        for stream, data in masker.release_lines(now):
            self._frame(stream, data)
        delay = masker.next_release(now)
        if delay is not None:
            self._hold_timer = asyncio.get_running_loop().call_later(delay, self._release_lines)

    def _flush_masker(self) -> None:
        """The run has ended: what masking held back is framed now, masked."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if self.masker is not None:
            for stream, data in self.masker.flush():
                self._frame(stream, data)

    def _frame(self, stream: str, data: bytes) -> None:
        if self.archive.failure is not None:
            self.note_archive_failure()
            return  # not numbered once the failure is known (the error names what was lost)
        cap = self.limits.output_cap
        if cap is not None and self.output_bytes + len(data) > cap:
            data = data[: cap - self.output_bytes]  # keep up to the cap, drop the rest
            self.request_stop("output_cap")
            if not data:
                return
        hub = self.hub
        frame: Frame = hub.frame(stream, data, time.time())
        self.archive.write(frame)
        hub.publish(frame)
        self.output_bytes += len(data)
        self.last_seq = frame.seq
        self.on_bytes(stream, len(data))
        if hub.next_seq + 2 * SEQ_MARGIN > self.seq_reserved:
            self.reserve()
            if hub.next_seq + SEQ_MARGIN > self.seq_reserved:
                self._pause("seq")
        if self.archive.backlog.bytes > BACKLOG_HIGH:
            self._pause("backlog")
            self.on_paused()

    def note_archive_failure(self) -> None:
        """The archive failed: stop the process, and say so in the task's error."""
        if self.archive_error is None:
            self.archive_error = archive_failure_text(self.archive)
            self.request_stop("archive")

    def seqs_reserved(self, upto: int) -> None:
        """A reservation up to `upto` was committed: read on if that was the wait."""
        self.seq_reserved = max(self.seq_reserved, upto)
        if "seq" in self._paused_for and self.hub.next_seq + SEQ_MARGIN <= self.seq_reserved:
            self._resume("seq")

    def _pause(self, why: str) -> None:
        run = self.run
        if run is None or why in self._paused_for:
            return
        self._paused_for.add(why)
        run.pause()
        if why == "backlog" and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(BACKLOG_POLL_S, self._poll)

    def _resume(self, why: str) -> None:
        self._paused_for.discard(why)
        if not self._paused_for and self.run is not None:
            self.run.resume()

    def _poll(self) -> None:
        self._timer = None
        self.collect()
        if self.archive.backlog.bytes <= BACKLOG_LOW or self.archive.failure is not None:
            self._resume("backlog")
        else:
            self._timer = asyncio.get_running_loop().call_later(BACKLOG_POLL_S, self._poll)
