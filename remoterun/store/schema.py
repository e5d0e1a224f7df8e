"""The tables as peewee models, and each write's statement rendered by peewee per dialect.

A write is a `Statement`: a shape (`("update", "tasks", columns, where)`) and its values. A
store asks its `Dialect` for the shape's SQL: peewee builds the query once from the models,
with a slot where each value goes, renders it with that dialect's database (SQLite's `?`,
PostgreSQL's `$n` for asyncpg, GLOB or a regex, LIKE or ILIKE, the column types), and the
text is cached by shape: building a query with peewee cost ~0.18 ms, as much as running it,
and a task's life writes a few. The PostgreSQL tables carry the cluster's columns too
(`ClusterTask`, `ClusterTaskLog`, `Node`), so PostgreSQL never reads SQLite's text.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import peewee as pw

from remoterun.store.base import Statement

SCHEMA_VERSION = 3  # 2: tasks.seq_reserved, task_events.exit_code; 3: schedules (issue 29)
NOTIFY_CHANNEL = "rr_tasks"  # PostgreSQL: a task became claimable (new, retried, released)
_unbound = pw.SqliteDatabase(None)  # models are rendered by a dialect, never bound to one


class Name(pw.CharField):
    """A short text column: VARCHAR(255) on SQLite (as it always was), TEXT on PostgreSQL."""

    field_type = "NAME"

    def get_modifiers(self) -> None:
        """No length: the dialect's type says it."""


class TextArray(pw.Field):
    """A PostgreSQL text[] (node labels, scripts)."""

    field_type = "TEXT[]"


class _Base(pw.Model):
    class Meta:
        database = _unbound


class Task(_Base):
    """A submitted task: every field of PROTOCOL.md's task, plus what the engine needs."""

    num = pw.AutoField()  # submission order: FIFO tie-break and list cursor
    id = Name(unique=True)
    script = Name()
    params = pw.TextField(default="{}")  # JSON, secrets as "***"
    # The real values of secret params, sealed (vault.py: "rr1:..."); "{}" for none, and once
    # the task has ended.
    secret_params = pw.TextField(default="{}")
    status = Name(index=True)
    priority = pw.IntegerField(default=0)
    timeout = pw.FloatField(null=True)
    max_retries = pw.IntegerField(default=0)
    attempt = pw.IntegerField(default=1)
    pty = pw.BooleanField(default=False)
    interactive = pw.BooleanField(default=False)
    stdin = pw.TextField(default="")
    exit_code = pw.IntegerField(null=True)
    error = pw.TextField(null=True)
    created_at = pw.FloatField()
    updated_at = pw.FloatField()
    started_at = pw.FloatField(null=True)
    finished_at = pw.FloatField(null=True)
    run_after = pw.FloatField(null=True)
    submitted_by = Name(default="anonymous")
    logs_path = Name()
    output_bytes = pw.IntegerField(default=0)
    last_seq = pw.IntegerField(default=0)
    pid = pw.IntegerField(null=True)  # of the running attempt, to sweep its group after a crash
    # Seqs up to this may have been sent to a client: after a crash the task numbers from above
    # it, so a seq never names two frames (reserved in blocks, written ahead of their use).
    seq_reserved = pw.IntegerField(default=0)
    schedule = Name(null=True)  # the schedule that submitted it (issue 29)
    scheduled_for = pw.FloatField(null=True)  # its slot; null for a schedule's "run now"

    class Meta:
        table_name = "tasks"
        indexes = ((("script", "num"), False),)


class TaskEvent(_Base):
    """One state transition, written in the same transaction as the task row."""

    id = pw.AutoField()
    task_id = Name(index=True)
    ts = pw.FloatField()
    old_status = Name(null=True)
    new_status = Name()
    attempt = pw.IntegerField()
    detail = pw.TextField(null=True)
    exit_code = pw.IntegerField(null=True)  # of the attempt this transition ended

    class Meta:
        table_name = "task_events"


class TaskLog(_Base):
    """One archive segment of a task's output."""

    id = pw.AutoField()
    task_id = Name(index=True)
    created_at = pw.FloatField()
    path = Name(unique=True)
    first_seq = pw.IntegerField()
    last_seq = pw.IntegerField(default=0)
    raw_bytes = pw.IntegerField(default=0)
    gz_bytes = pw.IntegerField(default=0)
    closed_at = pw.FloatField(null=True)
    pruned = pw.BooleanField(default=False)

    class Meta:
        table_name = "task_logs"


class Meta(_Base):
    """Key/value facts about the database itself, such as the schema version."""

    key = Name(primary_key=True)
    value = pw.TextField()

    class Meta:
        table_name = "meta"


class AuditEvent(_Base):
    """Who did what, from where, with what result: written with the action it records."""

    # One index (task_id): every submit writes a row, so each index is paid on the hot path;
    # the other filters scan newest first by id, which the admin's page reads a page of.
    id = pw.AutoField()
    ts = pw.FloatField()
    actor = Name()
    role = Name(null=True)
    address = Name(null=True)
    action = Name()
    task_id = Name(null=True, index=True)
    script = Name(null=True)
    result = Name()
    detail = pw.TextField(null=True)

    class Meta:
        table_name = "audit"


class Schedule(_Base):
    """A schedule's state kept in the database: an API schedule's definition (`spec`, JSON),
    and for every schedule whether it is paused and from when its slots count (`since`)."""

    name = Name(primary_key=True)
    source = Name()  # "api" or "config"
    spec = pw.TextField(default="{}")
    paused = pw.BooleanField(default=False)
    created_at = pw.FloatField()
    updated_at = pw.FloatField()
    since = pw.FloatField()  # slots after this instant are recorded (creation, last resume)

    class Meta:
        table_name = "schedules"


class ScheduleSlot(_Base):
    """One slot of a schedule and its outcome: the pair is the key, so a slot is recorded,
    and its task started, at most once (inserted in the task's own transaction)."""

    schedule = Name()
    slot = pw.FloatField()
    outcome = Name()  # started, skipped_overlap, queued, replaced, missed, failed_to_submit
    task_id = Name(null=True)
    reason = pw.TextField(null=True)
    recorded_at = pw.FloatField()

    class Meta:
        table_name = "schedule_slots"
        primary_key = pw.CompositeKey("schedule", "slot")


class HookDelivery(_Base):
    """One signed request to a hook that was answered (issue 30): its delivery id, unique per
    hook, makes a redelivery answer with the first task instead of starting another."""

    id = pw.AutoField()
    hook = Name()
    delivery_id = Name(null=True)  # the hook's delivery_header, when it has one
    ts = pw.FloatField()
    result = Name()  # accepted or skipped
    task_id = Name(null=True)
    reason = pw.TextField(null=True)  # skipped: the match key that did not match

    class Meta:
        table_name = "hook_deliveries"
        indexes = ((("hook", "delivery_id"), True), (("hook", "id"), False))


# The cluster's tables (PostgreSQL only) --------------------------------------------------------

class ClusterTask(Task):
    """A task as the cluster stores it: where it may run and which node claimed it."""

    node = pw.TextField(null=True)  # placement: this node only
    labels = TextArray(null=True)  # placement: all of these
    owner = pw.TextField(null=True)  # the node that claimed it

    class Meta:
        table_name = "tasks"


class ClusterTaskLog(TaskLog):
    """A segment row, with the node that wrote it."""

    node = pw.TextField(null=True)

    class Meta:
        table_name = "task_logs"


class Node(_Base):
    """One server of the cluster: its process (`epoch`), what it offers, when last seen."""

    name = pw.TextField(primary_key=True)
    epoch = pw.TextField()
    labels = TextArray()
    scripts = TextArray()
    workers = pw.IntegerField()
    url = pw.TextField(null=True)
    started_at = pw.FloatField()
    seen_at = pw.FloatField()
    lost_at = pw.FloatField(null=True)
    lost_by = pw.TextField(null=True)

    class Meta:
        table_name = "nodes"


# The cluster's tables keep the index names their columns' tables were created with.
ClusterTask._meta.name, ClusterTaskLog._meta.name = Task._meta.name, TaskLog._meta.name


# Dialects --------------------------------------------------------------------------------------

class _DollarContext(pw.Context):
    """peewee's SQL context with asyncpg's numbered marks ($1, $2...) instead of `%s`."""

    def value(self, value: Any, converter: Any = None, add_param: bool = True) -> Any:
        """A value as the next numbered mark."""
        me: Any = self  # peewee's own state, untyped
        count = len(me._values)
        super().value(value, converter, add_param)
        if add_param and len(me._values) == count + 1 and me._sql[-1] == me.state.param:
            me._sql[-1] = f"${len(me._values)}"
        return self


class _AsyncpgDatabase(pw.PostgresqlDatabase):
    """PostgreSQL as peewee renders it, with asyncpg's marks; never connected."""

    context_class = _DollarContext


class _Slot:
    """Where the statement's value number `index` goes in a rendered query."""

    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index


@dataclass(frozen=True)
class Rendered:
    """A statement's SQL in one dialect: `values` are slots (the statement's values by index)
    or constants of the shape; `returns`: it yields the new row's id."""

    sql: str
    values: tuple[Any, ...]
    returns: bool

    def params(self, given: Sequence[Any]) -> list[Any]:
        """The values in the order of the marks."""
        return [given[v.index] if isinstance(v, _Slot) else v for v in self.values]


class Dialect:
    """How one database spells the schema: its models by table and peewee's renderer."""

    def __init__(self, name: str, database: pw.Database, models: Sequence[type[_Base]]):
        self.name = name
        self.database = database
        self.models = {m._meta.table_name: m for m in models}
        self.task: type[Task] = self.models["tasks"]  # type: ignore[assignment]
        self.segment: type[TaskLog] = self.models["task_logs"]  # type: ignore[assignment]
        self.rendered = functools.lru_cache(maxsize=1024)(self._render_shape)

    def render(self, query: pw.Node) -> tuple[str, list[Any]]:
        """A query built with the models, as this dialect's SQL and its values."""
        context: Any = self.database.get_sql_context()
        sql, params = context.sql(query).query()
        return str(sql), list(params)

    def bind(self, statement: Statement) -> tuple[str, list[Any], bool]:
        """A statement's SQL, values and whether it returns an id."""
        done = self.rendered(statement.shape)
        return done.sql, done.params(statement.params), done.returns

    def _render_shape(self, shape: tuple[Hashable, ...]) -> Rendered:
        query, returns = _build(self, shape)
        sql, values = self.render(query)
        return Rendered(sql, tuple(values), returns)

    def glob(self, column: pw.Field, pattern: str) -> pw.Node:
        """`column` matches an fnmatch pattern (`[!` already turned into `[^`)."""
        if self.name == "sqlite":
            return pw.Expression(column, "GLOB", pattern)
        return pw.Expression(column, "~", pw.fn.rr_glob(pattern))  # see postgres.CLUSTER_DDL

    def ddl(self) -> list[str]:
        """CREATE TABLE and CREATE INDEX of every model, IF NOT EXISTS."""
        out = []
        with self.database.bind_ctx(list(self.models.values())):  # its column types
            for model in self.models.values():
                schema = model._schema  # type: ignore[attr-defined]  # peewee's schema manager
                out.append(self.render(schema._create_table(safe=True))[0])
                out.extend(self.render(index)[0] for index in schema._create_indexes(safe=True))
        return out


SQLITE = Dialect("sqlite", pw.SqliteDatabase(None, field_types={"NAME": "VARCHAR(255)"}),
                 (Task, TaskEvent, TaskLog, Meta, AuditEvent, HookDelivery, Schedule,
                  ScheduleSlot))
POSTGRES = Dialect("postgres", _AsyncpgDatabase(None, field_types={
    "NAME": "TEXT", "INT": "BIGINT", "FLOAT": "DOUBLE PRECISION", "AUTO": "BIGSERIAL"}),
    (ClusterTask, TaskEvent, ClusterTaskLog, Meta, AuditEvent, Node, HookDelivery, Schedule,
     ScheduleSlot))
NOW = pw.SQL("extract(epoch from clock_timestamp())")  # PostgreSQL's clock, not the nodes'


def _build(d: Dialect, shape: tuple[Hashable, ...]) -> tuple[pw.Node, bool]:
    """A statement's peewee query in dialect `d`, a slot for each value; whether it returns
    the new row's id."""
    kind, *args = shape
    if kind == "notify":
        return pw.Select(columns=[pw.fn.pg_notify(NOTIFY_CHANNEL, "")]), False
    if kind in ("begin", "node_fence"):
        return _begin(str(kind), bool(args)), False
    model = d.models[str(args[0])]
    spec: Any = args[1:]  # the kind's own arguments, as its builder wrote them
    if kind in ("insert", "upsert", "insert_once"):
        columns = _fields(model, spec[0])
        query = model.insert({f: _slot(i) for i, f in enumerate(columns)})
        if kind == "insert_once":  # a row that exists already: nothing (its guard fails)
            return query.on_conflict_ignore(), False
        if kind == "upsert":
            (target,) = _fields(model, (spec[1],))
            query = query.on_conflict(conflict_target=[target], update={
                f: getattr(pw.EXCLUDED, f.column_name) for f in _fields(model, spec[2])})
        key: Any = model._meta.primary_key
        returns = d.name == "postgres" and key.name == "id"  # the id SQLite's lastrowid gives
        return (query.returning(key) if returns else query), returns
    if kind == "update":
        sets = _fields(model, spec[0])
        where = _where(model, spec[1], len(sets))
        return model.update({f: _slot(i) for i, f in enumerate(sets)}).where(where), False
    if kind == "delete":
        return model.delete().where(_where(model, spec[0], 0)), False
    raise ValueError(f"no statement of kind {kind!r}")


def _begin(kind: str, bounded: bool) -> pw.Node:
    """PostgreSQL's first statement of a write: its transaction's id and, `bounded`, the
    transaction's lock wait (`lock_timeout`, the last value) in the same round trip; a node's
    fence (its row, this process, not lost: no row returned once it was declared lost) adds
    its guard to that trip."""
    xid = [pw.fn.txid_current()]
    if bounded:
        xid.append(pw.fn.set_config("lock_timeout", _slot(0 if kind == "begin" else 2), True))
    if kind == "begin":
        return pw.Select(columns=xid)
    return (Node.update({Node.seen_at: NOW}).where(
        (Node.name == _slot(0)) & (Node.epoch == _slot(1)) & Node.lost_at.is_null())
        .returning(*xid))


def _slot(index: int) -> pw.Value:
    return pw.Value(_Slot(index), converter=False)


def _fields(model: type[_Base], columns: Sequence[str]) -> list[pw.Field]:
    known = model._meta.columns
    for column in columns:
        if column not in known:
            raise KeyError(f"{model._meta.table_name} has no column {column!r}")
    return [known[c] for c in columns]


def _where(model: type[_Base], terms: Sequence[tuple[str, str]], first: int) -> pw.Node:
    """`column = value` (op "=") or `column IS NULL` (op "null") terms, ANDed; the values
    are the statement's from number `first` on."""
    clause: pw.Node | None = None
    index = first
    for column, op in terms:
        (field,) = _fields(model, (column,))
        if op == "null":
            term = field.is_null()
        else:
            term, index = field == _slot(index), index + 1
        clause = term if clause is None else (clause & term)
    assert clause is not None, "a write names the rows it changes"
    return clause
