"""The routing log: every run's RoutingTrace in an embedded DuckDB database.

One concept per module, imports pointing down the list:
errors (StoreUnavailable, UnknownRun), owners (who a run belongs to) <- schema (tables,
columns, statuses, migrations) <- queries (every SQL statement, named; who sees which
rows) <- codec (trace <-> Arrow rows) <- opening (connect, migrate, recover) <- writer
(the single writer thread per file) <- runlog (RunLog: write, replay, list, compare,
analytics) <- export (Parquet/CSV); console is the read-only SQL console, whose queries
run in sandbox (worker processes, sandbox_worker) over a copy of the rows a reader may
see.

Never imports model code, torch or gradio. The public names are re-exported here.
"""

from metaattn_viz.store.errors import StoreUnavailable, UnknownRun
from metaattn_viz.store.export import EXPORT_FORMATS, export
from metaattn_viz.store.owners import session_owner, user_owner
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
    "EXPORT_FORMATS",
    "FINAL_STATUSES",
    "LOG_TABLES",
    "MIGRATIONS",
    "SETTINGS_COLUMNS",
    "STATUSES",
    "UNCERTAINTY_COLUMNS",
    "RunLog",
    "StoreUnavailable",
    "UnknownRun",
    "export",
    "latest_schema_version",
    "open_or_explain",
    "resolve_db_path",
    "session_owner",
    "user_owner",
]
