"""Persistence behind one interface: the embedded SQLite store (the default) and its statements.

Everything that knows SQL or peewee lives under this package; the engine and the API call the
`Database` methods and pass the statements its helpers build.
"""

from remoterun.store.sqlite import (
    Database,
    DatabaseBusy,
    DatabaseUnavailable,
    Guarded,
    StaleWrite,
    Statement,
    delete_segment,
    insert_audit,
    insert_task,
    mark_pruned,
    transition,
    update_task,
    upsert_segment,
)

__all__ = ["Database", "DatabaseBusy", "DatabaseUnavailable", "Guarded",
           "StaleWrite", "Statement", "delete_segment", "insert_audit", "insert_task",
           "mark_pruned", "transition", "update_task", "upsert_segment"]
