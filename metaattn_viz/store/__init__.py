"""The routing log: every run's RoutingTrace in an embedded DuckDB database.

One concept per module, imports pointing down the list:
errors (StoreUnavailable, ExportNotWritten, UnknownRun), owners (who a run belongs to) <- schema (tables,
columns, statuses, migrations) <- queries (every SQL statement, named; who sees which
rows) <- codec (trace <-> Arrow rows) <- opening (connect, migrate, recover) <- writer
(the single writer thread per file) <- runlog (RunLog: write, replay, list, compare,
analytics) <- exporting (Parquet/CSV); console is the read-only SQL console, whose queries
run in sandbox (worker processes, sandbox_worker) over a copy of the rows a reader may
see.

Never imports model code, torch or gradio. The public names are re-exported here, lazily:
importing a light submodule (owners, errors) or the package itself loads no duckdb until a
name that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_HOME = {
    "StoreUnavailable": "errors",
    "StoreLocked": "errors",
    "ExportNotWritten": "errors",
    "UnknownRun": "errors",
    "EXPORT_FORMATS": "exporting",
    "COMPARE_COLUMNS": "queries",
    "export": "exporting",
    "session_owner": "owners",
    "user_owner": "owners",
    "RunLog": "runlog",
    "open_or_explain": "runlog",
    "resolve_db_path": "runlog",
    "FINAL_STATUSES": "schema",
    "LOG_TABLES": "schema",
    "MIGRATIONS": "schema",
    "SETTINGS_COLUMNS": "schema",
    "STATUSES": "schema",
    "UNCERTAINTY_COLUMNS": "schema",
    "latest_schema_version": "schema",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'metaattn_viz.store' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"metaattn_viz.store.{_HOME[name]}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from metaattn_viz.store.errors import ExportNotWritten, StoreLocked, StoreUnavailable, UnknownRun
    from metaattn_viz.store.exporting import EXPORT_FORMATS, export
    from metaattn_viz.store.owners import session_owner, user_owner
    from metaattn_viz.store.queries import COMPARE_COLUMNS
    from metaattn_viz.store.runlog import RunLog, open_or_explain, resolve_db_path
    from metaattn_viz.store.schema import (
        FINAL_STATUSES,
        LOG_TABLES,
        MIGRATIONS,
        SETTINGS_COLUMNS,
        STATUSES,
        UNCERTAINTY_COLUMNS,
        latest_schema_version,
    )

__all__ = [
    "COMPARE_COLUMNS",
    "EXPORT_FORMATS",
    "ExportNotWritten",
    "FINAL_STATUSES",
    "LOG_TABLES",
    "MIGRATIONS",
    "RunLog",
    "SETTINGS_COLUMNS",
    "STATUSES",
    "StoreLocked",
    "StoreUnavailable",
    "UNCERTAINTY_COLUMNS",
    "UnknownRun",
    "export",
    "latest_schema_version",
    "open_or_explain",
    "resolve_db_path",
    "session_owner",
    "user_owner",
]
