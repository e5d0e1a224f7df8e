"""Persistence behind one interface: the `Store` Protocol (base), the tables and statements
(schema), the named reads (queries), and two stores that implement them side by side: SQLite
(`sqlite.Database`, the default) and PostgreSQL (`postgres.PostgresDatabase`, cluster mode).

Everything that knows SQL or peewee lives under this package; the engine and the API call the
`Store` methods and pass the statements its builders make.
"""

from remoterun.store.base import (
    DatabaseBusy,
    DatabaseUnavailable,
    Fenced,
    Guarded,
    Membership,
    StaleWrite,
    Statement,
    Store,
    Unsure,
)
from remoterun.store.sqlite import Database
from remoterun.store.statements import (
    audit_json,
    delete_segment,
    insert_audit,
    insert_delivery,
    insert_task,
    mark_pruned,
    transition,
    update_task,
    upsert_segment,
)

__all__ = ["Database", "DatabaseBusy", "DatabaseUnavailable", "Fenced", "Guarded",
           "Membership", "StaleWrite", "Statement", "Store", "Unsure", "audit_json",
           "delete_segment", "insert_audit", "insert_delivery", "insert_task", "mark_pruned",
           "transition", "update_task", "upsert_segment"]
